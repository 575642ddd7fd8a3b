"""Training objectives: ``loss(model, x, y, *, threat, generator, **options) -> scalar Tensor``.

Each method lives in a file of its own and registers itself here. The trainer owns the
optimiser, schedule, checkpoints and logging; an objective only says what to minimise.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from robustlab.registry import Registry

Objective = Callable[..., Tensor]
OBJECTIVES: Registry[Objective] = Registry("objective")
register = OBJECTIVES.register


def get(name: str) -> Objective:
    """The registered objective ``name``; ValueError listing the valid ones if unknown."""
    return OBJECTIVES.get(name)


def names(pattern: str | None = None) -> list[str]:
    return OBJECTIVES.names(pattern)


from robustlab.training.objectives import natural, pgd_at  # noqa: E402,F401  (registration)
