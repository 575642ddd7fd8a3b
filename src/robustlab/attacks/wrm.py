"""The inner maximisation of WRM (Sinha, Namkoong, Duchi, "Certifying Some Distributional
Robustness with Principled Adversarial Training", ICLR 2018, arXiv:1710.10571; reference code
github.com/duchi-lab/certifiable-distributional-robustness, ``attacks_tf.py``):

    T(x0) = argmax_x  l(x) - gamma * ||x - x0||_2^2        (labels fixed)

by gradient ascent with the reference code's step rule, e = 1 / (2 gamma):

    x_1 = x0 + e * grad l(x0),   then for t = 0 .. steps - 1:
    x  <- x + (1 / sqrt(t + 2)) * (e * grad l(x) - (x - x0))

(ascent on e * l(x) - ||x - x0||^2 / 2, which has the same maximiser). If gamma exceeds the
smoothness constant of l in x, the problem is strongly concave and the ascent converges to its
unique maximiser. No clipping to the input bounds, as in the reference: the penalty is over the
whole input space, and the certificate of :mod:`robustlab.evaluation.wrm` is about that
unconstrained supremum.

Not a registered attack: there is no eps ball to verify the result against (the budget is the
penalty gamma), and PGD's loop cannot run it (its steepest step normalises the direction, its
result is checked inside a ball and the bounds). Used by the ``wrm`` training objective and by
:func:`robustlab.evaluation.wrm.wrm_certificate`.

Cost: steps + 1 forward/backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab._validate import integer, number

__all__ = ["LossOf", "smoothed_ce", "transport_cost", "value_and_grad", "wrm_ascent"]

#: ``loss(x) -> (N,)``: the per-sample loss l at the points ``x`` (N, ...), labels fixed
LossOf = Callable[[Tensor], Tensor]


def smoothed_ce(logits: Tensor, y: Tensor, smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy (N,) against labels smoothed as in the WRM reference code:
    ``1 - smoothing`` on class y and ``smoothing / (K - 1)`` on each other class (K classes;
    torch's ``label_smoothing = smoothing * K / (K - 1)``). ``smoothing = 0``: plain CE."""
    k = logits.shape[1]
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing * k / (k - 1))


def transport_cost(x: Tensor, x0: Tensor) -> Tensor:
    """WRM's transport cost c(x, x0) = ||x - x0||_2^2 per sample (N,), in squared input
    units (labels are never moved)."""
    return (x - x0).flatten(1).square().sum(1)


def value_and_grad(loss: LossOf, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(l(x) (N,), grad_x l(x) (N, ...))``, detached, by ``torch.autograd.grad`` only (no
    parameter gradient is touched)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(x)
        (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), g.detach()


def wrm_ascent(loss: LossOf, x0: Tensor, gamma: float, steps: int = 15) -> Tensor:
    """The ascent of the module docstring: ``steps`` + 1 gradient steps on
    ``l(x) - gamma ||x - x0||_2^2`` from ``x0`` (N, ...), returned detached, same shape.

    Args:
        loss: a :data:`LossOf`; the caller fixes the model's mode (eval for training and
            certification) and the labels.
        x0: the clean points (not modified).
        gamma: the penalty gamma > 0 per squared l2 input unit (the reference's
            ``eps = 1 / (2 gamma)``; its MNIST value eps 1.3 is gamma = 0.385).
        steps: ascent steps after the first (>= 0). Default 15, the reference's.
    """
    gamma = number(gamma, "wrm gamma", low=0, low_open=True)
    steps = integer(steps, "wrm steps", minimum=0)
    e = 0.5 / gamma
    x0 = x0.detach()
    x = x0 + e * value_and_grad(loss, x0)[1]
    for t in range(steps):
        x = x + (e * value_and_grad(loss, x)[1] - (x - x0)) / math.sqrt(t + 2)
    return x
