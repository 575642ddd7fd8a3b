"""Carlini-Wagner L2 attack (Carlini & Wagner, IEEE S&P 2017, "Towards Evaluating the
Robustness of Neural Networks", https://arxiv.org/abs/1608.04644).

Distance: l2. A minimum-norm attack: it reports per sample the smallest adversarial
perturbation it found (``AttackResult.min_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks._min_norm import ConstantSearch, Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def tanh_space(threat: ThreatModel) -> tuple[float, float]:
    """``(mid, half)`` of the threat bounds: C&W's change of variables ``x = mid + half *
    tanh(w)`` maps every real ``w`` into the bounds."""
    lo, hi = threat.bounds
    return (hi + lo) / 2, (hi - lo) / 2


def to_tanh(x: Tensor, mid: float, half: float) -> Tensor:
    """``w`` with ``mid + half * tanh(w)`` within 1e-6 of ``x`` relative to ``half`` (the
    reference's 0.999999 keeps points on the bounds finite)."""
    return torch.atanh((x - mid) / half * 0.999999)


def adam_step(
    w: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int, lr: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step of size ``lr`` on ``w`` (TF's form of the bias correction, per
    coordinate, as C&W's reference), ``t`` >= 1 the step count; returns ``(w, m, v)``."""
    m = _BETAS[0] * m + (1 - _BETAS[0]) * grad
    v = _BETAS[1] * v + (1 - _BETAS[1]) * grad * grad
    step = lr * math.sqrt(1 - _BETAS[1] ** t) / (1 - _BETAS[0] ** t)
    return w - step * m / (v.sqrt() + _ADAM_EPS), m, v


@register("cw-l2")
class CarliniWagnerL2(Attack):
    """C&W L2: minimise ``||x' - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` over
    ``x' = mid + half * tanh(w)`` (the bounds ``[mid - half, mid + half]`` of the threat model,
    so every iterate is valid) with Adam, and binary-search ``c`` per sample.

    Args:
        threat: l2 threat model; ``eps`` only decides which point is returned (see below).
        steps: Adam iterations per search step (>= 1). Default 1000; the reference's 10000
            costs ten times more and rarely helps once the early abort is on.
        search_steps: binary-search steps on ``c`` (>= 1). Default 9.
        initial_const: first ``c`` (> 0). Default 1e-3.
        lr: Adam step size (> 0). Default 1e-2.
        kappa: confidence (>= 0): a point counts as found only if the wrong class wins by
            ``kappa`` in logits. Default 0.
        abort_early: stop a search step for a sample when its loss has not dropped by 0.01 %
            over the last tenth of ``steps``. Default True.
        targeted: make ``target`` win instead (pass ``target``).
        early_stop: stop working on a sample once it has an adversarial point within ``eps``
            (evaluation sets it; its ``min_norm`` is then only that point's norm). Default False.
        seed: unused (the attack is deterministic), kept for the common signature.

    Binary search as the reference: on success the upper bound becomes ``c`` and ``c`` the
    midpoint, on failure the lower bound becomes ``c`` and ``c`` is multiplied by 10 until an
    upper bound exists; with >= 10 search steps the last one uses the upper bound. Adam is
    restarted from ``x`` at each search step. Differences from the reference code: the abort
    rule looks at each sample's loss, not at the batch total (results do not depend on the
    batch), and the distance term is measured to ``x`` itself.

    Returns: ``x_adv`` the smallest adversarial point found if within ``eps``, else its
    projection onto the ball (the clean point if none was found); ``min_norm`` (N,) its L2 norm
    (``inf`` if none; 0 for points already adversarial).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64.

    Example:
        >>> res = CarliniWagnerL2(ThreatModel("l2", 0.5), steps=200)(model, x, y)
        >>> success_rate = torch.isfinite(res.min_norm).float().mean()
    """

    norms = ("l2",)
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 1000,
        search_steps: int = 9,
        initial_const: float = 1e-3,
        lr: float = 1e-2,
        kappa: float = 0.0,
        abort_early: bool = True,
        targeted: bool = False,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="cw-margin", targeted=targeted, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.search_steps = positive_int(search_steps, "search_steps")
        self.initial_const = number(initial_const, "initial_const", low=0, low_open=True)
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.kappa = number(kappa, "kappa", low=0)
        self.abort_early, self.early_stop = bool(abort_early), bool(early_stop)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "search_steps": self.search_steps,
            "initial_const": self.initial_const,
            "lr": self.lr,
            "kappa": self.kappa,
            "abort_early": self.abort_early,
            "early_stop": self.early_stop,
        }

    def _found(self, logits: Tensor, y: Tensor) -> Tensor:
        """Success with confidence: the logit of ``y`` moved by kappa against the attack."""
        shift = self.kappa * F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return is_success(logits - shift if self.targeted else logits + shift, y, self.targeted)

    def _objective(
        self, model: nn.Module, x: Tensor, y: Tensor, c: Tensor, mid: float, half: float
    ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """w -> (per-sample C&W loss, logits) of the point ``mid + half * tanh(w)``."""

        def f(w: Tensor) -> tuple[Tensor, Tensor]:
            xa = mid + half * torch.tanh(w)
            logits = model(xa)
            hinge = (-self.loss(logits, y, self.targeted) + self.kappa).clamp_min(0)
            return (xa - x).flatten(1).pow(2).sum(1) + c * hinge, logits

        return f

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        lo, hi = self.threat.bounds
        mid, half = tanh_space(self.threat)
        w0 = to_tanh(x, mid, half)
        with torch.no_grad():
            best = Smallest(self.threat, x, is_success(model(x), y, self.targeted))
        n = len(x)
        search_c = ConstantSearch(x, self.initial_const, self.search_steps)
        check_every = max(1, self.steps // 10)
        for search in range(self.search_steps):
            const = search_c.at(search)
            idx = best.unsolved(within_eps=self.early_stop).nonzero().squeeze(1)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            attacked = idx
            w = w0[idx].clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            prev = torch.full((len(idx),), math.inf, device=x.device, dtype=x.dtype)
            for it in range(self.steps):
                if idx.numel() == 0:
                    break
                objective = self._objective(model, x[idx], y[idx], const[idx], mid, half)
                loss, logits, grad = self.input_grad(objective, w)
                xa = (mid + half * torch.tanh(w)).clamp(lo, hi)
                ok = self._found(logits, y[idx])
                best.update(idx, xa, ok)
                found[idx[ok]] = True
                keep = torch.ones_like(ok)
                if self.abort_early and it % check_every == 0:
                    keep = loss <= prev * 0.9999
                    prev = torch.where(keep, loss, prev)
                if self.early_stop:
                    keep &= best.unsolved(within_eps=True)[idx]
                if not keep.all():
                    idx, w, m, v, grad, prev = (t[keep] for t in (idx, w, m, v, grad, prev))
                w, m, v = adam_step(w, grad, m, v, it + 1, self.lr)
            search_c.update(attacked, found[attacked])
        return best.result(model, y, self.targeted)
