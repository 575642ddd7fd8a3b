"""Certified training by bound propagation: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al.
2020), one shared objective differing in the bound and the defaults.

- ``"ibp"``: Sven Gowal, Krishnamurthy Dvijotham, Robert Stanforth, Rudy Bunel, Chongli Qin,
  Jonathan Uesato, Relja Arandjelović, Timothy Mann, Pushmeet Kohli, "On the Effectiveness of
  Interval Bound Propagation for Training Verifiably Robust Models", 2018, arXiv:1810.12715.
- ``"crown-ibp"``: Huan Zhang, Hongge Chen, Chaowei Xiao, Sven Gowal, Robert Stanforth, Bo Li,
  Duane Boning, Cho-Jui Hsieh, "Towards Stable and Efficient Training of Verifiably Robust
  Neural Networks", ICLR 2020, arXiv:1906.06316.

With m_j (j != y) lower bounds of the margins z_y - z_j over the ball ∩ box of radius eps_t
(logit units), the worst-case logits are ẑ_y = 0, ẑ_j = -m_j, and

    L = kappa_t CE(z(x), y) + (1 - kappa_t) CE(ẑ, y),
    m = beta_t m_CROWN-IBP + (1 - beta_t) m_IBP            (IBP: beta_t = 0)

Schedules, in epochs t (fractional: within an epoch t grows by 1 / steps per epoch at every
training step, as both reference codes ramp per minibatch; the first epoch, whose step count is
not known yet, stays at its start value): eps_t = eps_scale eps r(t) with the ramp
r(t) = clip((t - warmup) / ramp, 0, 1) (warm-up epochs at eps 0, then linear), and
kappa_t = 1 - (1 - kappa_final) r(t), beta_t = 1 - (1 - beta_final) r(t) (CROWN-IBP's
``(eps_max - eps (1 - final)) / eps_max``). Before the first :meth:`begin_epoch` (the objective
used outside the trainer) r = 1: the target eps, kappa_final and beta_final. At r = 0 the
verified term has weight 0 and is not computed (the reference code trains naturally then).

Defaults: ``ibp``: warm-up 7 and ramp 33 epochs (Gowal's 2,000 and 10,000 steps at MNIST's 300
steps of 200 per epoch, rounded), kappa 1 -> 0.5; ``crown-ibp``: warm-up 10 and ramp 50 epochs
(the paper's MNIST DM-large config: ``schedule_start`` 10, ``schedule_length`` 51), kappa 1 -> 0
(the code's ``defaults.json`` has 0.5 and its Fashion-MNIST config no natural term at all; the
paper's own value is unverified here), beta 1 -> 0; ``eps_scale`` 1 (Gowal trains at 1.1 eps,
CROWN-IBP's MNIST config at 0.4 for 0.3).

Cost: IBP about two forwards (centre and radius) plus the natural forward, and their backward,
2-3x natural training; CROWN-IBP adds one backward bound pass for the K - 1 margins while
beta_t > 0. Differences from the reference code: batch norm is bounded with its running
statistics (the reference code uses the batch's), dropout as the identity; CROWN-IBP computes
IBP's intermediate bounds twice (once for each of the two margin bounds); the schedule is in
epochs for both (Gowal's is in steps). The bounds live in :mod:`robustlab.models.bounds`; the
verifier of trained models is :func:`robustlab.defenses.verify.verify`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.models.bounds import margin_bounds, network
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

_STATE = ("epoch", "step", "per_epoch")


def eps_ramp(t: float, warmup: float, length: float) -> float:
    """The fraction of the target eps at ``t`` epochs: 0 during the ``warmup`` epochs, then
    linear over ``length`` epochs to 1 (``length`` 0: a step at ``warmup``)."""
    if t < warmup:
        return 0.0
    return 1.0 if length == 0 else min(1.0, (t - warmup) / length)


def anneal(fraction: float, final: float) -> float:
    """kappa or beta at ramp fraction ``fraction``: 1 -> ``final`` linearly in eps."""
    return 1.0 - (1.0 - final) * fraction


def worst_case_logits(lower: Tensor, y: Tensor) -> Tensor:
    """Logits (N, K) that are 0 at y and ``-lower[:, j]`` at the K - 1 other classes in
    increasing order (``lower``: (N, K-1) margin lower bounds, as
    :func:`~robustlab.models.bounds.margin_bounds` returns them)."""
    n, k = lower.shape[0], lower.shape[1] + 1
    others = torch.arange(k, device=y.device).expand(n, -1)
    others = others[others != y.unsqueeze(1)].view(n, k - 1)
    return lower.new_zeros(n, k).scatter(1, others, -lower)


def verified_loss(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, beta: float = 0.0
) -> Tensor:
    """Mean CE of the worst-case logits (:func:`worst_case_logits`) from margin lower bounds
    over ``threat``'s ball ∩ box: ``beta`` CROWN-IBP + (1 - beta) IBP (CROWN-IBP only computed
    for beta > 0). An upper bound of the CE of every point in the ball; differentiable in the
    model's parameters.

    Raises:
        ValueError: the model is not a chain bound propagation reads (residual connections,
            unsupported layers, max pooling with beta > 0), naming the problem.
    """
    try:
        net = network(model, x)
    except ValueError as err:
        raise ValueError(
            f"certified training needs a model that bound propagation can read: "
            f"{err} (e.g. robustlab.models.create('ibp-small'))"
        ) from err
    lower = margin_bounds(net, x, y, threat, "ibp")
    if beta > 0:
        lower = beta * margin_bounds(net, x, y, threat, "crown-ibp") + (1 - beta) * lower
    return F.cross_entropy(worst_case_logits(lower, y), y)


class _BoundTraining(Objective):
    """The objective of this module (see its docstring); subclasses fix the bound and the
    defaults. ``position`` is the schedule's t in epochs, ``None`` before :meth:`begin_epoch`."""

    def __init__(
        self, warmup: float, ramp: float, kappa_final: float, beta_final: float, eps_scale: float
    ) -> None:
        self.warmup = number(warmup, f"{self.name} warmup (epochs)", low=0)
        self.ramp = number(ramp, f"{self.name} ramp (epochs)", low=0)
        self.kappa_final = number(kappa_final, f"{self.name} kappa_final", low=0, high=1)
        self.beta_final = number(beta_final, f"{self.name} beta_final", low=0, high=1)
        self.eps_scale = number(eps_scale, f"{self.name} eps_scale", low=0, low_open=True)
        self.epoch, self.step, self.per_epoch = -1, 0, 0

    def config(self) -> dict:
        return super().config() | {
            "warmup": self.warmup,
            "ramp": self.ramp,
            "kappa_final": self.kappa_final,
            "eps_scale": self.eps_scale,
        }

    # --- the schedule -------------------------------------------------------------------------
    @property
    def position(self) -> float | None:
        """Epochs into the schedule (fractional within an epoch), ``None`` before it starts."""
        if self.epoch < 0:
            return None
        within = min(1.0, self.step / self.per_epoch) if self.per_epoch else 0.0
        return self.epoch + within

    @property
    def fraction(self) -> float:
        """r(t): the fraction of the target eps trained at now, in [0, 1]."""
        t = self.position
        return 1.0 if t is None else eps_ramp(t, self.warmup, self.ramp)

    @property
    def kappa(self) -> float:
        """The weight of the natural CE now, in [kappa_final, 1]."""
        return anneal(self.fraction, self.kappa_final)

    @property
    def beta(self) -> float:
        """The weight of CROWN-IBP's margin bounds now (IBP's: 1 - beta), in [beta_final, 1]."""
        return anneal(self.fraction, self.beta_final)

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Start epoch ``epoch``; the steps counted in the epoch before, if any, become the
        steps per epoch of the within-epoch ramp."""
        if epoch != self.epoch and self.step > 0:
            self.per_epoch = self.step
        self.epoch, self.step = epoch, 0

    def state_dict(self) -> dict[str, Tensor]:
        return {"schedule": torch.tensor([self.epoch, self.step, self.per_epoch])}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"schedule"} or state["schedule"].shape != (len(_STATE),):
            raise ValueError(
                f"{self.name} state holds 'schedule' ({', '.join(_STATE)}), got {sorted(state)}"
            )
        self.epoch, self.step, self.per_epoch = (int(v) for v in state["schedule"].tolist())

    # --- the loss -----------------------------------------------------------------------------
    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        one_of(threat.norm, f"norm for {self.name} training (bound propagation)", ("linf", "l2"))
        fraction, kappa, beta = self.fraction, self.kappa, self.beta
        if model.training and self.epoch >= 0:
            self.step += 1
        total = x.new_zeros(())
        if kappa > 0:
            total = total + kappa * F.cross_entropy(model(x), y)
        if fraction > 0 and kappa < 1:
            ball = dataclasses.replace(threat, eps=self.eps_scale * threat.eps * fraction)
            total = total + (1 - kappa) * verified_loss(model, x, y, ball, beta)
        return total


@register("ibp")
class IBP(_BoundTraining):
    """IBP training: kappa CE(z, y) + (1 - kappa) CE(ẑ_IBP, y) under the eps ramp.

    Args:
        warmup: epochs at eps 0 before the ramp (>= 0). Default 7.
        ramp: epochs of the linear eps ramp (>= 0). Default 33.
        kappa_final: the natural CE's weight at the end of the ramp, in [0, 1]. Default 0.5.
        eps_scale: training eps / the threat's eps (> 0). Default 1 (Gowal et al.: 1.1).
    """

    def __init__(
        self, warmup: float = 7, ramp: float = 33, kappa_final: float = 0.5, eps_scale: float = 1.0
    ) -> None:
        super().__init__(warmup, ramp, kappa_final, 0.0, eps_scale)

    @property
    def beta(self) -> float:
        return 0.0


@register("crown-ibp")
class CrownIBP(_BoundTraining):
    """CROWN-IBP training: kappa CE(z, y) + (1 - kappa) CE(ẑ, y), ẑ from the beta mix of
    CROWN-IBP's and IBP's margin bounds, under the eps ramp.

    Args:
        warmup: epochs at eps 0 before the ramp (>= 0). Default 10.
        ramp: epochs of the linear eps ramp (>= 0). Default 50.
        kappa_final: the natural CE's weight at the end of the ramp, in [0, 1]. Default 0.
        beta_final: CROWN-IBP's weight in the bounds at the end of the ramp, in [0, 1].
            Default 0 (training ends as pure IBP).
        eps_scale: training eps / the threat's eps (> 0). Default 1.
    """

    def __init__(
        self,
        warmup: float = 10,
        ramp: float = 50,
        kappa_final: float = 0.0,
        beta_final: float = 0.0,
        eps_scale: float = 1.0,
    ) -> None:
        super().__init__(warmup, ramp, kappa_final, beta_final, eps_scale)

    def config(self) -> dict:
        return super().config() | {"beta_final": self.beta_final}
