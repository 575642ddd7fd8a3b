"""One readable training loop: optimiser, schedule, per-epoch checkpoint and exact resume,
per-epoch clean and robust validation, metrics as JSONL.

Determinism: the batch order and the attack's random starts of epoch ``e`` come from generators
seeded with ``(seed, e)``; dropout and other layers draw from torch's global RNG, which the
trainer runs inside :func:`torch.random.fork_rng` (the caller's RNG state is left as it was),
starts from ``seed`` and saves in every checkpoint. A run killed at any point and resumed from
its last checkpoint therefore ends with the same weights as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import models
from robustlab._validate import check_inputs, check_labels, probe_model
from robustlab.attacks import create_for_evaluation
from robustlab.attacks.base import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training.objectives import get as get_objective
from robustlab.training.schedules import SCHEDULES, lr_at
from robustlab.training.state import load_state, save_state

log = logging.getLogger(__name__)
STATE_FILE = "train_state.safetensors"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Every training setting, with its default, in one place."""

    objective: str = "natural"
    objective_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.1
    momentum: float = 0.9  # SGD momentum; Adam's beta1
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # constant | piecewise | cosine | cyclic
    schedule_options: dict[str, Any] = field(default_factory=dict)
    grad_clip: float | None = None
    seed: int = 0
    val_attack: dict[str, Any] = field(default_factory=lambda: {"name": "pgd", "steps": 10})
    dataset: str | None = None  # recorded in the checkpoint

    def validate(self) -> None:
        get_objective(self.objective)
        SCHEDULES.get(self.schedule)
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: adam, sgd")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def _seeded(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def evaluate_epoch(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel | None, attack: dict[str, Any],
    batch_size: int,
) -> dict[str, float]:
    """Clean accuracy and (if ``threat``) robust accuracy under ``attack`` on a validation set."""
    device = next(model.parameters()).device
    opts = {k: v for k, v in attack.items() if k != "name"}
    atk = create_for_evaluation(attack["name"], threat, **opts) if threat else None
    correct = robust = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with eval_mode(model), torch.no_grad():
            ok = model(xb).argmax(1) == yb
        correct += int(ok.sum())
        if atk is not None and ok.any():  # only clean-correct points can be robust
            robust += int((~atk(model, xb[ok], yb[ok]).success).sum())
    out = {"val_clean_acc": correct / len(x)}
    if atk is not None:
        out["val_robust_acc"] = robust / len(x)
    return out


