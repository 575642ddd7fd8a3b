"""Attacks: ``create(name, threat, **options)(model, x, y) -> AttackResult``.

Every module of this package holds one attack family and registers it on import; all are
imported here, so ``names()`` lists every attack the package ships. :class:`PGD` is the one
gradient-ascent loop: FGSM, MI-FGSM, C&W-linf, EPGD, SmoothAdv and the training objectives
(PGD-AT, TRADES, MART, ...) run it with their own loss, start and step rule
(:mod:`robustlab.attacks.optimizers`).

How to add one. An attack: subclass :class:`Attack` (or :class:`PGD`), implement
``perturb(model, x, y, generator) -> x_adv`` (the only method to override: ``__call__`` is
final and owns the input checks, eval mode, BPDA, the ball check and the success verdict),
validate the options in ``__init__`` with :mod:`robustlab._validate`, and decorate the class
with ``@register("my-attack")``, which also sets its ``name``; ``create("my-attack", threat)``
then builds it and the registry-wide contract tests cover it. A custom loss needs no new
class: ``PGD(threat, loss=fn)`` (or ``create("pgd", threat, loss=fn)``) maximises any
``fn(logits, y) -> (N,)``, and a loss that needs the inputs themselves goes to one call as
``attack.craft(model, x, y, generator, loss=loss_at)`` (a :data:`robustlab.attacks.pgd.LossAt`).
A registered loss name: ``LOSSES.register("name")`` in :mod:`robustlab.attacks.losses`.
"""

import importlib
import pkgutil

from robustlab.attacks.base import Attack, AttackResult, Perturbation
from robustlab.attacks.bpda import BPDA
from robustlab.attacks.losses import loss_names
from robustlab.attacks.pgd import PGD
from robustlab.attacks.registry import ATTACKS, create, create_for_evaluation, names, register

_SUPPORT = {"base", "bpda", "eot", "losses", "optimizers", "registry"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _SUPPORT and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "BPDA",
    "PGD",
    "Perturbation",
    "create",
    "create_for_evaluation",
    "loss_names",
    "names",
    "register",
]
