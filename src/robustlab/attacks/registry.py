"""The attack registry: ``create(name, threat, **options)``."""

from __future__ import annotations

from typing import Any

from robustlab.registry import Registry
from robustlab.threat import ThreatModel

ATTACKS: Registry[type] = Registry("attack")
register = ATTACKS.register


def create(name: str, threat: ThreatModel, **options: Any):
    """Build the registered attack ``name`` for ``threat``; unknown options raise TypeError."""
    cls = ATTACKS.get(name)
    try:
        return cls(threat, **options)
    except TypeError as e:
        raise TypeError(f"attack {name!r}: {e}") from None


def names(pattern: str | None = None) -> list[str]:
    """Registered attack names, optionally filtered by a shell pattern."""
    return ATTACKS.names(pattern)
