"""Carlini-Wagner L0 attack (Carlini & Wagner, IEEE S&P 2017, "Towards Evaluating the
Robustness of Neural Networks", https://arxiv.org/abs/1608.04644): repeated C&W-l2 runs on a
shrinking set of pixels allowed to change.

Distance: l0 (pixels). A minimum-norm attack: it reports per sample the fewest changed pixels
of the adversarial points it found (``AttackResult.min_norm``). The tanh-space Adam step is
C&W-l2's (:mod:`robustlab.attacks.cw_l2`); the search on ``c`` is
:class:`~robustlab.attacks._min_norm.ConstantSearch` in its doubling mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks._min_norm import ConstantSearch, Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.cw_l2 import adam_step, tanh_space, to_tanh
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel, as_pixels

#: a unit whose every channel moved less than this fraction of the box width counts as
#: unchanged (the reference's 1e-4 on its box of width 1); it is reset to ``x`` exactly
UNCHANGED = 1e-4
#: a removal round stops after a unit scoring above this (the reference's 0.01, box width 1)
HIGH_SCORE = 0.01


@register("cw-l0")
class CarliniWagnerL0(Attack):
    """C&W L0: keep a set ``A`` of units (pixels, or features with ``independent_channels``)
    allowed to change, initially all. Each round runs C&W-l2 restricted to ``A`` (the other
    units fixed to ``x``), warm-started from the last round's point: Adam on ``w`` with the
    point ``mid + half * tanh(w)`` on ``A``, objective ``||x' - x||_2^2 + c * max(kappa -
    margin, 0)``, ``c`` doubling every ``steps`` iterations without success, the sub-run ending
    at its first point with ``margin >= kappa``. On success each unit scores
    ``s = |sum_ch delta| * sum_ch |g|`` (``g`` the objective's gradient in ``w`` there) and
    the lowest-scoring units of ``A`` leave it, in increasing order, stopping after
    ``0.3 sqrt(#changed units)`` of them (at least one) or after one scoring above 0.01. A
    sample ends when a sub-run fails (``c > largest_const``) or ``A`` is empty.

    Args:
        threat: an l0 threat model; ``eps`` (pixels) only decides which point is returned.
        steps: Adam iterations per value of ``c`` (>= 1). Default 1000 (the reference).
        initial_const: first ``c`` (> 0); later rounds start at the last one's. Default 1e-3.
        largest_const: the sub-run fails once ``c`` exceeds it (> 0). Default 2e6.
        const_factor: ``c`` grows by this factor (> 1). Default 2.
        lr: Adam step size (> 0). Default 1e-2.
        kappa: margin in logits a point needs to count as found (>= 0). Default 0.01 (the
            reference's built-in confidence).
        abort_early: give up a value of ``c`` when the objective has not dropped by 0.01 %
            over the last tenth of ``steps`` (C&W-l2's rule) and double ``c`` at once.
            Default True; False runs every ``c`` for ``steps`` iterations (the reference).
        independent_channels: the units are features (one channel of one pixel) instead of
            pixels (all channels together). Default False (the reference's default).
        targeted: make ``target`` win instead (pass ``target``).
        early_stop: stop working on a sample once it has an adversarial point within ``eps``
            pixels (evaluation sets it; its ``min_norm`` is then only that point's count).
        seed: unused (the attack is deterministic), kept for the common signature.

    Cost: per round at least one forward and backward pass, up to ``steps`` per value of
    ``c``; rounds: about the number of units removed over ``0.3 sqrt(#changed)``; the last
    round fails and runs every ``c`` up to ``largest_const`` (``abort_early`` cuts it).

    Differences from the reference (carlini/nn_robust_attacks ``l0_attack.py``): batched,
    each sample with its own set, ``c`` and rounds; success is ``margin >= kappa`` on the
    model's logits (the reference tests ``loss1 < 1e-4 c``, loose at large ``c``); units
    that moved less than ``1e-4 (high - low)`` are reset to ``x`` before the pixels are counted
    (and the point re-checked); ``abort_early``; the thresholds scale with the box width
    (``UNCHANGED`` by it, ``HIGH_SCORE`` by its cube, the unit of ``s``).

    Returns: ``x_adv`` the adversarial point with the fewest changed pixels if at most ``eps``,
    else its l0 projection (the clean point if none was found); ``min_norm`` (N,) its number
    of changed pixels (``inf`` if none; 0 for points already adversarial).

    Example:
        >>> res = CarliniWagnerL0(ThreatModel("l0", 10), steps=200)(model, x, y)
        >>> median_pixels = res.min_norm.median()
    """

    norms = ("l0",)
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 1000,
        initial_const: float = 1e-3,
        largest_const: float = 2e6,
        const_factor: float = 2.0,
        lr: float = 1e-2,
        kappa: float = 0.01,
        abort_early: bool = True,
        independent_channels: bool = False,
        targeted: bool = False,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="cw-margin", targeted=targeted, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.initial_const = number(initial_const, "initial_const", low=0, low_open=True)
        self.largest_const = number(largest_const, "largest_const", low=0, low_open=True)
        self.const_factor = number(const_factor, "const_factor", low=1, low_open=True)
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.kappa = number(kappa, "kappa", low=0)
        self.abort_early, self.early_stop = bool(abort_early), bool(early_stop)
        self.independent_channels = bool(independent_channels)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "initial_const": self.initial_const,
            "largest_const": self.largest_const,
            "const_factor": self.const_factor,
            "lr": self.lr,
            "kappa": self.kappa,
            "abort_early": self.abort_early,
            "independent_channels": self.independent_channels,
            "early_stop": self.early_stop,
        }

    def _units(self, t: Tensor) -> Tensor:
        """(N, C, U): the channels of each unit (pixels, or features with one channel)."""
        return t.flatten(1)[:, None] if self.independent_channels else as_pixels(t)

    def _objective(
        self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor, c: Tensor
    ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """w -> (per-sample objective, logits) of the point ``mid + half * tanh(w)`` on the
        allowed features ``mask``, ``x`` elsewhere."""
        mid, half = tanh_space(self.threat)

        def f(w: Tensor) -> tuple[Tensor, Tensor]:
            xa = torch.where(mask, mid + half * torch.tanh(w), x)
            logits = model(xa)
            hinge = (self.kappa - self.loss(logits, y, self.targeted)).clamp_min(0)
            return (xa - x).flatten(1).pow(2).sum(1) + c * hinge, logits

        return f

    def _solve(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        w: Tensor,
        mask: Tensor,
        search: ConstantSearch,
        rows: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The restricted C&W-l2 sub-run of samples ``rows``: ``(found (n,), point, grad)``,
        the first point with ``margin >= kappa`` and the objective's gradient in ``w`` there
        (undefined where not found). ``mask`` (bool, like ``x``): the allowed features."""
        mid, half = tanh_space(self.threat)
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        point, grad_at = x.clone(), torch.zeros_like(x)
        live = torch.arange(len(x), device=x.device)
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        count = torch.zeros(len(x), dtype=torch.long, device=x.device)
        prev = torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype)
        check_every, t = max(1, self.steps // 10), 0
        while live.numel():
            c, xl, yl, ml = search.const[rows[live]], x[live], y[live], mask[live]
            loss, logits, grad = self.input_grad(self._objective(model, xl, yl, ml, c), w)
            ok = (self.loss(logits, yl, self.targeted) >= self.kappa) & is_success(
                logits, yl, self.targeted
            )
            j = live[ok]
            found[j], grad_at[j] = True, grad[ok]
            point[j] = torch.where(ml[ok], mid + half * torch.tanh(w[ok]), xl[ok])
            count[live] += 1
            stalled = count[live] >= self.steps
            if self.abort_early:
                due = count[live] % check_every == 1 % check_every
                stalled |= due & (loss > prev[live] * 0.9999)
                prev[live] = torch.where(due, loss, prev[live])
            stalled &= ~ok
            search.update(rows[live[stalled]], ok[stalled])
            count[live[stalled]], prev[live[stalled]] = 0, math.inf
            keep = ~ok & (search.const[rows[live]] < self.largest_const)
            t += 1
            w, m, v = adam_step(w, grad, m, v, t, self.lr)
            live, w, m, v = live[keep], w[keep], m[keep], v[keep]
        return found, point, grad_at

    def _shrink(self, allowed: Tensor, delta: Tensor, grad: Tensor) -> Tensor:
        """``allowed`` (n, U) after one removal round, given the found point's change
        ``delta`` and the gradient ``grad`` (both like the inputs)."""
        lo, hi = self.threat.bounds
        du, gu = self._units(delta), self._units(grad)
        score = (du.sum(1).abs() * gu.abs().sum(1)).masked_fill(~allowed, math.inf)
        changed = (du.abs() >= UNCHANGED * (hi - lo)).any(1).sum(1)
        values, order = score.sort(dim=1, stable=True)
        high = values > HIGH_SCORE * (hi - lo) ** 3
        first_high = torch.where(high.any(1), high.float().argmax(1), values.shape[1]) + 1
        quota = (0.3 * changed.to(values.dtype).sqrt()).ceil().long().clamp_min(1)
        r = torch.minimum(torch.minimum(first_high, quota), allowed.sum(1))
        remove = torch.arange(values.shape[1], device=allowed.device)[None] < r[:, None]
        return allowed.scatter(1, order, allowed.gather(1, order) & ~remove)

    def _snap(self, point: Tensor, x: Tensor) -> Tensor:
        """``point`` with the units that moved less than ``UNCHANGED`` reset to ``x``."""
        lo, hi = self.threat.bounds
        pu, xu = self._units(point), self._units(x)
        still = ((pu - xu).abs() < UNCHANGED * (hi - lo)).all(1, keepdim=True)
        return torch.where(still, xu, pu).reshape(x.shape)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        mid, half = tanh_space(self.threat)
        with torch.no_grad():
            best = Smallest(self.threat, x, is_success(model(x), y, self.targeted))
        channels, units = self._units(x).shape[1:]
        allowed = torch.ones(len(x), units, dtype=torch.bool, device=x.device)
        start = x.clone()
        search = ConstantSearch(
            x, self.initial_const, 0, last_at_upper=False, factor=self.const_factor, bisect=False
        )
        idx = best.unsolved(within_eps=False).nonzero().squeeze(1)
        while idx.numel():
            xi = x[idx]
            mask = allowed[idx][:, None].expand(-1, channels, -1).reshape(xi.shape)
            found, point, grad = self._solve(
                model, xi, y[idx], to_tanh(start[idx], mid, half), mask, search, idx
            )
            snapped = self._snap(point, xi)
            with torch.no_grad():
                adv = is_success(model(snapped), y[idx], self.targeted)
            best.update(idx, snapped, found & adv)
            j = idx[found]
            allowed[j] = self._shrink(allowed[j], point[found] - xi[found], grad[found])
            start[j] = point[found]
            keep = found & allowed[idx].any(1)
            if self.early_stop:
                keep &= best.unsolved(within_eps=True)[idx]
            idx = idx[keep]
        return best.result(model, y, self.targeted)
