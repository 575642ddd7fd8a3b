"""Training objectives, one file per method, each registered here by name.

``create(name, **options)`` builds one (an :class:`~robustlab.training.objectives.base.Objective`);
``names()`` lists them. The contract is in ``base.py``.

How to add one: in a new file of this package, subclass
:class:`~robustlab.training.objectives.base.Objective`, take the options as keyword arguments
of ``__init__`` (checked with :mod:`robustlab._validate`, reported by ``config()``),
implement ``loss(model, x, y, threat, generator) -> scalar`` (override the hooks of ``base.py``
only if the method needs them), and decorate the class with ``@register("my-objective")``,
which also sets its ``name``; the file registers itself on import. An inner maximisation is
not a new loop: build a :class:`robustlab.attacks.PGD` and call its ``craft`` with the
objective's own ``loss`` and ``start`` if it needs them (as TRADES and MART do); the
objectives' contract test then covers the new objective.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from robustlab.registry import Registry
from robustlab.training.objectives.base import Objective

OBJECTIVES: Registry[type[Objective]] = Registry("objective")
#: class decorator: ``@register("name")`` registers an :class:`Objective` subclass and sets its
#: ``name``
register = OBJECTIVES.register


def get(name: str) -> type[Objective]:
    """The registered objective class ``name``; ValueError listing the valid ones if unknown."""
    return OBJECTIVES.get(name)


def create(name: str, **options: Any) -> Objective:
    """An instance of objective ``name`` with ``options``, through ``OBJECTIVES.create`` (an
    unknown option raises TypeError "objective <name>: unknown option X; its options are:
    ...")."""
    return OBJECTIVES.create(name, **options)


def names(pattern: str | None = None) -> list[str]:
    return OBJECTIVES.names(pattern)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")  # each file registers itself
