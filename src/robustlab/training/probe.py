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
import logging
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab.attacks.pgd import PGD
from robustlab.evaluation.adapt import Step
from robustlab.evaluation.cascade import correct, run_cascade
from robustlab.evaluation.record import EvalRecord
from robustlab.evaluation.state import EvalState
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)
ACTIONS = ("auto", "off", "stop", "rollback")


def probe_action(setting: str, single_step: bool, threat: ThreatModel | None) -> str:
    """The probe's action for the ``overfit_probe`` setting: ``auto`` is ``stop`` for a
    single-step objective with a threat model, else ``off``."""
    action = setting
    if action == "auto":
        action = "stop" if single_step and threat is not None else "off"
    if action != "off" and threat is None:
        raise ValueError("overfit_probe needs threat=ThreatModel(...); set it to 'off'")
    return action


class OverfitProbe:
    """PGD-``steps`` robust accuracy on the fixed batch ``(x, y)``; see the module docstring.
    It keeps a :class:`Snapshot` of the last accepted epoch (see :meth:`judge`)."""

    def __init__(
        self,
        action: str,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        *,
        steps: int = 5,
        drop: float = 0.2,
    ) -> None:
        self.action, self.drop = action, drop
        self.x, self.y = x.detach().cpu(), y.detach().cpu()
        self.attack = PGD(threat, steps=steps, step_size=threat.eps / 4, keep_best=True)
        self.snapshot: Snapshot | None = None

    def measure(self, model: nn.Module, generator: torch.Generator) -> float:
        """Robust accuracy of ``model`` on the probe batch by the evaluation's cascade
        (clean-wrong points count as broken); the attack draws from ``generator``."""
        device = next(model.parameters()).device
        n = len(self.x)
        with eval_mode(model):
            clean, pred = correct(model, self.x, self.y, n, device, 1)
            st = run_cascade(
                model,
                [Step(self.attack, None)],
                self.x,
                self.y,
                EvalState.fresh(clean, pred, self.x),
                batch_size=n,
                repeats=1,
                generators=lambda i, j: generator,
                record=EvalRecord(None, batch_size=n),
            )
        return st.robust.float().mean().item()

    def judge(
        self,
        value: float,
        rec: dict[str, Any],
        history: list[dict[str, Any]],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        objective: Any,
    ) -> bool:
        """Record the probe's ``value`` after the epoch of ``rec`` and compare it with the last
        accepted epoch of ``history``: on a collapse restore the snapshot and mark ``rec``
        (``overfit``), else take a new snapshot. True: stop training."""
        accepted = [
            r["probe_robust_acc"] for r in history if "probe_robust_acc" in r and "overfit" not in r
        ]
        rec["probe_robust_acc"] = value
        if self.snapshot is None or not self.collapsed(value, accepted[-1] if accepted else None):
            self.snapshot = Snapshot(model, optimizer, objective)
            return False
        self.snapshot.restore(model, optimizer, objective)
        stop = self.action == "stop"
        rec["overfit"] = "stopped" if stop else "rolled back"
        log.warning(
            "catastrophic overfitting after epoch %d: PGD-5 accuracy on the probe batch "
            "fell from %.3f to %.3f; %s with the previous epoch's weights",
            rec["epoch"],
            accepted[-1],
            value,
            "stopping" if stop else "going on",
        )
        return stop

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
