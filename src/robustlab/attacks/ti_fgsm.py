"""Translation-invariant attack (Dong, Pang, Su, Zhu, "Evading Defenses to Transferable
Adversarial Examples by Translation-Invariant Attacks", CVPR 2019,
https://arxiv.org/abs/1904.02884): MI-FGSM on the gradient convolved with a Gaussian kernel
(TI-MI-FGSM), the gradient of an ensemble of translated images.

Distance: linf (the paper's), l2 and l1 (MI-FGSM's steepest steps).
"""

from __future__ import annotations

from typing import Any, ClassVar

from robustlab.attacks._momentum_family import MomentumFamily
from robustlab.attacks.registry import register


@register("ti-fgsm")
class TIFGSM(MomentumFamily):
    """``g_t = mu * g_(t-1) + (W * G) / ||W * G||_1``, ``G = grad_x L(x_t, y)``, ``x_(t+1) =
    P(x_t + alpha * sign(g_t))``, where ``W * G`` convolves each channel of ``G`` with the
    k x k kernel ``W_ij = phi(s_i) phi(s_j) / sum`` (``phi`` the standard normal density,
    ``s = linspace(-3, 3, k)``, so a standard deviation of ``(k - 1) / 6`` pixels) with zero
    padding. With ``kernel=1`` it is MI-FGSM.

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations T. Default 10. step_size: default ``eps / steps``.
        momentum: ``mu``. Default 1.0.
        kernel: k, odd >= 1, or ``"auto"`` (default): 15 (the TI repository's) on images at
            least 64 pixels a side, 7 (the VT and NI scripts') on smaller ones.
        diversity, resize, nesterov, scales, samples, beta: compose DI, NI, SI and VMI (see
            :class:`~robustlab.attacks._momentum_family.MomentumFamily`); off by default.
        loss, targeted, early_stop, keep_best, l1_sparsity, seed: as MI-FGSM's.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: T forward/backward passes
    and T depthwise convolutions of the gradient.
    Differences from the reference code: the reference normalises by the mean ``|W * G|``
    (the same direction) and works on [-1, 1] images (eps doubled there); the paper's
    ImageNet runs also use k = 15 with DI (``create("ti-fgsm", threat, diversity=0.5)``).

    Example:
        >>> res = TIFGSM(ThreatModel("linf", 16 / 255))(surrogate, x, y)
    """

    stochastic = False
    preset: ClassVar[dict[str, Any]] = MomentumFamily.preset | {"kernel": "auto"}
