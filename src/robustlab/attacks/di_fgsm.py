"""Input diversity (Xie, Zhang, Zhou, Bai, Wang, Ren, Yuille, "Improving Transferability of
Adversarial Examples with Input Diversity", CVPR 2019, https://arxiv.org/abs/1803.06978):
MI-FGSM whose gradient is taken through a random resize-and-pad of the input (M-DI²-FGSM).

Distance: linf (the paper's), l2 and l1 (MI-FGSM's steepest steps).
"""

from __future__ import annotations

from typing import Any, ClassVar

from robustlab.attacks._momentum_family import MomentumFamily
from robustlab.attacks.registry import register


@register("di-fgsm")
class DIFGSM(MomentumFamily):
    """``g_t = mu * g_(t-1) + G / ||G||_1``, ``G = grad_x L(T(x_t), y)``, ``x_(t+1) =
    P(x_t + alpha * sign(g_t))``, where ``T`` (one draw per step for the whole batch) is, with
    probability ``p``, a nearest-neighbour resize to ``rnd x rnd``, ``rnd`` uniform in
    ``[int(H * resize), H)``, padded with the centre of the bounds at a uniform random
    offset back to ``H x W``, and the identity otherwise. With ``diversity=0`` it is MI-FGSM.

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations T. Default 10. step_size: default ``eps / steps``.
        momentum: ``mu``. Default 1.0 (M-DI²-FGSM; 0 gives DI²-FGSM).
        diversity: ``p`` in [0, 1]. Default 0.5 (the DI repository's; the TI repository's 0.4).
        resize: smallest resize as a fraction of the side, in (0, 1]. Default 299/330.
        kernel, nesterov, scales, samples, beta: compose TI, NI, SI and VMI (see
            :class:`~robustlab.attacks._momentum_family.MomentumFamily`); off by default.
        loss, targeted, early_stop, keep_best, l1_sparsity, seed: as MI-FGSM's.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: T forward/backward passes,
    plus, with ``keep_best`` or ``early_stop``, one forward pass on each step whose transform
    was drawn (to judge the iterate).
    Differences from the reference code: it enlarges 299-pixel images to ``rnd`` in [299, 330)
    and pads them to 330 (Inception-v3 takes any size); here the image shrinks to the same
    fractions of its side and is padded back to its own size, so models with a fixed input
    size work; the pad value is the centre of the bounds (the reference's 0 on [-1, 1] images);
    the reference runs ``min(eps + 4, 1.25 eps)`` steps of 1/255, here T steps of ``eps / T``.

    Example:
        >>> res = DIFGSM(ThreatModel("linf", 16 / 255), kernel=7)(surrogate, x, y)  # DI-TI-MI
    """

    stochastic = True
    preset: ClassVar[dict[str, Any]] = MomentumFamily.preset | {"diversity": 0.5}
