"""The defense registry: ``create(name, model, **options) -> nn.Module``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from robustlab.registry import Registry

DEFENSES: Registry[type[nn.Module]] = Registry("defense")
register = DEFENSES.register


def create(name: str, model: nn.Module, **options: Any) -> nn.Module:
    """Wrap ``model`` in the registered defense ``name``; unknown options raise a TypeError
    naming the valid ones."""
    cls = DEFENSES.get(name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        return cls(model, **options)
    except TypeError as e:
        valid = [p for p in inspect.signature(cls).parameters if p not in ("self", "model")]
        raise TypeError(f"defense {name!r}: {e}; its options are: "
                        f"{', '.join(valid) or 'none'}") from None


def names(pattern: str | None = None) -> list[str]:
    """Registered defense names, sorted; ``pattern`` filters with shell wildcards."""
    return DEFENSES.names(pattern)
