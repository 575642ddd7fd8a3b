"""Exact robustness of a linear classifier under box constraints: the oracle attacks must reach.

For ``z = W x + b`` a point is broken at radius eps iff some class ``j != y`` can overtake ``y``:
``max_{d in ball(eps) ∩ box} a_j . d >= c_j`` with ``a_j = w_j - w_y`` and
``c_j = (w_y - w_j) . x + b_y - b_j``. The maximum of a linear function over ball ∩ box has a
closed form per norm (linf: a signed corner clipped to the box; l1: fractional knapsack; l2:
``clip(t a, box)`` with ``t`` found by bisection), so robustness at any eps is exact and the
minimal adversarial norm follows by bisection on eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import make_quadrants

_STEPS = 60


class Linear(nn.Module):
    """``W flatten(x) + b``."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def train_linear(seed: int = 0, size: int = 8) -> tuple[Linear, Tensor, Tensor]:
    """A linear model trained on 8x8 quadrant images, and 300 test points."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Linear(size * size, 4)
        xt, yt = make_quadrants(1024, seed=seed + 10, size=size)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(model(xt), yt).backward()
            opt.step()
    model.eval().requires_grad_(False)
    x, y = make_quadrants(300, seed=seed + 11, size=size)
    return model, x, y


def _max_linear(a: Tensor, lo: Tensor, hi: Tensor, norm: str, eps: Tensor) -> Tensor:
    """max a.d over ||d|| <= eps, lo <= d <= hi (lo <= 0 <= hi), row-wise; (N,)."""
    if norm == "linf":
        d = torch.where(a > 0, hi.clamp(max=eps[:, None]), lo.clamp(min=-eps[:, None]))
        return (a * d).sum(1)
    reach = torch.where(a > 0, hi, lo)  # the farthest each coordinate can go usefully
    if norm == "l1":
        order = a.abs().argsort(dim=1, descending=True)
        gain, room = a.abs().gather(1, order), reach.abs().gather(1, order)
        spent_before = room.cumsum(1) - room
        take = (eps[:, None] - spent_before).clamp(min=0).minimum(room)
        return (gain * take).sum(1)
    # l2: d(t) = clip(t a, lo, hi); ||d(t)|| grows with t; full reach if it fits
    full = (a * reach).sum(1)
    fits = reach.norm(dim=1) <= eps
    t_lo, t_hi = torch.zeros_like(eps), torch.full_like(eps, 1e6)
    for _ in range(200):
        t = (t_lo + t_hi) / 2
        inside = (t[:, None] * a).clamp(lo, hi).norm(dim=1) <= eps
        t_lo, t_hi = torch.where(inside, t, t_lo), torch.where(inside, t_hi, t)
    val = (a * (t_lo[:, None] * a).clamp(lo, hi)).sum(1)
    return torch.where(fits, full, val)


def exact_broken(
    model: Linear,
    x: Tensor,
    y: Tensor,
    norm: str,
    eps: float | Tensor,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Bool (N,): an adversarial example exists within ``eps`` (or x is misclassified)."""
    w, b = model.fc.weight.double(), model.fc.bias.double()
    xf = x.flatten(1).double()
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(len(x)).clone()
    lo, hi = bounds[0] - xf, bounds[1] - xf
    broken = torch.zeros(len(x), dtype=torch.bool)
    for j in range(w.shape[0]):
        a = w[j][None] - w[y]
        c = -(xf * a).sum(1) - (b[j] - b[y])
        gain = _max_linear(a, lo, hi, norm, eps)
        broken |= (j != y) & (gain >= c)
    return broken


def exact_min_norm(
    model: Linear, x: Tensor, y: Tensor, norm: str, bounds: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    """(N,): the smallest adversarial perturbation norm (inf if none within the box)."""
    top = {"linf": 1.0, "l2": float(x[0].numel()) ** 0.5, "l1": float(x[0].numel())}[norm]
    top *= bounds[1] - bounds[0]
    lo = torch.zeros(len(x), dtype=torch.float64)
    hi = torch.full((len(x),), top, dtype=torch.float64)
    reachable = exact_broken(model, x, y, norm, hi, bounds)
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        br = exact_broken(model, x, y, norm, mid, bounds)
        lo, hi = torch.where(br, lo, mid), torch.where(br, mid, hi)
    return torch.where(reachable, hi, torch.full_like(hi, float("inf")))
