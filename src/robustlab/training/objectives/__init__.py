"""Training objectives, one file per method, each registered here by name.

``create(name, **options)`` builds one (an :class:`~robustlab.training.objectives.base.Objective`);
``names()`` lists them. The contract is in ``base.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from robustlab.registry import Registry
from robustlab.training.objectives.base import Objective

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register(name: str):
    """Class decorator: register an :class:`Objective` subclass under ``name``."""
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        return OBJECTIVES.register(name)(cls)
    return add


def get(name: str) -> type[Objective]:
    """The registered objective class ``name``; ValueError listing the valid ones if unknown."""
    return OBJECTIVES.get(name)


def create(name: str, **options: Any) -> Objective:
    """An instance of objective ``name`` with ``options`` (TypeError naming the valid ones)."""
    cls = get(name)
    try:
        return cls(**options)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise TypeError(f"objective {name!r}: {e}; its options are: "
                        f"{', '.join(valid) or 'none'}") from None


def names(pattern: str | None = None) -> list[str]:
    return OBJECTIVES.names(pattern)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")  # each file registers itself
