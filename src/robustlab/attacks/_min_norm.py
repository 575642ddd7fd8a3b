"""What every minimum-norm attack does with its search: keep each sample's smallest adversarial
point, and hand back a result that keeps the ``min_norm`` contract of :class:`AttackResult`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Perturbation
from robustlab.attacks.losses import is_success
from robustlab.threat import ThreatModel, _per_sample


class Smallest:
    """Per sample, the smallest adversarial point seen so far: ``x`` (N, ...) and ``norm`` (N,),
    ``inf`` until one is found, 0 for the points in ``misclassified`` (adversarial already)."""

    def __init__(self, threat: ThreatModel, x: Tensor, misclassified: Tensor) -> None:
        self.threat, self.x0 = threat, x
        self.x = x.clone()
        self.norm = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
        self.norm[misclassified] = 0.0

    def update(self, idx: Tensor, xa: Tensor, adversarial: Tensor) -> None:
        """Offer the points ``xa`` of the samples ``idx``; ``adversarial`` (bool) says which
        are adversarial. Keeps each one that beats the sample's smallest."""
        norm = self.threat.distance(xa, self.x0[idx])
        better = adversarial & (norm < self.norm[idx])
        if better.any():
            j = idx[better]
            self.x[j], self.norm[j] = xa[better], norm[better]

    def unsolved(self, within_eps: bool) -> Tensor:
        """Bool (N,): samples worth attacking further: all those not misclassified clean, or
        (``within_eps``) those without an adversarial inside the eps ball."""
        if within_eps:
            return self.norm > self.threat.eps + self.threat.tolerance()
        return self.norm > 0

    def result(self, model: nn.Module, y: Tensor, targeted: bool = False) -> Perturbation:
        """``x_adv``: the smallest adversarial point where it lies inside the eps ball, else its
        nearest point of the ball (the clean point if none was found). ``min_norm``: the smallest
        norm, lowered to the distance of a projected point that turns out adversarial, and set
        to ``inf`` for the rare point that fails the final check (rounding at the boundary), so
        that ``min_norm <= eps + tolerance`` exactly where ``x_adv`` is adversarial."""
        threat = self.threat
        inside = self.norm <= threat.eps + threat.tolerance()
        x_adv = torch.where(_per_sample(inside, self.x), self.x, threat.project(self.x, self.x0))
        with torch.no_grad():
            success = is_success(model(x_adv), y, targeted)
        dist = threat.distance(x_adv, self.x0)
        min_norm = torch.where(success & ~inside, dist, self.norm)
        min_norm = min_norm.masked_fill(~success & inside, float("inf"))
        return Perturbation(x_adv, min_norm=min_norm)


class ConstantSearch:
    """Carlini & Wagner's per-sample binary search on the constant ``c`` that weighs the
    attack's loss against the distance (C&W-l2, EAD, L-BFGS-B).

    ``const`` (N,) starts at ``initial``; after a search step, :meth:`update` moves each
    attacked sample's bounds: on success the upper bound becomes ``c``, on failure the lower
    bound does; ``c`` becomes the midpoint once an upper bound exists, else ``10 c``. With
    ``last_at_upper`` and at least 10 search steps, the last step runs at the upper bound (the
    reference code of C&W and EAD).

    With ``bisect=False`` (C&W-l0's search) ``c`` only grows: a failure multiplies it by
    ``factor``, a success keeps it (the caller decides at which ``c`` a sample gives up).
    """

    def __init__(
        self,
        like: Tensor,
        initial: float,
        steps: int,
        last_at_upper: bool = True,
        *,
        factor: float = 10.0,
        bisect: bool = True,
    ) -> None:
        self.const = torch.full((len(like),), initial, device=like.device, dtype=like.dtype)
        self.lower = torch.zeros_like(self.const)
        self.upper = torch.full_like(self.const, 1e10)
        self.steps, self.last_at_upper = steps, last_at_upper
        self.factor, self.bisect = factor, bisect

    def at(self, search: int) -> Tensor:
        """The constants (N,) of search step ``search`` (0-based)."""
        if self.last_at_upper and self.steps >= 10 and search == self.steps - 1:
            self.const = self.upper.clone()
        return self.const

    def update(self, idx: Tensor, hit: Tensor) -> None:
        """The samples ``idx`` were attacked in this search step; ``hit`` (bool) says which
        reached an adversarial point."""
        c, lo, up = self.const[idx], self.lower[idx], self.upper[idx]
        up = torch.where(hit, torch.minimum(up, c), up)
        lo = torch.where(hit, lo, torch.maximum(lo, c))
        if self.bisect:
            c = torch.where(up < 1e9, (lo + up) / 2, c * self.factor)
        else:
            c = torch.where(hit, c, c * self.factor)
        self.const[idx], self.lower[idx], self.upper[idx] = c, lo, up
