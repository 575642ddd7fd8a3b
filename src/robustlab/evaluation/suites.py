"""Named attack suites: each a list of ``(attack name, options)`` run as a cascade.

``evaluate`` runs the attacks in order, each only on the points still robust after the previous
ones, so the result is the per-sample worst case over the whole list.
"""

from __future__ import annotations

from typing import Any

from robustlab.registry import Registry

AttackSpec = tuple[str, dict[str, Any]]
SUITES: Registry[list[AttackSpec]] = Registry("suite")

SUITES.register("quick")([("fgsm", {}), ("pgd", {"steps": 20})])
SUITES.register("pgd")([
    ("pgd", {"steps": 20}),
    ("pgd", {"steps": 100, "restarts": 5}),
])
SUITES.register("pgd-strong")([
    ("pgd", {"steps": 20}),
    ("pgd", {"steps": 100, "restarts": 5}),
    ("pgd", {"steps": 100, "restarts": 5, "loss": "cw-margin"}),
])


def suite_attacks(name: str) -> list[AttackSpec]:
    """The attack list of suite ``name`` (a copy); ValueError listing valid suites if unknown."""
    return [(a, dict(o)) for a, o in SUITES.get(name)]


def names(pattern: str | None = None) -> list[str]:
    return SUITES.names(pattern)
