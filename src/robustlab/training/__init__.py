"""Training: ``fit(model, (x, y), objective=..., threat=..., epochs=..., out=...)``."""

from robustlab.training.objectives import OBJECTIVES
from robustlab.training.objectives import create as create_objective
from robustlab.training.objectives import names as objectives
from robustlab.training.schedules import SCHEDULES, lr_at
from robustlab.training.trainer import TrainConfig, Trainer, fit

__all__ = [
    "OBJECTIVES",
    "SCHEDULES",
    "TrainConfig",
    "Trainer",
    "fit",
    "lr_at",
    "objectives",
    "create_objective",
]
