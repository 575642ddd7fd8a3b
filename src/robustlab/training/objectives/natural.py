"""Natural (standard) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("natural")
class Natural(Objective):
    """Mean cross-entropy of the model on clean inputs (the threat model is not used)."""

    needs_threat = False

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        return F.cross_entropy(model(x), y)
