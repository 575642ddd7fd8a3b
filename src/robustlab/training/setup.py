"""What a training run is built from before its first step: the optimiser, the checked data
and the seeded generators of each epoch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab._modes import eval_mode
from robustlab._validate import check_inputs, check_labels, probe_model
from robustlab.threat import ThreatModel
from robustlab.training.config import TrainConfig


def seeded(
    seed: int, epoch: int, stream: int, device: torch.device, rank: int = 0
) -> torch.Generator:
    """The generator of stream ``stream`` of pass ``epoch`` on ``device``: rank 0's is a
    function of ``(seed, epoch, stream)`` only, so one process and rank 0 draw alike."""
    g = torch.Generator(device=device)
    if rank == 0:
        return g.manual_seed((seed * 1_000_003 + epoch) * 7 + stream)
    return g.manual_seed(hash((seed, epoch, stream, rank)) & (2**63 - 1))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable parameters; those marked ``robustlab_no_decay`` (e.g.
    PNI's noise scales) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = [p for p in params if getattr(p, "robustlab_no_decay", False)]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if not getattr(p, "robustlab_no_decay", False)]}
    ]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def check_data(model: nn.Module, data: Any, val: Any, threat: ThreatModel | None) -> None:
    """``data`` and ``val`` are pairs ``(x, y)`` the model classifies, labels in range."""
    for what, pair in (("data", data), ("val", val)):
        if pair is not None and not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"{what} must be a pair (x, y) of tensors, got {pair!r:.80}")
    x, y = data
    check_inputs(x, y, threat)
    if val is not None:
        check_inputs(val[0], val[1], threat)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with eval_mode(model):  # no BatchNorm statistics updated, no dropout draws
        k = probe_model(model, x[:2].to(next(model.parameters()).device)).shape[1]
    check_labels(y, k)
    if val is not None:
        check_labels(val[1], k, "val labels")
