"""Nesterov iterative FGSM (Lin, Song, He, Wang, Hopcroft, "Nesterov Accelerated Gradient and
Scale Invariance for Adversarial Attacks", ICLR 2020, https://arxiv.org/abs/1908.06281):
MI-FGSM with the gradient taken at a look-ahead point, and, with ``scales``, averaged over
scaled copies of the input (SI-NI-FGSM).

Distance: linf (the look-ahead is the paper's linf formula).
"""

from __future__ import annotations

from typing import Any, ClassVar

from robustlab.attacks._momentum_family import MomentumFamily
from robustlab.attacks.registry import register


@register("ni-fgsm")
class NIFGSM(MomentumFamily):
    """``x_nes = x_t + alpha * mu * g_t``, ``G = (1/m) sum_(i<m) grad_x L(S_i(x_nes), y)``,
    ``g_(t+1) = mu * g_t + G / mean|G|``, ``x_(t+1) = P(x_t + alpha * sign(g_(t+1)))``, with
    ``S_i(x) = c + (x - c) / 2**i`` (``c`` the centre of the bounds). ``m = 1`` is NI-FGSM;
    with ``momentum=0`` it is I-FGSM (BIM).

    Args:
        threat: linf threat model; every iterate stays in its ball and bounds.
        steps: iterations T. Default 10. step_size: ``alpha``, default ``eps / steps``.
        momentum: ``mu``. Default 1.0.
        scales: SI's ``m`` >= 1. Default 1 (NI-FGSM); the paper's SI-NI-FGSM uses 5.
        nesterov: the look-ahead. Default True (False with ``scales=5``: SI-FGSM).
        diversity, resize, kernel, samples, beta: compose DI, TI and VMI (see
            :class:`~robustlab.attacks._momentum_family.MomentumFamily`); off by default.
        loss, targeted, early_stop, keep_best, seed: as MI-FGSM's.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: T * m forward/backward
    passes, plus, with ``keep_best`` or ``early_stop``, one forward pass per step after the first
    (the iterate is judged at ``x_t``, the gradient seen at ``x_nes``).
    Differences from the reference code: the velocity is kept l1-normalised (the look-ahead
    multiplies it by the d entries per sample, which gives the reference's mean-normalised
    ``g_t`` exactly); the reference's ``x / 2**i`` on [-1, 1] images is the scaling towards
    the centre of the bounds here; the look-ahead point is not clipped, as in the reference.

    Example:
        >>> res = NIFGSM(ThreatModel("linf", 16 / 255), scales=5)(surrogate, x, y)  # SI-NI
    """

    stochastic = False
    norms = ("linf",)
    preset: ClassVar[dict[str, Any]] = MomentumFamily.preset | {"nesterov": True}
