"""The catastrophic-overfitting probe of Wong, Rice & Kolter (2020, "Fast is better than free",
https://arxiv.org/abs/2001.03994).

Single-step adversarial training (FGSM-AT, Fast-AT, Free-AT) can collapse within an epoch: the
model learns to defeat the one-step attack while its accuracy under multi-step PGD falls to
about zero. After every epoch the probe runs PGD-5 (step eps/4, one random start) on a fixed
training minibatch; when the robust accuracy falls by more than ``drop`` (0.2 in the reference
code) against the last accepted epoch, the trainer either stops and keeps the previous epoch's
weights (``"stop"``, as the reference code does) or rolls back to them and goes on at half the
learning rate (``"rollback"``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel

ACTIONS = ("auto", "off", "stop", "rollback")


class OverfitProbe:
    """PGD-``steps`` robust accuracy on the fixed batch ``(x, y)``; see the module docstring."""

    def __init__(self, action: str, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 steps: int = 5, drop: float = 0.2) -> None:
        self.action, self.x, self.y, self.drop = action, x, y, drop
        self.attack = PGD(threat, steps=steps, step_size=threat.eps / 4, keep_best=True)

    def measure(self, model: nn.Module, generator: torch.Generator) -> float:
        """Robust accuracy of ``model`` on the probe batch (clean-wrong points count as broken)."""
        broken = self.attack(model, self.x, self.y, generator=generator).success
        return 1.0 - broken.float().mean().item()

    def collapsed(self, value: float, accepted: float | None) -> bool:
        """True if ``value`` fell by more than ``drop`` below the last accepted value."""
        return accepted is not None and accepted - value > self.drop


class Snapshot:
    """An in-memory copy of the model, optimiser and objective state of the last accepted
    epoch, restored when the probe detects a collapse."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Any) -> None:
        self.model = copy.deepcopy(model.state_dict())
        self.optim = copy.deepcopy(optimizer.state_dict())
        self.objective = {k: v.clone() for k, v in objective.state_dict().items()}

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Any) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optim))
        objective.load_state_dict({k: v.clone() for k, v in self.objective.items()})
