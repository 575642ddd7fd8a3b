"""Sparse-RS (Croce, Andriushchenko, Singh, Flammarion, Hein, AAAI 2022, "Sparse-RS: a
versatile framework for query-efficient sparse black-box adversarial attacks",
https://arxiv.org/abs/2006.12834), its l0 (pixel) version.

Distance: l0 (pixels). Score-based: it reads only the model's logits, under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel, as_pixels

# (rescaled iteration bound, divisor of alpha_init) of the reference's l0 schedule
_SCHEDULE = (
    (0, 1),
    (50, 2),
    (200, 4),
    (500, 5),
    (1000, 6),
    (2000, 8),
    (4000, 10),
    (6000, 12),
    (8000, 15),
)


def alpha_schedule(alpha_init: float, it: int, n_queries: int) -> float:
    """Fraction of the perturbed pixels swapped at iteration ``it`` of ``n_queries``:
    ``alpha_init`` at 0, then divided by 2, 4, 5, 6, 8, 10, 12, 15 up to the reference's
    checkpoints 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000, and by 20 after (the
    iteration index rescaled to a 10,000 budget)."""
    i = int(it / n_queries * 10000)
    return alpha_init / next((div for bound, div in _SCHEDULE if i <= bound), 20)


def _spread(idx: Tensor, c: int) -> Tensor:
    """(n, m) pixel indices -> (n, c, m), to gather or scatter every channel of them."""
    return idx[:, None].expand(idx.shape[0], c, idx.shape[1])


@register("sparse-rs")
class SparseRS(Attack):
    """Random search over sets of ``k = eps`` pixels set to corners of the box, accepting a
    proposal only if the loss improves.

    Start: ``k`` random pixels, each channel of them set to ``low`` or ``high`` at random.
    Each iteration restores ``m = max(int(alpha * k), 1)`` random pixels of the set to ``x`` and
    moves the set to ``m`` random pixels outside it, with new random corner colours, ``alpha``
    following :func:`alpha_schedule`. A new pixel whose colour equals ``x`` there (``x`` on a
    corner) gets one random channel flipped, so every pixel of the set is changed.

    Untargeted: minimises the logit margin ``z_y - max_{j != y} z_j`` (reported as the
    ``cw-margin`` loss); targeted: the cross-entropy of the target (as the reference). A sample
    stops being queried as soon as it is broken; each iteration costs one forward of the
    unbroken samples only, no backward.

    Args:
        threat: an l0 threat model: ``eps`` pixels (all of them if the input has fewer).
        n_queries: model queries per sample and restart, the start included (>= 1). Default
            10,000 (the paper's untargeted l0 budget; it uses 100,000 targeted).
        alpha_init: initial fraction of the set swapped per iteration, in (0, 1]. Default 0.3
            (the paper's untargeted l0 value on ImageNet; 0.1 targeted).
        restarts: runs from a fresh random start on the points still unbroken (>= 1). Default 1.
        targeted: reach ``target`` (minimising its cross-entropy) instead.
        seed: seed of the attack's generator when the call passes none.

    Returns ``Perturbation(x_adv, queries=...)``: ``queries`` (N,) counts every row the model
    evaluated for the sample (one clean forward, then up to ``n_queries`` per restart).
    Samples misclassified on the clean input are returned unchanged after that forward.
    Pixels: the positions of (N, C, ...) inputs, all C channels together (see
    :func:`robustlab.threat.as_pixels`).

    Differences from the reference (fra31/sparse-rs ``rs_attacks.py``): the pixels swapped are
    drawn per sample (the reference shares their positions in the set across the batch); the
    colour of every new pixel differs from ``x`` there (the reference ensures it only when
    one pixel is swapped, by rejection); with ``k`` >= the number of pixels the iteration
    recolours ``m`` pixels of the set instead of swapping them (the reference needs
    ``k`` < the number of pixels).

    Example:
        >>> res = SparseRS(ThreatModel("l0", 10), n_queries=10000)(model, x, y)
        >>> res.success.float().mean(), res.queries.float().median()
    """

    norms = ("l0",)
    uses_gradients = False
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_queries: int = 10000,
        alpha_init: float = 0.3,
        restarts: int = 1,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat, loss="ce" if targeted else "cw-margin", targeted=targeted, seed=seed
        )
        self.n_queries = positive_int(n_queries, "n_queries")
        self.alpha_init = number(alpha_init, "alpha_init", low=0, high=1, low_open=True)
        self.restarts = positive_int(restarts, "restarts")

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "n_queries": self.n_queries,
            "alpha_init": self.alpha_init,
            "restarts": self.restarts,
        }

    def _rand(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(like.device)

    def _corners(self, x_at: Tensor, generator: torch.Generator) -> Tensor:
        """Random colours in {low, high}^C for the pixels ``x_at`` (n, C, m) of ``x``, each
        different from ``x_at`` in at least one channel."""
        n, c, m = x_at.shape
        lo, hi = x_at.new_tensor(self.threat.bounds[0]), x_at.new_tensor(self.threat.bounds[1])
        u = self._rand((n, c + 1, m), x_at, generator)
        high = u[:, :c] < 0.5
        same = (torch.where(high, hi, lo) == x_at).all(dim=1, keepdim=True)
        channel = (u[:, c:] * c).long().clamp_max(c - 1)  # the one to flip where same
        flip = same & (torch.arange(c, device=x_at.device)[None, :, None] == channel)
        return torch.where(high ^ flip, hi, lo)

    def _start(self, xc: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random set of ``k`` pixels in corner colours; (point, pixel order: the set first)."""
        n, c, p = xc.shape
        order = self._rand((n, p), xc, generator).argsort(dim=1)
        chosen = _spread(order[:, :k], c)
        return xc.scatter(2, chosen, self._corners(xc.gather(2, chosen), generator)), order

    def _propose(
        self, xc: Tensor, xb: Tensor, order: Tensor, k: int, m: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Swap ``m`` random pixels of the set (the first ``k`` of ``order``) for ``m``
        outside it; (point, new order)."""
        n, c, p = xc.shape
        m = min(m, p - k) if p > k else m
        pos_out = self._rand((n, k), xc, generator).topk(m, dim=1).indices
        pos_in = (
            k + self._rand((n, p - k), xc, generator).topk(m, dim=1).indices if p > k else pos_out
        )  # no pixel outside the set: recolour its own
        out_px, in_px = order.gather(1, pos_out), order.gather(1, pos_in)
        new_order = order.scatter(1, pos_out, in_px).scatter(1, pos_in, out_px)
        gone, new = _spread(out_px, c), _spread(in_px, c)
        x_new = xb.scatter(2, gone, xc.gather(2, gone))
        return x_new.scatter(2, new, self._corners(xc.gather(2, new), generator)), new_order

    def _query(
        self, model: nn.Module, xq: Tensor, y: Tensor, shape: torch.Size
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = model(xq.reshape((len(xq),) + shape[1:]))
        return self.loss(logits, y, self.targeted), is_success(logits, y, self.targeted)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        px = as_pixels(x)
        n, _, p = px.shape
        k = min(int(self.threat.eps), p)
        _, done = self._query(model, px, y, x.shape)  # only clean-correct points are attacked
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        best_x = px.clone()
        best_loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        for _ in range(self.restarts):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xc, yc = px[idx], y[idx]
            xb, order = self._start(xc, k, generator)
            lb, succ = self._query(model, xb, yc, x.shape)
            queries[idx] += 1
            for it in range(1, self.n_queries + 1):
                if succ.any():  # retire broken samples: keep their point, stop querying them
                    best_x[idx[succ]], done[idx[succ]] = xb[succ], True
                    keep = ~succ
                    idx, xc, yc, xb, lb, order = (
                        idx[keep],
                        xc[keep],
                        yc[keep],
                        xb[keep],
                        lb[keep],
                        order[keep],
                    )
                if it == self.n_queries or idx.numel() == 0:
                    break
                m = max(int(alpha_schedule(self.alpha_init, it, self.n_queries) * k), 1)
                x_new, new_order = self._propose(xc, xb, order, k, m, generator)
                loss, succ = self._query(model, x_new, yc, x.shape)
                queries[idx] += 1
                better = (loss > lb) | succ
                xb = torch.where(better[:, None, None], x_new, xb)
                order = torch.where(better[:, None], new_order, order)
                lb = torch.where(better, loss, lb)
            better = lb > best_loss[idx]  # unbroken: the restart's best point, if the best yet
            best_x[idx[better]], best_loss[idx[better]] = xb[better], lb[better]
        return Perturbation(best_x.reshape(x.shape), queries=queries)
