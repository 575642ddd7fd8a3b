"""The transfer families on MI-FGSM's loop: input diversity (DI), translation-invariant
smoothing (TI), the Nesterov look-ahead and scale copies (NI, SI) and variance tuning (VMI), as
options of one attack that compose (DI-TI-MI, VMI-DI-TI-SI, ...).

:class:`MomentumFamily` is :class:`~robustlab.attacks.mi_fgsm.MIFGSM` with two hooks: its
:meth:`~MomentumFamily.input_grad` (where the gradient is taken, through which transforms) and
its step rule (TI's smoothing before the momentum). The transforms themselves are the tensor
functions of :mod:`robustlab.attacks._transfer_ops`; the registered names with their papers'
defaults are the subclasses in ``di_fgsm.py``, ``ti_fgsm.py``, ``ni_fgsm.py`` and
``vmi_fgsm.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.attacks._transfer_ops import (
    diverse,
    gaussian_kernel,
    look_ahead,
    neighbour,
    scaled,
    smooth,
)
from robustlab.attacks.losses import CustomLoss
from robustlab.attacks.mi_fgsm import MIFGSM
from robustlab.attacks.optimizers import Momentum, StepRule
from robustlab.attacks.pgd import LossAt, Start
from robustlab.threat import ThreatModel

#: DI's smallest resize, as a fraction of the image side: the reference's 299 of 330 pixels
DI_RESIZE = 299 / 330
#: TI's ``kernel="auto"``: the TI repository's 15 on images at least this many pixels a side
#: (ImageNet), 7 below (the VT/NI scripts' size)
AUTO_KERNEL_SIDE, AUTO_KERNEL = 64, (15, 7)

LossFn = Callable[[Tensor], tuple[Tensor, Tensor]]


class _Velocity(Momentum):
    """MI-FGSM's velocity of TI-smoothed gradients, and VMI's variance ``v`` of the samples
    still attacked (per-sample state of one restart)."""

    def __init__(self, mu: float, kernel: Tensor | None) -> None:
        super().__init__(mu)
        self.kernel = kernel
        self.variance: Tensor | float = 0.0

    def keep(self, rows: Tensor) -> None:
        super().keep(rows)
        if isinstance(self.variance, Tensor):
            self.variance = self.variance[rows]

    def __call__(self, grad: Tensor) -> Tensor:
        return super().__call__(grad if self.kernel is None else smooth(grad, self.kernel))


@dataclass
class _Call:
    """What one :meth:`MomentumFamily.perturb` call shares with its hooks."""

    generator: torch.Generator
    kernel: Tensor | None
    rule: _Velocity | None = None


class MomentumFamily(MIFGSM):
    """MI-FGSM with the transfer options below; ``None`` takes the registered family's
    default (:attr:`preset`). With every option off it is MI-FGSM, iterate for iterate.

    Each step: the gradient ``G`` of the loss is taken at ``x_t`` (NI: at the look-ahead
    ``x_t + alpha * mu * g_t``), through SI's ``scales`` copies (their mean loss) and DI's
    random transform of each copy; VMI uses ``G + v_t`` and sets ``v_(t+1) = mean_i G(x_t +
    r_i) - G``; TI convolves that with its Gaussian kernel; MI-FGSM's velocity and step follow.

    Args (beyond :class:`~robustlab.attacks.mi_fgsm.MIFGSM`'s):
        diversity: DI's probability ``p`` in [0, 1] of the random resize-and-pad per step.
        resize: DI's smallest resize, a fraction of the side in (0, 1]. Default 299/330.
        kernel: TI's Gaussian kernel size, an odd integer >= 1 (1: no smoothing), or
            ``"auto"``: 15 on images at least 64 pixels a side, 7 below.
        nesterov: NI's look-ahead (linf only).
        scales: SI's number of scale copies ``m`` >= 1 (1: none). Default 1.
        samples: VMI's number ``N`` >= 0 of neighbours (0: no variance tuning).
        beta: VMI's neighbourhood radius ``beta * eps``, ``beta`` >= 0. Default 1.5.

    Cost per step: ``scales * (1 + samples)`` forward/backward passes (times EOT draws), plus,
    with ``keep_best`` or ``early_stop``, one forward pass without gradient when the gradient
    was not taken at the iterate itself (NI's look-ahead, DI's drawn transform), so that they
    judge the iterate, not the point the gradient saw.

    One call's generator, kernel and step rule live in ``self._call`` while
    :meth:`perturb` runs (PGD's loop asks the hooks without them), and are dropped after it.
    """

    #: the family's values of the options passed as ``None``
    preset: ClassVar[dict[str, Any]] = {
        "diversity": 0.0,
        "kernel": 1,
        "nesterov": False,
        "samples": 0,
    }

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        momentum: float = 1.0,
        step_size: float | None = None,
        diversity: float | None = None,
        resize: float = DI_RESIZE,
        kernel: int | str | None = None,
        nesterov: bool | None = None,
        scales: int = 1,
        samples: int | None = None,
        beta: float = 1.5,
        loss: str | CustomLoss = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        l1_sparsity: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            momentum=momentum,
            step_size=step_size,
            loss=loss,
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            l1_sparsity=l1_sparsity,
            seed=seed,
        )
        pick = self.preset
        self.diversity = number(
            pick["diversity"] if diversity is None else diversity, "diversity", low=0, high=1
        )
        self.resize = number(resize, "resize", low=0, high=1, low_open=True)
        self.kernel = _kernel(pick["kernel"] if kernel is None else kernel)
        nesterov = pick["nesterov"] if nesterov is None else nesterov
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and threat.norm != "linf":
            raise ValueError(
                f"the Nesterov look-ahead (nesterov=True) is Lin et al.'s linf "
                f"x + alpha * mu * g; use a linf threat model or nesterov=False, "
                f"not norm {threat.norm!r}"
            )
        self.nesterov = nesterov
        self.scales = positive_int(scales, "scales")
        self.samples = integer(
            pick["samples"] if samples is None else samples, "samples", minimum=0
        )
        self.beta = number(beta, "beta", low=0)
        self.stochastic = self.diversity > 0 or (self.samples > 0 and self.beta > 0)
        self._call: _Call | None = None

    def config(self) -> dict[str, Any]:
        cfg = super().config() | {
            "kernel": self.kernel,
            "nesterov": self.nesterov,
            "scales": self.scales,
        }
        if self.diversity:
            cfg |= {"diversity": self.diversity, "resize": self.resize}
        if self.samples:
            cfg |= {"samples": self.samples, "beta": self.beta}
        return cfg

    # --- the hooks of PGD's loop ----------------------------------------------------------
    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        *,
        loss: LossAt | None = None,
        start: Start | None = None,
    ) -> Tensor:
        """MI-FGSM's iterate (see :meth:`PGD.perturb`) with this attack's transforms."""
        if (self.diversity > 0 or self.kernel != 1) and x.dim() != 4:
            raise ValueError(
                f"{self.name}'s input diversity and kernel need images (N, C, H, "
                f"W), got shape {tuple(x.shape)}; pass diversity=0 and kernel=1 "
                "for other inputs"
            )
        size = (
            self.kernel
            if isinstance(self.kernel, int)
            else AUTO_KERNEL[min(x.shape[-2:]) < AUTO_KERNEL_SIDE]
        )
        kernel = gaussian_kernel(size, x) if size != 1 else None
        self._call = _Call(generator, kernel)
        try:
            return super().perturb(model, x, y, generator, loss=loss, start=start)
        finally:
            self._call = None

    def _rule(self) -> StepRule:
        rule = _Velocity(self.momentum, self._call.kernel if self._call else None)
        if self._call is not None:
            self._call.rule = rule
        return rule

    def input_grad(self, loss_fn: LossFn, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss and logits at the iterates ``x``, and the gradient the step rule gets: at NI's
        look-ahead, through SI's copies and DI's transform, plus VMI's variance."""
        call = self._call
        if call is None or call.rule is None:  # outside perturb: the plain gradient
            return super().input_grad(loss_fn, x)
        rule, at = call.rule, x
        if self.nesterov and isinstance(rule.m, Tensor):
            at = look_ahead(x, rule.m, self.step_size * self.momentum)
        exact = [at is x]
        loss, logits, grad = super().input_grad(self._through(loss_fn, call, exact), at)
        if self.samples:
            grad, rule.variance = grad + rule.variance, self._neighbours(loss_fn, call, x) - grad
        # PGD's loop judges the iterates by these logits when it keeps the best or stops early
        if not exact[0] and (self.keep_best or self.early_stop or self.restarts > 1):
            with torch.no_grad():
                draws = [loss_fn(x) for _ in range(self.eot_samples)]
            loss = _mean([d[0] for d in draws])
            logits = _mean([d[1] for d in draws])
        return loss, logits, grad

    def _neighbours(self, loss_fn: LossFn, call: _Call, x: Tensor) -> Tensor:
        """VMI's mean gradient over ``samples`` points ``x + r_i`` of the ``beta * eps`` ball,
        each through the same transforms as the step's own gradient."""
        total = torch.zeros_like(x)
        for _ in range(self.samples):
            xr = neighbour(x, self.threat, self.beta * self.threat.eps, call.generator)
            total = total + super().input_grad(self._through(loss_fn, call, [False]), xr)[2]
        return total / self.samples

    def _through(self, loss_fn: LossFn, call: _Call, exact: list[bool]) -> LossFn:
        """``loss_fn`` through SI's copies and DI's transform of each: the gradient of their
        mean loss, the value and logits of the first copy. Sets ``exact[0]`` False when DI
        transformed that copy."""
        fill = sum(self.threat.bounds) / 2

        def copy(xv: Tensor, i: int) -> tuple[Tensor, Tensor, bool]:
            xi, drawn = diverse(
                scaled(xv, i, self.threat.bounds), self.diversity, self.resize, call.generator, fill
            )
            return *loss_fn(xi), drawn

        def f(xv: Tensor) -> tuple[Tensor, Tensor]:
            loss0, first, drawn = copy(xv, 0)
            exact[0] = exact[0] and not drawn
            losses = [loss0] + [copy(xv, i)[0] for i in range(1, self.scales)]
            if len(losses) == 1:
                return losses[0], first
            mean = torch.stack(losses).mean(0)
            return losses[0].detach() + (mean - mean.detach()), first

        return f


def _mean(values: list[Tensor]) -> Tensor:
    """The mean of ``values`` (one or more tensors of one shape), summed in order."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total / len(values)


def _kernel(value: Any) -> int | str:
    if isinstance(value, str):
        if value == "auto":
            return value
        raise ValueError(f"kernel must be an odd integer >= 1 or 'auto', got {value!r}")
    size = positive_int(value, "kernel")
    if size % 2 == 0:
        raise ValueError(
            f"kernel must be an odd integer >= 1 (a centred kernel) or 'auto', "
            f"got {size}; use {size + 1}"
        )
    return size
