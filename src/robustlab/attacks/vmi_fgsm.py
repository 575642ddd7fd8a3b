"""Variance-tuned MI-FGSM (Wang, He, "Enhancing the Transferability of Adversarial Attacks
through Variance Tuning", CVPR 2021, https://arxiv.org/abs/2103.15571): MI-FGSM on the
gradient plus the previous step's variance, the mean gradient over a neighbourhood minus the
gradient itself.

Distance: linf (the paper's), l2 and l1 (the neighbourhood a ball of the threat's norm).
"""

from __future__ import annotations

from typing import Any, ClassVar

from robustlab.attacks._momentum_family import MomentumFamily
from robustlab.attacks.registry import register


@register("vmi-fgsm")
class VMIFGSM(MomentumFamily):
    """``G_t = grad_x L(x_t, y)``, ``g_(t+1) = mu * g_t + (G_t + v_t) / ||G_t + v_t||_1``,
    ``v_(t+1) = (1/N) sum_i grad_x L(x_t + r_i, y) - G_t`` with ``r_i`` uniform in the ball of
    radius ``beta * eps`` (linf: ``U[-beta eps, beta eps]^d``), ``v_0 = 0``, ``x_(t+1) =
    P(x_t + alpha * sign(g_(t+1)))``. With ``samples=0`` (or ``beta=0``) it is MI-FGSM; with
    ``nesterov=True``, VNI-FGSM (neighbours around ``x_t``, ``G_t`` at the look-ahead).

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations T. Default 10. step_size: ``alpha``, default ``eps / steps``.
        momentum: ``mu``. Default 1.0.
        samples: ``N`` >= 0. Default 20 (the paper's).
        beta: the neighbourhood's radius in units of eps, >= 0. Default 1.5 (the paper's).
        diversity, resize, kernel, nesterov, scales: compose DI, TI, NI and SI (see
            :class:`~robustlab.attacks._momentum_family.MomentumFamily`); off by default.
        loss, targeted, early_stop, keep_best, l1_sparsity, seed: as MI-FGSM's.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: T * (1 + N) forward/
    backward passes (210 at the defaults).
    Differences from the reference code: the reference normalises by the mean ``|.|`` (the
    same direction) and works on [-1, 1] images (eps doubled there); the neighbours are not
    clipped to the bounds, as there.

    Example:
        >>> res = VMIFGSM(ThreatModel("linf", 16 / 255))(surrogate, x, y)
    """

    stochastic = True
    preset: ClassVar[dict[str, Any]] = MomentumFamily.preset | {"samples": 20}
