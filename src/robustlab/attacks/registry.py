"""The attack registry: ``create(name, threat, **options)``."""

from __future__ import annotations

import inspect
from typing import Any

from robustlab._validate import positive_int
from robustlab.attacks.base import Attack
from robustlab.registry import Registry
from robustlab.threat import ThreatModel

ATTACKS: Registry[type[Attack]] = Registry("attack")
register = ATTACKS.register


def create(
    name: str, threat: ThreatModel, *, eot: int = 1, bpda: bool = False, **options: Any
) -> Attack:
    """Build the registered attack ``name`` for ``threat`` through ``ATTACKS.create`` (an
    unknown option raises TypeError "attack <name>: unknown option X; its options are: ...").

    ``eot`` (any gradient attack): average each input gradient over this many forward and
    backward passes (expectation over transformation, :mod:`robustlab.attacks.eot`), for
    randomised models. ``bpda`` (any gradient attack): run with the model's non-differentiable
    stages on their BPDA backward pass (:mod:`robustlab.attacks.bpda`).
    """
    cls = ATTACKS.get(name)
    eot = positive_int(eot, "eot")
    if eot > 1 and not cls.uses_gradients:
        raise ValueError(f"attack {name!r} uses no gradients: eot={eot} has nothing to average")
    if not isinstance(bpda, bool):
        raise TypeError(f"bpda must be True or False, got {bpda!r}")
    if bpda and not cls.uses_gradients:
        raise ValueError(f"attack {name!r} uses no gradients: bpda has no backward pass to replace")
    attack: Attack = ATTACKS.create(name, threat, **options)
    attack.eot_samples = eot
    attack.bpda = bpda
    return attack


def create_for_evaluation(name: str, threat: ThreatModel, **options: Any) -> Attack:
    """Like :func:`create`, with ``early_stop=True`` where the attack takes it: in evaluation
    only whether a point breaks matters, so an attack stops working on it once it has."""
    if "early_stop" in inspect.signature(ATTACKS.get(name)).parameters:
        options.setdefault("early_stop", True)
    return create(name, threat, **options)


def names(pattern: str | None = None) -> list[str]:
    """Registered attack names, optionally filtered by a shell pattern."""
    return ATTACKS.names(pattern)
