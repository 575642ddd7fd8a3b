"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020, "Square Attack: a
Query-Efficient Black-Box Adversarial Attack via Random Search", https://arxiv.org/abs/1912.00049).

Distance: linf, l2. Score-based: it reads only the model's logits, under ``torch.no_grad``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

# (rescaled iteration bound, divisor of p_init) of the reference's piecewise-constant schedule
_SCHEDULE = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels changed at iteration ``it`` of ``n_iters``: ``p_init`` halved at the
    reference's checkpoints 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000 (the
    iteration index rescaled to a 10,000 budget)."""
    i = int(it / n_iters * 10000)
    return p_init / next((div for bound, div in _SCHEDULE if i <= bound), 512)


def _bump(a: int, b: int) -> Tensor:
    """The reference's pseudo-Gaussian a x b rectangle, unit l2 norm: at Chebyshev distance r
    from the centre (a//2, b//2) the value is sum_{k=r}^{K-1} 1/(k+1)^2, K = max(a, b)//2 + 1."""
    k = max(a, b) // 2 + 1
    tail = (1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 2).flip(0).cumsum(0).flip(0)
    r = torch.maximum(
        (torch.arange(a) - a // 2).abs()[:, None], (torch.arange(b) - b // 2).abs()[None]
    )
    p = tail[r]
    return p / p.norm().clamp_min(1e-12)


@functools.lru_cache(maxsize=64)
def _meta_bump(s: int) -> Tensor:
    """s x s: a bump on the top half and a negated one on the bottom half, unit l2 norm."""
    p = torch.cat([_bump(s // 2, s), -_bump(s - s // 2, s)])
    return p / p.norm()


def _pm(negative: Tensor, like: Tensor) -> Tensor:
    """-1 where ``negative``, +1 elsewhere, in ``like``'s dtype."""
    return 1 - 2 * negative.to(like.dtype)


def _window(vh: Tensor, vw: Tensor, s: int, w: int) -> Tensor:
    """(n, s*s) flat indices into h*w of the s x s windows with top-left corners (vh, vw)."""
    ar = torch.arange(s, device=vh.device)
    return ((vh[:, None, None] + ar[:, None]) * w + vw[:, None, None] + ar).flatten(1)


@register("square")
class Square(Attack):
    """Random search over square windows, accepting a proposal only if the loss improves.

    linf: start from vertical stripes (one sign per channel and column, ``+-eps``); each
    iteration sets one random s x s window of each channel to ``+-eps``, s following the
    schedule of :func:`p_selection`. l2: start from a grid of centred pseudo-Gaussian blocks
    with random signs, rescaled to ``||delta||_2 = eps``; each iteration moves the
    perturbation's mass from two random windows into the first one, adds a new pseudo-Gaussian
    bump there and rescales to ``||delta||_2 = eps`` (then the input bounds clip).

    Untargeted: minimises the logit margin ``z_y - max_{j != y} z_j`` (reported as the
    ``cw-margin`` loss); targeted: the cross-entropy of the target. A sample stops being queried
    as soon as it is broken, and each iteration costs one forward of the unbroken samples only.

    Args:
        threat: threat model (linf or l2); inputs must be images (N, C, H, W).
        n_queries: model queries per sample and restart, the initial point included (>= 1).
            Default 5000 (AutoAttack).
        p_init: initial fraction of pixels changed per iteration, in (0, 1]. Default 0.8
            (AutoAttack; the paper uses 0.05 on ImageNet and 0.3 for robust models).
        restarts: runs from a fresh random start on the points still unbroken (>= 1). Default 1.
        targeted: reach ``target`` (minimising its cross-entropy) instead.
        seed: seed of the attack's generator when the call passes none.

    Returns ``Perturbation(x_adv, queries=...)``: ``queries`` (N,) counts every row the model
    evaluated for the sample (one clean forward, then up to ``n_queries`` per restart).
    Samples misclassified on the clean input are returned unchanged after that forward.

    Differences from the reference (max-andr/square-attack ``attack.py``): windows and signs
    are drawn per sample (AutoAttack's port shares one window per batch); a linf proposal that
    would change nothing takes one of the other ``2^c - 1`` sign vectors (the reference's
    rejection loop, in one draw); window corners range over all ``h - s + 1`` positions (the
    reference's ``randint(0, h - s)`` never moves the last row and column); the l2 window side
    is capped at the image size; the l2 initial grid tiles ``(h // b) x (w // b)`` blocks of
    side ``b = min(h, w) // 5`` centred in the image (the reference's 5 x 5 grid, whose blocks
    overrun images smaller than 25 pixels).

    Example:
        >>> res = Square(ThreatModel("linf", 8 / 255), n_queries=5000)(model, x, y)
        >>> res.success.float().mean(), res.queries.float().median()
    """

    norms = ("linf", "l2")
    uses_gradients = False
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat, loss="ce" if targeted else "cw-margin", targeted=targeted, seed=seed
        )
        self.n_queries = positive_int(n_queries, "n_queries")
        self.restarts = positive_int(restarts, "restarts")
        self.p_init = number(p_init, "p_init", low=0, high=1, low_open=True)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "restarts": self.restarts,
        }

    def _rand(self, n: int, k: int, x: Tensor, generator: torch.Generator) -> Tensor:
        return torch.rand(n, k, generator=generator, device=generator.device).to(x.device)

    def _corner(self, u: Tensor, room: int) -> Tensor:
        return (u * (room + 1)).long().clamp_max(room)

    def _init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        lo, hi = self.threat.bounds
        eps = self.threat.eps
        if self.threat.norm == "linf":  # vertical stripes: one sign per (channel, column)
            u = self._rand(n, c * w, x, generator).view(n, c, 1, w)
            return (x + eps * _pm(u < 0.5, x)).clamp(lo, hi)
        b = max(min(h, w) // 5, 1)
        nh, nw = h // b, w // b
        oh, ow = (h - nh * b) // 2, (w - nw * b) // 2
        u = self._rand(n, (c + 1) * nh * nw, x, generator).view(n, c + 1, nh * nw)
        bump = _meta_bump(b).to(x)
        delta = torch.zeros_like(x)
        for k in range(nh * nw):
            i, j = oh + (k // nw) * b, ow + (k % nw) * b
            block = torch.where(u[:, c, k, None, None, None] < 0.5, bump.T, bump)
            delta[:, :, i : i + b, j : j + b] = block * _pm(u[:, :c, k, None, None] < 0.5, x)
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return (x + delta / norm * eps).clamp(lo, hi)

    def _propose_linf(self, x: Tensor, xb: Tensor, p: float, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        lo, hi = self.threat.bounds
        eps = self.threat.eps
        s = min(max(round(math.sqrt(p * h * w)), 1), max(min(h, w) - 1, 1))
        u = self._rand(n, 3 + c, x, generator)
        idx = _window(self._corner(u[:, 0], h - s), self._corner(u[:, 1], w - s), s, w)
        win = torch.zeros(n, h * w, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        win = win.view(n, 1, h, w)
        signs = u[:, 3:, None, None] < 0.5
        x_new = torch.where(win, (x + eps * _pm(signs, x)).clamp(lo, hi), xb)
        # a proposal that changes nothing repeats the window's signs: take one of the other
        # 2^c - 1 sign vectors (c > 16: a fresh draw, a repeat has probability 2^-c)
        same = (x_new - xb).abs().flatten(1).amax(1) < 1e-7
        if c <= 16:
            k = self._corner(u[:, 2], 2**c - 2) + 1
            flip = (k[:, None] >> torch.arange(c, device=x.device)) & 1 == 1
            other = signs ^ flip[:, :, None, None]
        else:
            other = self._rand(n, c, x, generator)[:, :, None, None] < 0.5
        x_other = torch.where(win, (x + eps * _pm(other, x)).clamp(lo, hi), xb)
        return torch.where(same[:, None, None, None], x_other, x_new)

    def _propose_l2(self, x: Tensor, xb: Tensor, p: float, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        lo, hi = self.threat.bounds
        eps = self.threat.eps
        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + (s % 2 == 0), h, w)  # odd, as in the reference, and at most the image
        u = self._rand(n, 5 + c, x, generator)
        idx1 = _window(self._corner(u[:, 0], h - s), self._corner(u[:, 1], w - s), s, w)
        idx2 = _window(self._corner(u[:, 2], h - s), self._corner(u[:, 3], w - s), s, w)
        m1 = torch.zeros(n, 1, h * w, dtype=torch.bool, device=x.device)
        m2 = m1.clone()
        m1.scatter_(2, idx1[:, None], True)
        m2.scatter_(2, idx2[:, None], True)
        delta = (xb - x).flatten(2)  # (n, c, h*w)
        idx1 = idx1[:, None].expand(n, c, s * s)
        old = delta.gather(2, idx1)
        norm_img = delta.flatten(1).norm(dim=1)[:, None, None]
        norm_both = (delta * (m1 | m2)).norm(dim=2, keepdim=True)  # per channel
        bump = _meta_bump(s).to(x)
        bump = torch.where(u[:, 4, None, None] < 0.5, bump.T, bump).flatten(1)[:, None]
        new = bump * _pm(u[:, 5:, None] < 0.5, x)
        new = new + old / (1e-10 + old.norm(dim=2, keepdim=True))
        mass = ((eps**2 - norm_img**2).clamp_min(0) / c + norm_both**2).sqrt()
        new = new / new.norm(dim=2, keepdim=True).clamp_min(1e-12) * mass
        delta = delta.masked_fill(m2, 0.0).scatter(2, idx1, new)
        delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None] * eps
        return (x + delta.view_as(x)).clamp(lo, hi)

    def _query(self, model: nn.Module, xq: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = model(xq)
        return self.loss(logits, y, self.targeted), is_success(logits, y, self.targeted)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        if x.dim() != 4:
            raise ValueError(f"square attacks images (N, C, H, W), got shape {tuple(x.shape)}")
        propose = self._propose_linf if self.threat.norm == "linf" else self._propose_l2
        n = x.shape[0]
        _, done = self._query(model, x, y)  # only clean-correct points are attacked
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        best_x = x.clone()
        best_loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        for _ in range(self.restarts):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xc, yc = x[idx], y[idx]
            xb = self._init(xc, generator)
            lb, succ = self._query(model, xb, yc)
            queries[idx] += 1
            for it in range(self.n_queries):
                if succ.any():  # retire broken samples: keep their point, stop querying them
                    best_x[idx[succ]], done[idx[succ]] = xb[succ], True
                    keep = ~succ
                    idx, xc, yc, xb, lb = idx[keep], xc[keep], yc[keep], xb[keep], lb[keep]
                if it == self.n_queries - 1 or idx.numel() == 0:
                    break
                x_new = propose(xc, xb, p_selection(self.p_init, it, self.n_queries), generator)
                loss, succ = self._query(model, x_new, yc)
                queries[idx] += 1
                better = (loss > lb) | succ
                xb = torch.where(better[:, None, None, None], x_new, xb)
                lb = torch.where(better, loss, lb)
            better = lb > best_loss[idx]  # unbroken: the restart's best point, if the best yet
            best_x[idx[better]], best_loss[idx[better]] = xb[better], lb[better]
        return Perturbation(best_x, queries=queries)
