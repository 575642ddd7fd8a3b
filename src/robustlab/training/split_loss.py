"""The trainer's step module, and objectives split in two halves for the features that need the
adversarial point apart from the loss taken at it.

An objective is one call, ``objective(model, x, y) -> loss``, its inner maximisation inside.
Two trainer features need the halves apart: AWP (:mod:`robustlab.training.awp`: the point x'
crafted once at the weights ``w``, the loss then taken at ``w + v``) and label smoothing (the
cross-entropy on the labels replaced by the smoothed one of Szegedy et al. 2016, "Rethinking
the Inception Architecture", arXiv:1512.00567: ``(1 - a) CE(z, y) + a * mean_k(-log p_k)``,
:func:`torch.nn.functional.cross_entropy` with ``label_smoothing=a``). :data:`SPLITS` holds
the halves of the objectives that have them, built from the objectives' own public parts
(``PGDAT.adversarial``, ``TRADES.perturb`` with :func:`trades_loss`, ``MART.perturb`` with
:func:`mart_loss`), so ``outer(craft(...))`` is the objective's loss, the same forward passes
in the same order (the tests check it). Label smoothing applies to the cross-entropy on the
labels only: natural's and pgd-at's loss, TRADES' clean term (its KL term has no labels);
MART's boosted cross-entropy has no smoothed form and refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.mart import mart_loss
from robustlab.training.objectives.trades import trades_loss

Craft = Callable[
    [Objective, nn.Module, Tensor, Tensor, ThreatModel | None, torch.Generator], Tensor
]
Outer = Callable[[Objective, nn.Module, Tensor, Tensor, Tensor, float], Tensor]


def smoothed_ce(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy with label smoothing ``smoothing`` in [0, 1) (0: the plain one)."""
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


def _trades_outer(
    obj: Objective, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, smoothing: float
) -> Tensor:
    clean = model(x)
    loss = trades_loss(clean, model(x_adv), y, obj.beta)  # type: ignore[attr-defined]
    if smoothing:  # swap the clean cross-entropy for the smoothed one
        loss = loss - F.cross_entropy(clean, y) + smoothed_ce(clean, y, smoothing)
    return loss


@dataclass(frozen=True)
class SplitLoss:
    """An objective's halves: ``craft(objective, model, x, y, threat, generator) -> x'`` and
    ``outer(objective, model, x, x', y, smoothing) -> loss``; ``awp``: AWP may wrap it;
    ``smoothing``: label smoothing applies."""

    craft: Craft
    outer: Outer
    awp: bool
    smoothing: bool


SPLITS: dict[str, SplitLoss] = {
    "natural": SplitLoss(
        craft=lambda obj, model, x, y, threat, gen: x,
        outer=lambda obj, model, x, xa, y, a: smoothed_ce(model(xa), y, a),
        awp=False,
        smoothing=True,
    ),
    "pgd-at": SplitLoss(
        craft=lambda obj, model, x, y, threat, gen: obj.adversarial(  # type: ignore[attr-defined]
            model, x, y, threat, gen
        ),
        outer=lambda obj, model, x, xa, y, a: smoothed_ce(model(xa), y, a),
        awp=True,
        smoothing=True,
    ),
    "trades": SplitLoss(
        craft=lambda obj, model, x, y, threat, gen: obj.perturb(  # type: ignore[attr-defined]
            model, x, threat, gen
        ),
        outer=_trades_outer,
        awp=True,
        smoothing=True,
    ),
    "mart": SplitLoss(
        craft=lambda obj, model, x, y, threat, gen: obj.perturb(  # type: ignore[attr-defined]
            model, x, y, threat, gen
        ),
        outer=lambda obj, model, x, xa, y, a: mart_loss(model(x), model(xa), y, obj.beta),  # type: ignore[attr-defined]
        awp=True,
        smoothing=False,
    ),
}


def supporting(feature: str) -> list[str]:
    """The objectives whose halves allow ``feature`` (``"awp"`` or ``"smoothing"``)."""
    return [name for name, s in SPLITS.items() if getattr(s, feature)]


class TrainStep(nn.Module):
    """The objective's whole loss as one module call, so that DDP sees one forward (inner
    attack included) per backward. With ``split`` (AWP or label smoothing) the loss is
    ``outer(craft(...))``, or ``outer`` at a given ``x_adv`` (AWP crafts it before it perturbs
    the weights)."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        split: SplitLoss | None = None,
        smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.split, self.smoothing = split, smoothing

    def craft(
        self, x: Tensor, y: Tensor, threat: ThreatModel | None, generator: torch.Generator
    ) -> Tensor:
        assert self.split is not None
        return self.split.craft(self.objective, self.model, x, y, threat, generator)

    def outer(self, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        assert self.split is not None
        return self.split.outer(self.objective, self.model, x, x_adv, y, self.smoothing)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
        x_adv: Tensor | None = None,
    ) -> Tensor:
        if self.split is None:
            return self.objective(self.model, x, y, threat=threat, generator=generator)
        if x_adv is None:
            x_adv = self.craft(x, y, threat, generator)
        return self.outer(x, x_adv, y)
