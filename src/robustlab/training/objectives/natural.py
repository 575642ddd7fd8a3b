"""Natural (standard) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.threat import ThreatModel
from robustlab.training.objectives import register


@register("natural")
def natural(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: ThreatModel | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean cross-entropy of the model on clean inputs (the threat model is not used)."""
    return F.cross_entropy(model(x), y)
