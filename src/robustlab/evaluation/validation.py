"""Validation during training: clean and robust accuracy of a held-out set by the cascade.

The trainer (:mod:`robustlab.training.trainer`) calls :func:`evaluate_epoch` after each epoch;
the robust accuracy is the evaluation's (:func:`~robustlab.evaluation.cascade.run_cascade`:
the attack runs on the clean-correct points and the predictions on its output decide), with
the points split over the ranks of a distributed run and the per-sample outcomes merged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab import distributed
from robustlab._modes import eval_mode
from robustlab.attacks import create_for_evaluation
from robustlab.evaluation.adapt import Step
from robustlab.evaluation.cascade import batch_generator, correct, run_cascade
from robustlab.evaluation.record import EvalRecord
from robustlab.evaluation.state import EvalState
from robustlab.threat import ThreatModel


def evaluate_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel | None,
    attack: dict[str, Any],
    batch_size: int,
    world: distributed.World | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Clean accuracy and (if ``threat``) robust accuracy under ``attack`` on a validation set,
    by the evaluation's cascade (attack ``i``'s batch ``j`` draws from
    ``batch_generator(seed, i, j)``); with several ranks each evaluates its shard and the
    per-sample results are merged."""
    world = world or distributed.World()
    device = next(model.parameters()).device
    xs, ys = (t.tensor_split(world.size)[world.rank].detach().cpu() for t in (x, y))
    rows = torch.zeros(0, 2, dtype=torch.int64, device=device)  # per sample: clean, robust
    if len(xs):
        with eval_mode(model):
            clean, pred = correct(model, xs, ys, batch_size, device, 1)
            robust = clean
            if threat is not None:
                opts = {k: v for k, v in attack.items() if k != "name"}
                steps = [Step(create_for_evaluation(attack["name"], threat, **opts), None)]
                robust = run_cascade(
                    model,
                    steps,
                    xs,
                    ys,
                    EvalState.fresh(clean, pred, xs),
                    batch_size=batch_size,
                    repeats=1,
                    record=EvalRecord(None, batch_size=1),
                    generators=lambda i, j: batch_generator(seed, i, j, device),
                ).robust
        rows = torch.stack([clean, robust], 1).to(device=device, dtype=torch.int64)
    merged = distributed.gather_rows(rows, world)
    out = {"val_clean_acc": merged[:, 0].sum().item() / len(x)}
    if threat is not None:
        out["val_robust_acc"] = merged[:, 1].sum().item() / len(x)
    return out
