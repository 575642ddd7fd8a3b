"""Learning-rate schedules as pure functions of training progress (so resuming needs no state).

``progress`` is the fractional epoch: epoch index + fraction of the epoch's batches done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from robustlab.registry import Registry

Schedule = Callable[..., float]
SCHEDULES: Registry[Schedule] = Registry("schedule")


@SCHEDULES.register("constant")
def constant(lr: float, progress: float, epochs: int, **_: object) -> float:
    return lr


@SCHEDULES.register("piecewise")
def piecewise(
    lr: float,
    progress: float,
    epochs: int,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    **_: object,
) -> float:
    """``lr * gamma^k`` after the k-th milestone (milestones as fractions of the epochs,
    applied at epoch boundaries, as in Madry et al. / Rice et al.)."""
    epoch = math.floor(progress + 1e-9)
    k = sum(epoch >= m * epochs - 1e-9 for m in milestones)
    return lr * gamma**k


@SCHEDULES.register("cosine")
def cosine(lr: float, progress: float, epochs: int, **_: object) -> float:
    """Cosine decay from ``lr`` to 0 over the run, per iteration."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(progress / epochs, 1.0)))


@SCHEDULES.register("cyclic")
def cyclic(lr: float, progress: float, epochs: int, *, peak: float = 0.4, **_: object) -> float:
    """One triangular cycle: 0 -> ``lr`` at ``peak`` of the run -> 0 (Wong et al., 2020,
    "Fast is better than free"; Smith's one-cycle policy)."""
    t = min(progress / epochs, 1.0)
    return lr * (t / peak if t < peak else (1 - t) / (1 - peak))


def lr_at(name: str, lr: float, progress: float, epochs: int, **options: object) -> float:
    """The learning rate of schedule ``name`` at fractional epoch ``progress``."""
    return SCHEDULES.get(name)(lr, progress, epochs, **options)
