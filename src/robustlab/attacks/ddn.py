"""Decoupled direction and norm attack (Rony et al., CVPR 2019, "Decoupling Direction and Norm
for Efficient Gradient-Based L2 Adversarial Attacks and Defenses",
https://arxiv.org/abs/1811.09600).

Distance: l2. A minimum-norm attack: it reports per sample the smallest adversarial
perturbation it found (``AttackResult.min_norm``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks._min_norm import Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


@register("ddn")
class DDN(Attack):
    """DDN: a normalised gradient step on the cross-entropy (the direction), then a rescale of
    the perturbation to a norm budget that shrinks by ``1 - gamma`` while the iterate is
    adversarial and grows by ``1 + gamma`` while it is not (the norm).

    Args:
        threat: l2 threat model; ``eps`` only decides which point is returned (see below).
        steps: iterations (>= 1). Default 100.
        gamma: relative change of the norm budget per step, in (0, 1). Default 0.05.
        init_norm: initial norm budget (> 0), in input units. Default 1.0.
        quantize: round each iterate to ``levels`` values over the bounds (as images are
            stored), so that the adversarial points found are representable. Default True.
        levels: number of values per coordinate when quantising (>= 2). Default 256.
        targeted: descend the cross-entropy of ``target`` instead (pass ``target``).
        early_stop: stop working on a sample once it has an adversarial point within ``eps``
            (evaluation sets it; its ``min_norm`` is then only that point's norm). Default False.
        seed: seed of the attack's generator (used only for zero gradients).

    The step length follows a cosine schedule from 1 to 0.01 over ``steps`` and the norm budget
    is capped at the largest perturbation the bounds allow, ``||max(x - low, high - x)||_2``.
    Differences from the reference code: each sample's iterate after the last step is checked
    as well, and the optional renorm of the result to ``max_norm`` is left out: the threat
    model's ``eps`` does that job.

    Returns: ``x_adv`` the smallest adversarial point found if within ``eps``, else its
    projection onto the ball (the clean point if none was found); ``min_norm`` (N,) its L2 norm
    (``inf`` if none; 0 for points already adversarial).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64.

    Example:
        >>> res = DDN(ThreatModel("l2", 0.5))(model, x, y)
        >>> median_l2 = res.min_norm.median()
    """

    norms = ("l2",)
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        gamma: float = 0.05,
        init_norm: float = 1.0,
        quantize: bool = True,
        levels: int = 256,
        targeted: bool = False,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="ce", targeted=targeted, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.levels = positive_int(levels, "levels", minimum=2)
        self.gamma = number(gamma, "gamma", low=0, high=1, low_open=True, high_open=True)
        self.init_norm = number(init_norm, "init_norm", low=0, low_open=True)
        self.quantize, self.early_stop = bool(quantize), bool(early_stop)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "gamma": self.gamma,
            "init_norm": self.init_norm,
            "quantize": self.quantize,
            "levels": self.levels,
            "early_stop": self.early_stop,
        }

    def _round(self, xa: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        if self.quantize:
            q = self.levels - 1
            xa = lo + ((xa - lo) / (hi - lo) * q).round() / q * (hi - lo)
        return xa.clamp(lo, hi)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        lo, hi = self.threat.bounds
        with torch.no_grad():
            best = Smallest(self.threat, x, is_success(model(x), y, self.targeted))
        idx = best.unsolved(within_eps=self.early_stop).nonzero().squeeze(1)
        xi, yi = x[idx], y[idx]
        delta = torch.zeros_like(xi)
        budget = torch.full((len(idx),), self.init_norm, device=x.device, dtype=x.dtype)
        cap = torch.maximum(xi - lo, hi - xi).flatten(1).norm(dim=1)

        def loss_fn(xa: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            return self.loss(logits, yi, self.targeted), logits

        for k in range(self.steps + 1):
            if idx.numel() == 0:
                break
            if k == self.steps:  # the last iterate: check only
                with torch.no_grad():
                    best.update(idx, xi + delta, is_success(model(xi + delta), yi, self.targeted))
                break
            _, logits, grad = self.input_grad(loss_fn, xi + delta)
            adv = is_success(logits, yi, self.targeted)
            best.update(idx, xi + delta, adv)
            if self.early_stop:
                keep = best.unsolved(within_eps=True)[idx]
                idx, xi, yi, delta, grad = idx[keep], xi[keep], yi[keep], delta[keep], grad[keep]
                adv, budget, cap = adv[keep], budget[keep], cap[keep]
            g = grad.flatten(1)
            g_norm = g.norm(dim=1, keepdim=True)
            if (g_norm == 0).any():  # no direction: a random one
                r = torch.randn(
                    g.shape, generator=generator, device=generator.device, dtype=g.dtype
                ).to(g.device)
                g = torch.where(g_norm == 0, r, g)
                g_norm = g.norm(dim=1, keepdim=True)
            step = 0.01 + 0.99 * (1 + math.cos(math.pi * k / self.steps)) / 2
            d = delta.flatten(1) + step * g / g_norm
            budget = (budget * torch.where(adv, 1 - self.gamma, 1 + self.gamma)).minimum(cap)
            d = d * (budget / d.norm(dim=1).clamp_min(1e-12))[:, None]
            delta = self._round(xi + d.reshape(xi.shape)) - xi
        return best.result(model, y, self.targeted)