class Trainer:
    """Runs :class:`TrainConfig` on ``model`` with data ``(x, y)``, writing to ``out``."""

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Tensor, Tensor],
        cfg: TrainConfig,
        *,
        threat: ThreatModel | None = None,
        out: str | Path | None = None,
        val: tuple[Tensor, Tensor] | None = None,
        progress: bool = False,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        cfg.validate()
        for what, pair in (("data", data), ("val", val)):
            if pair is not None and not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"{what} must be a pair (x, y) of tensors, got {pair!r:.80}")
        x, y = data
        check_inputs(x, y, threat)
        if val is not None:
            check_inputs(*val, threat)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        with eval_mode(model):  # no BatchNorm statistics updated, no dropout draws
            k = probe_model(model, x[:2].to(next(model.parameters()).device)).shape[1]
        check_labels(y, k)
        if val is not None:
            check_labels(val[1], k, "val labels")
        if cfg.objective != "natural" and threat is None:
            raise ValueError(f"objective {cfg.objective!r} needs threat=ThreatModel(...)")
        if out is not None and not hasattr(model, "robustlab_arch"):
            raise ValueError(
                "checkpoints (out=...) need a model built with robustlab.models.create(...), "
                "whose architecture can be recorded; train without out= for other models"
            )
        self.model, self.x, self.y, self.cfg, self.threat = model, x, y, cfg, threat
        self.out = Path(out) if out is not None else None
        self.val = val
        self.progress = progress
        self.callback = callback
        self.device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, cfg)
        self.objective = get_objective(cfg.objective)
        self.history: list[dict[str, Any]] = []

    # --- checkpoints ------------------------------------------------------------------------
    def _meta(self, epoch: int) -> dict[str, Any]:
        return {
            "dataset": self.cfg.dataset,
            "threat": self.threat.to_dict() if self.threat else None,
            "objective": self.cfg.objective,
            "epoch": epoch,
            "seed": self.cfg.seed,
            "train_config": asdict(self.cfg),
        }

    def _checkpoint(self, epoch: int) -> None:
        assert self.out is not None
        models.save(self.model, self.out / MODEL_FILE, meta=self._meta(epoch))
        save_state(self.out / STATE_FILE, self.model, self.optimizer,
                   {"epoch": epoch, "config": asdict(self.cfg), "history": self.history})

    def _resume(self) -> int:
        assert self.out is not None
        path = self.out / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"cannot resume: no {STATE_FILE} in {self.out}; start without --resume"
            )
        info = load_state(path, self.model, self.optimizer)
        saved = {k: v for k, v in info["config"].items() if k != "epochs"}
        now = {k: v for k, v in json.loads(json.dumps(asdict(self.cfg))).items() if k != "epochs"}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(f"cannot resume: settings differ from the saved run in {diff}")
        self.history = info["history"]
        self._write_log()  # drop records of an epoch that did not reach its checkpoint
        return int(info["epoch"])

    def _write_log(self) -> None:
        if self.out is None:
            return
        with open(self.out / LOG_FILE, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    # --- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        start = 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if resume:
                start = self._resume()
            else:
                if self.out is not None and (self.out / STATE_FILE).exists():
                    raise FileExistsError(
                        f"{self.out} already holds a training run; pass --resume (resume=True) "
                        "to continue it, or choose another --out"
                    )
                # dropout & co. draw from the global RNG: start it from the run's seed
                torch.set_rng_state(torch.Generator().manual_seed(self.cfg.seed).get_state())
            for epoch in range(start, self.cfg.epochs):
                rec = self._epoch(epoch)
                self.history.append(rec)
                if self.out is not None:
                    self._checkpoint(epoch + 1)
                    with open(self.out / LOG_FILE, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if self.callback is not None:
                    self.callback(rec)
        return self.history

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, n = self.cfg, len(self.x)
        order = torch.randperm(n, generator=_seeded(cfg.seed, epoch, 0, torch.device("cpu")))
        gen = _seeded(cfg.seed, epoch, 1, self.device)
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch")
        self.model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        lr = cfg.lr
        for i, idx in enumerate(bar if bar is not None else batches):
            lr = lr_at(cfg.schedule, cfg.lr, epoch + i / len(batches), cfg.epochs,
                       **cfg.schedule_options)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            xb, yb = self.x[idx].to(self.device), self.y[idx].to(self.device)
            loss = self.objective(self.model, xb, yb, threat=self.threat, generator=gen,
                                  **cfg.objective_options)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, batch {i}; "
                    "lower the learning rate or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{lr:.4g}")
        train_time = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": total / seen,
                               "train_time_s": train_time}
        if self.val is not None:
            t1 = time.perf_counter()
            rec |= evaluate_epoch(self.model, *self.val, self.threat, cfg.val_attack,
                                  batch_size=max(cfg.batch_size, 256))
            rec["val_attack"] = cfg.val_attack
            rec["val_n"] = len(self.val[0])
            rec["val_time_s"] = time.perf_counter() - t1
        self.model.train()
        return rec


def fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    objective: str = "natural",
    threat: ThreatModel | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    val: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data = (x, y)`` with a registered objective; returns the per-epoch
    history (also written to ``out/train_log.jsonl`` with a checkpoint every epoch).

    ``config`` takes any :class:`TrainConfig` field (epochs, batch_size, lr, schedule, ...).
    With ``resume=True`` the run in ``out`` continues from its last checkpoint.
    """
    try:
        cfg = TrainConfig(objective=objective, **config)
    except TypeError as e:
        valid = ", ".join(TrainConfig.__dataclass_fields__)
        raise TypeError(f"{e}; valid training settings are: {valid}") from None
    trainer = Trainer(model, data, cfg, threat=threat, out=out, val=val, progress=progress,
                      callback=callback)
    return trainer.run(resume=resume)
