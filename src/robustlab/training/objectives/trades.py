"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off
between Robustness and Accuracy", ICML 2019, https://arxiv.org/abs/1901.08573; reference code
github.com/yaodongyu/TRADES).

    min_theta  CE(f(x), y) + beta * (1/B) sum_i KL( p(x_i) || p(x'_i) ),
    x' ~ argmax_{x' in ball(x)} KL( p(x) || p(x') )

p = softmax(f). Inner maximisation in eval mode: x'_0 = x + 0.001 N(0, I) (not clipped before
the first step), then K steps x' <- project(x' + step * sign(grad KL_sum(p(x) || p(x')))) into
the ball and the bounds, p(x) held fixed: robustlab's PGD loop with this loss and start
(:func:`inner_pgd`, :func:`start_near`). Outer loss in train mode with nothing detached: the
gradient flows through the clean distribution p(x) as well as through p(x'). beta = 1/lambda of
the paper ("1/lambda = 6" means beta = 6).

Original defaults: CIFAR-10 eps 0.031, step 0.007, K = 10, beta 6 (README: beta in [1, 10]);
MNIST script eps 0.3, step 0.01, K = 40, beta 1. Our default step is 2.5 eps / K (eps / 4 at
K = 10, the reference uses 0.007 / 0.031 = 0.226 eps); recipes set it explicitly.

Differences from the reference: p(x) for the inner loop is computed once instead of at every
step (identical values, the attack runs in eval mode) and the outer loss makes one clean
forward pass instead of two (one fewer BatchNorm running-statistics update). For l2 threat
models the step is along the normalised gradient with the exact projection (the same PGD
loop), where the reference runs SGD on delta with learning rate 2 eps / K and renormalises.

Cost: K forward/backward passes + 1 forward (attack) + 2 forwards and 1 backward (loss),
about K + 2 forward/backward equivalents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number, positive_int
from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

INIT_STD = 0.001  # std of the Gaussian start of TRADES and MART's inner maximisation


def check_norm(threat: ThreatModel, who: str) -> None:
    if threat.norm not in ("linf", "l2"):
        raise ValueError(
            f"{who} supports linf and l2 threat models, not {threat.norm!r}; use pgd-at for l1"
        )


def start_near(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x + 0.001 N(0, I)``, not clipped: the start of TRADES and MART's inner maximisation
    (a :data:`robustlab.attacks.pgd.Start`)."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return x + INIT_STD * noise.to(x.device)


def inner_pgd(threat: ThreatModel, steps: int, step_size: float | None) -> PGD:
    """The PGD loop of TRADES and MART: ``steps`` sign (linf) or normalised (l2) steps of
    ``step_size`` (None: ``2.5 eps / steps``), projected into the ball and the bounds; the
    last iterate. The objective passes its start (:func:`start_near`) and, for TRADES, its
    loss on the call."""
    return PGD(threat, steps=steps, step_size=step_size, random_start=False, keep_best=False)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """``CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x'_i))``, nothing detached."""
    kl = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="sum"
    ) / len(y)
    return F.cross_entropy(logits_clean, y) + beta * kl


@register("trades")
class TRADES(Objective):
    """Clean cross-entropy plus beta times the KL divergence to the worst point of the ball.

    Args:
        beta: weight of the KL term (>= 0; the paper's 1/lambda). Default 6.0.
        steps: sign-gradient ascent steps K of the inner maximisation (>= 1). Default 10.
        step_size: length of each step in input units (> 0); ``None`` means
            ``2.5 eps / steps`` (eps / 4 at K = 10).
    """

    def __init__(self, beta: float = 6.0, steps: int = 10, step_size: float | None = None) -> None:
        self.beta = number(beta, "trades beta", low=0)
        self.steps = positive_int(steps, "trades steps")
        self.step_size = (
            None
            if step_size is None
            else number(step_size, "trades step_size", low=0, low_open=True)
        )

    def config(self) -> dict:
        return super().config() | {
            "beta": self.beta,
            "steps": self.steps,
            "step_size": self.step_size,
        }

    def perturb(
        self, model: nn.Module, x: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        """x': K ascent steps on KL_sum(p(x) || p(x')) from x + 0.001 N(0, I), eval mode."""
        check_norm(threat, "trades")
        with eval_mode(model), torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def kl_at(xa: Tensor, y: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            p = p_clean if rows is None else p_clean[rows]
            kl = F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(1)
            return kl, logits

        pgd = inner_pgd(threat, self.steps, self.step_size)
        # the labels are unused by the KL: the clean predictions stand in for them
        return pgd.craft(model, x, p_clean.argmax(1), generator, loss=kl_at, start=start_near)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        x_adv = self.perturb(model, x, threat, generator)
        return trades_loss(model(x), model(x_adv), y, self.beta)
