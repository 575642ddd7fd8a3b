"""Attacks: ``create(name, threat, **options)(model, x, y) -> AttackResult``.

Every module of this package holds one attack family and registers it on import; all are
imported here, so ``names()`` lists every attack the package ships.
"""

import importlib
import pkgutil

from robustlab.attacks.base import Attack, AttackResult, Perturbation
from robustlab.attacks.bpda import BPDA
from robustlab.attacks.losses import loss_names
from robustlab.attacks.registry import ATTACKS, create, create_for_evaluation, names

_SUPPORT = {"base", "bpda", "eot", "losses", "registry"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _SUPPORT and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ATTACKS", "Attack", "AttackResult", "BPDA", "Perturbation", "create", "create_for_evaluation",
    "loss_names", "names",
]
