"""The threat model: an lp ball of radius eps around each input (or, for l0, at most eps changed
pixels), intersected with the input bounds.

This is the only module that knows norm geometry. Attacks, training objectives, smoothing, the
evaluation and the report all take a :class:`ThreatModel` and never re-derive eps, norms or
clipping themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab._eps import CONTINUOUS_NORMS, NORMS, box_diameter, parse_eps, pixel_budget

__all__ = ["CONTINUOUS_NORMS", "NORMS", "ThreatModel", "as_pixels", "parse_eps"]

_BISECTION_STEPS = 60


def _flat(t: Tensor) -> Tensor:
    return t.flatten(1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector (N,) to broadcast against ``like`` (N, ...), any rank."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def as_pixels(t: Tensor) -> Tensor:
    """The pixel view the l0 threat model counts in: (N, C, P), the C channels of each of the P
    pixels of (N, C, ...) inputs along dim 1; (N, D) inputs are D one-channel pixels."""
    return t.flatten(2) if t.dim() > 2 else t[:, None]


@dataclass(frozen=True)
class ThreatModel:
    """An lp ball of radius ``eps`` around each input, inside the box ``bounds``.

    Args:
        norm: ``"linf"``, ``"l2"``, ``"l1"``, or ``"l0"``: at most ``eps`` changed pixels, a
            pixel (a position of the (N, C, H, W) input, its C channels together; each value
            of an (N, D) input) counting as changed if any of its channels differs from ``x``.
        eps: radius in input units (inputs in ``bounds``, default [0, 1]); ``"8/255"`` accepted.
            l0: a number of pixels, an integer >= 1 (kept as an ``int``).
        bounds: (low, high) valid input range, applied element-wise.

    All methods take batched tensors of shape (N, ...) and treat each sample separately.
    """

    norm: str
    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid norms are: {', '.join(NORMS)}")
        eps = parse_eps(self.eps)
        if self.norm == "l0":
            eps = pixel_budget(eps)
        elif not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        object.__setattr__(self, "eps", eps)
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds must be a pair (low, high), got {self.bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with low < high, got {self.bounds!r}")
        object.__setattr__(self, "bounds", (lo, hi))

    # --- geometry -------------------------------------------------------------------------
    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample lp distance ||x_adv - x||, shape (N,); l0: the exact number of changed
        pixels (as a float, at least float32)."""
        if self.norm == "l0":
            changed = (as_pixels(x_adv) != as_pixels(x)).any(dim=1).sum(dim=1)
            return changed.to(torch.promote_types(x.dtype, torch.float32))
        d = _flat(x_adv - x)
        if self.norm == "linf":
            return d.abs().amax(dim=1) if d.shape[1] else d.new_zeros(d.shape[0])
        return d.norm(p=2 if self.norm == "l2" else 1, dim=1)

    def tolerance(self) -> float:
        """Slack allowed by :meth:`contains` for floating-point rounding (none for l0: a pixel
        count is exact)."""
        return 0.0 if self.norm == "l0" else 1e-5 * max(self.eps, 1.0) + 1e-6

    def contains(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Boolean mask (N,): sample inside the ball (up to rounding; l0: the exact count) and
        inside the bounds."""
        lo, hi = self.bounds
        tol = self.tolerance()
        in_ball = self.distance(x_adv, x) <= self.eps + tol
        in_box = (_flat(x_adv) >= lo - 1e-6).all(1) & (_flat(x_adv) <= hi + 1e-6).all(1)
        return in_ball & in_box & torch.isfinite(_flat(x_adv)).all(1)

    def check(self, x_adv: Tensor, x: Tensor, who: str = "attack") -> None:
        """Raise ``RuntimeError`` if a sample left the ball or the bounds (never clip silently)."""
        bad = ~self.contains(x_adv, x)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise RuntimeError(
                f"{who} returned {int(bad.sum())} point(s) outside the {self.norm} ball of radius "
                f"{self.eps} or the bounds {self.bounds} (first: sample {i}, distance "
                f"{float(self.distance(x_adv[i : i + 1], x[i : i + 1])):.6g}, range "
                f"[{float(x_adv[i].min()):.6g}, {float(x_adv[i].max()):.6g}]); "
                f"this is a bug in {who}"
            )

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The Euclidean projection of ``x_adv`` onto (ball around ``x``) ∩ bounds: the nearest
        feasible point.

        linf: a clamp. l2 and l1: exact Euclidean projection onto ball ∩ box by bisection on the
        Lagrange multiplier (coordinates ``clip(shrink(v, lam), box)``), so the result is the
        nearest feasible point, not a clip after a rescale. l0: :meth:`_project_l0`.
        """
        lo, hi = self.bounds
        if self.norm == "l0":
            return self._project_l0(x_adv, x)
        if self.eps == 0:
            return x.clone()
        if self.norm == "linf":
            delta = (x_adv - x).clamp(-self.eps, self.eps)
            return (x + delta).clamp(lo, hi)
        v = _flat(x_adv - x)
        box_lo, box_hi = _flat(lo - x), _flat(hi - x)
        d = torch.minimum(torch.maximum(v, box_lo), box_hi)
        over = self._norm(d) > self.eps
        if over.any():
            d = d.clone()
            d[over] = self._bisect(v[over], box_lo[over], box_hi[over])
        return (x + d.reshape(x.shape)).clamp(lo, hi)

    def _project_l0(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Keep the ``eps`` pixels whose change, clipped to the box, brings ``x_adv`` closest,
        reset the others to ``x``: the Euclidean projection onto (at most eps changed pixels) ∩
        box (Croce & Hein 2019, "Sparse and Imperceivable Adversarial Attacks"). A pixel's
        gain is ``||d||^2 - ||d - clip(d)||^2`` over its channels (``d = x_adv - x``), its
        squared change when ``x_adv`` is inside the box; ties go to the lower pixel index."""
        lo, hi = self.bounds
        xa, x0 = as_pixels(x_adv), as_pixels(x)
        inside = xa.clamp(lo, hi)
        d = xa - x0
        gain = d.square().sum(1) - (xa - inside).square().sum(1)  # (N, P)
        k = min(int(self.eps), gain.shape[1])
        top = gain.sort(dim=1, descending=True, stable=True).indices[:, :k]
        keep = torch.zeros_like(gain, dtype=torch.bool).scatter_(1, top, True)
        return torch.where(keep[:, None], inside, x0).reshape(x.shape)

    def _norm(self, d: Tensor) -> Tensor:
        return d.norm(p=2 if self.norm == "l2" else 1, dim=1)

    def _shrink(self, v: Tensor, lam: Tensor, box_lo: Tensor, box_hi: Tensor) -> Tensor:
        if self.norm == "l2":
            s = v / (1 + lam)
        else:  # l1: soft threshold
            s = v.sign() * (v.abs() - lam).clamp_min(0)
        return torch.minimum(torch.maximum(s, box_lo), box_hi)

    def _bisect(self, v: Tensor, box_lo: Tensor, box_hi: Tensor) -> Tensor:
        """Solve ||shrink(v, lam)|| = eps for the multiplier lam >= 0 of each row."""
        lam_lo = v.new_zeros(v.shape[0], 1)
        if self.norm == "l2":
            # ||v / (1 + lam)|| <= eps once 1 + lam >= ||v|| / eps
            lam_hi = (v.norm(dim=1, keepdim=True) / max(self.eps, 1e-30)).clamp_min(1.0)
        else:
            lam_hi = v.abs().amax(dim=1, keepdim=True)
        for _ in range(_BISECTION_STEPS):
            mid = (lam_lo + lam_hi) / 2
            feasible = self._norm(self._shrink(v, mid, box_lo, box_hi)) <= self.eps
            lam_hi = torch.where(feasible[:, None], mid, lam_hi)
            lam_lo = torch.where(feasible[:, None], lam_lo, mid)
        return self._shrink(v, lam_hi, box_lo, box_hi)  # the feasible side

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the ball around ``x``, then projected into the bounds;
        l0: ``eps`` pixels drawn uniformly without replacement (all of them if fewer), each
        channel of them set uniformly in the bounds."""
        gen_device = generator.device if generator is not None else x.device
        shape = (x.shape[0], math.prod(x.shape[1:]))
        if self.norm == "l0":
            return self._random_pixels(x, generator, gen_device)
        if self.norm == "linf":
            u = torch.rand(shape, generator=generator, device=gen_device, dtype=x.dtype)
            d = (2 * u - 1) * self.eps
        elif self.norm == "l2":
            g = torch.randn(shape, generator=generator, device=gen_device, dtype=x.dtype)
            r = torch.rand(shape[0], 1, generator=generator, device=gen_device, dtype=x.dtype)
            d = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12) * self.eps * r ** (1 / shape[1])
        else:
            # uniform in the l1 ball: exponentials over their sum plus one more, random signs
            e = torch.empty(shape[0], shape[1] + 1, device=gen_device, dtype=x.dtype)
            e.exponential_(generator=generator)
            signs = torch.randint(0, 2, shape, generator=generator, device=gen_device) * 2 - 1
            d = signs * e[:, :-1] / e.sum(dim=1, keepdim=True) * self.eps
        d = d.to(x.device).reshape(x.shape)
        lo, hi = self.bounds
        return (x + d).clamp(lo, hi)  # clamping moves coordinates towards x: stays in the ball

    def _random_pixels(
        self, x: Tensor, generator: torch.Generator | None, gen_device: torch.device
    ) -> Tensor:
        lo, hi = self.bounds
        px = as_pixels(x)
        n, c, p = px.shape
        k = min(int(self.eps), p)
        order = torch.rand(n, p, generator=generator, device=gen_device).argsort(dim=1)
        values = torch.rand(n, c, k, generator=generator, device=gen_device, dtype=x.dtype)
        chosen = order[:, :k].to(x.device)[:, None].expand(n, c, k)
        out = px.clone().scatter_(2, chosen, (lo + (hi - lo) * values).to(x.device))
        return out.reshape(x.shape)

    def drop_blocked(self, x: Tensor, direction: Tensor) -> Tensor:
        """``direction`` with zeros where ``x`` sits on a bound and ``direction`` points out of
        the box (at ``low`` and negative, at ``high`` and positive): the box-aware mask of the
        sparse l1 steps, so they spend their coordinates on ones that can move (Croce & Hein
        2021). Same shape as ``direction``; the other coordinates are unchanged."""
        lo, hi = self.bounds
        return direction.masked_fill(
            ((x <= lo) & (direction < 0)) | ((x >= hi) & (direction > 0)), 0
        )

    def steepest_step(self, grad: Tensor, step_size: float, *, l1_sparsity: float = 0.01) -> Tensor:
        """The steepest-ascent step of lp length ``step_size`` for gradient ``grad``.

        linf: ``step * sign(g)``; l2: ``step * g / ||g||``; l1: the sign of the largest
        ``l1_sparsity`` fraction of coordinates (at least one), each ``step / k`` (SLIDE-style,
        Tramèr & Boneh 2019), since the exact l1 steepest step moves one pixel at a time;
        l0: the dense step ``step * g / ||g||_1`` of Croce & Hein's PGD_0 (2019), which
        :meth:`project` then makes sparse. A zero gradient gives a zero step.
        """
        if self.norm == "linf":
            return step_size * grad.sign()
        g = _flat(grad)
        if self.norm == "l0":
            step = g / g.abs().sum(dim=1, keepdim=True).clamp_min(1e-12) * step_size
        elif self.norm == "l2":
            step = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12) * step_size
        else:
            k = max(1, int(round(l1_sparsity * g.shape[1])))
            idx = g.abs().topk(k, dim=1).indices
            step = torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx).sign() * (step_size / k))
        return step.reshape(grad.shape)

    def box_diameter(self, shape: Sequence[int]) -> float:
        """The largest distance between two inputs of shape ``shape`` (one sample's, e.g.
        (C, H, W)) inside the bounds, in this threat's units: the smallest eps whose ball
        around any point of the box covers the whole box (:func:`robustlab._eps.box_diameter`;
        l0: the number of pixels, see :func:`as_pixels`)."""
        lo, hi = self.bounds
        return box_diameter(self.norm, shape, hi - lo)

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "bounds": list(self.bounds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThreatModel:
        return cls(d["norm"], d["eps"], tuple(d.get("bounds", (0.0, 1.0))))

    def __str__(self) -> str:
        return f"{self.norm} eps={self.eps:g} bounds={list(self.bounds)}"
