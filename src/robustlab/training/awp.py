"""AWP, adversarial weight perturbation (Dongxian Wu, Shu-Tao Xia, Yisen Wang, "Adversarial
Weight Perturbation Helps Robust Generalization", NeurIPS 2020, arXiv:2004.05884; reference
code github.com/csdongxian/AWP, ``utils_awp.py``).

    min_w max_{v: ||v_l|| <= gamma ||w_l||} (1/n) sum_i max_{x' in B(x, eps)} loss(f_{w+v}(x'), y)

solved with one normalised ascent step per layer: for every weight ``w_l`` (a parameter whose
name ends in a ``weight`` and that has >= 2 dimensions: convolutions and linear layers;
biases and BatchNorm are left alone)::

    g_l = d loss(f_w(x'), y) / d w_l,      v_l = gamma * ||w_l|| / (||g_l|| + 1e-20) * g_l

What the trainer does with AWP on, for each minibatch (the objective's contract is untouched:
no objective calls ``backward``):

1. crafts x' once at ``w`` with the objective's own inner maximisation
   (:data:`robustlab.training.split_loss.SPLITS`: pgd-at, trades, mart);
2. takes ``g`` of the objective's outer loss at ``(w, x')`` with :func:`torch.autograd.grad`,
   in train mode, the BatchNorm statistics that forward moved put back afterwards (the
   reference's proxy model discards them too); on several processes ``g`` is the gradient of
   the global minibatch (summed over the ranks with the trainer's per-rank weights);
3. adds ``v`` to the weights, computes the outer loss at ``(w + v, x')`` (x' is not crafted
   again), runs ``backward`` and the optimiser step, and subtracts ``v`` again: the gradient is
   taken at ``w + v`` and applied to ``w``.

Defaults (the card's): gamma = 5e-3 with 10 warm-up epochs without AWP (TRADES-AWP, WRN-34-10);
the reference's PGD-AT-AWP uses gamma = 1e-2 without warm-up. Differences from the reference:
the reference takes one SGD step on a proxy copy of the model and rescales the difference;
the step size cancels in the rescaling, so the gradient is used directly (the same ``v`` up to
rounding, without a second copy of the model). The reference tests ``epoch >= awp_warmup`` on
1-based epochs (AWP from the 10th epoch); here the first ``awp_warmup`` epochs run without AWP
(AWP from the 11th). Cost: one more forward/backward pass per minibatch (the gradient at ``w``;
TRADES and MART: 2 forwards + 1 backward), about +10 % over PGD-10 AT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustlab import distributed
from robustlab._validate import number

EPS = 1e-20  # the reference's guard against a zero gradient


def perturbed_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters AWP perturbs: trainable, named ``...weight``, with >= 2 dimensions."""
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and "weight" in name.rsplit(".", 1)[-1] and p.dim() >= 2
    ]


class AWP:
    """The weight perturbation of relative size ``gamma`` (> 0); see the module docstring."""

    def __init__(self, gamma: float = 5e-3) -> None:
        self.gamma = number(gamma, "awp_gamma", low=0, low_open=True)

    def perturbation(
        self,
        model: nn.Module,
        loss: Callable[[], Tensor],
        world: distributed.World | None = None,
        weight: float = 1.0,
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """``(w_l, v_l)`` for every perturbed weight of ``model``, from the gradient of
        ``loss()`` (the outer loss at the current weights, times ``weight``; summed over the
        ranks of ``world`` and divided by their number, as DDP averages gradients). The
        model's buffers are restored after the forward pass."""
        params = perturbed_weights(model)
        saved = [b.detach().clone() for b in model.buffers()]
        value = loss()
        raw = torch.autograd.grad(value * weight, params, allow_unused=True)
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)
        grads = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(params, raw, strict=True)
        ]
        if world is not None and world.size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world.size
            grads = [
                f.view_as(g)
                for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
            ]
        with torch.no_grad():
            return [
                (p, self.gamma * p.norm() / (g.norm() + EPS) * g)
                for p, g in zip(params, grads, strict=True)
            ]

    @staticmethod
    @torch.no_grad()
    def apply(v: list[tuple[nn.Parameter, Tensor]], sign: float) -> None:
        """``w_l <- w_l + sign * v_l`` for every pair of :meth:`perturbation`."""
        for p, d in v:
            p.add_(d, alpha=sign)
