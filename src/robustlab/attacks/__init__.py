"""Attacks: ``create(name, threat, **options)(model, x, y) -> AttackResult``."""

from robustlab.attacks import fgsm, pgd  # noqa: F401  (registers the attacks)
from robustlab.attacks.base import Attack, AttackResult
from robustlab.attacks.losses import loss_names
from robustlab.attacks.registry import ATTACKS, create, create_for_evaluation, names

__all__ = [
    "ATTACKS", "Attack", "AttackResult", "create", "create_for_evaluation", "loss_names", "names",
]
