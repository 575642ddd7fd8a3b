"""EOT: Expectation over Transformation (Athalye, Engstrom, Ilyas, Kwok, ICML 2018).

A randomised model ``f(t(x))``, ``t ~ T``, is attacked through the expected loss
``E_t L(f(t(x)), y)``, whose gradient is estimated by the mean of ``samples`` independent
forward/backward passes: ``(1/S) sum_s grad_x L(f(t_s(x)), y)``. Losses and gradients are
averaged, never the signs of single-draw gradients. Every gradient attack takes ``eot=S``
(``robustlab.attacks.create(name, threat, eot=S)``), and the evaluation sets it by itself on a
model that declares or shows randomness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["expected_grad", "input_grad"]


def input_grad(
    loss_fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample loss, logits and d(sum loss)/dx via ``torch.autograd.grad`` (no parameter
    gradients are computed or accumulated, whatever ``requires_grad`` the parameters have)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, logits = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def expected_grad(
    loss_fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, samples: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`input_grad` averaged over ``samples`` passes: the means of the loss, the logits
    and the gradient over the draws of the model's randomness."""
    loss, logits, grad = input_grad(loss_fn, x)
    for _ in range(samples - 1):
        lo, lg, g = input_grad(loss_fn, x)
        loss, logits, grad = loss + lo, logits + lg, grad + g
    if samples > 1:
        loss, logits, grad = loss / samples, logits / samples, grad / samples
    return loss, logits, grad
