"""The defense registry: ``create(name, model, **options) -> Defense``."""

from __future__ import annotations

from typing import Any

from torch import nn

from robustlab.defenses.base import Defense
from robustlab.registry import Registry

DEFENSES: Registry[type[Defense]] = Registry("defense")
register = DEFENSES.register


def create(name: str, model: nn.Module, **options: Any) -> Defense:
    """Wrap ``model`` in the registered defense ``name``; an option it does not take raises
    ``TypeError`` "defense <name>: unknown option X; its options are: ..."."""
    return DEFENSES.create(name, model, **options)


def names(pattern: str | None = None) -> list[str]:
    """Registered defense names, sorted; ``pattern`` filters with shell wildcards."""
    return DEFENSES.names(pattern)
