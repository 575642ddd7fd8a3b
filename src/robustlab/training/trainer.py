"""One readable training loop: optimiser, schedule, per-epoch checkpoint and exact resume,
per-epoch clean and robust validation, metrics as JSONL, and DistributedDataParallel when
launched by ``torchrun``.

Determinism: the batch order and the attack's random starts of epoch ``e`` come from generators
seeded with ``(seed, e)``; dropout and other layers draw from torch's global RNG, which the
trainer runs inside :func:`torch.random.fork_rng` (the caller's RNG state is left as it was),
starts from ``seed`` and saves in every checkpoint. A run killed at any point and resumed from
its last checkpoint therefore ends with the same weights as an uninterrupted run (on CPU).

Distributed: every rank builds the same global batches and trains on its own contiguous slice
of each; the objective's whole loss (inner attack included) runs inside one DDP forward, so the
inner maximisation never triggers a gradient all-reduce and the averaged gradient equals the
single-process gradient of the global batch. Rank 0 writes checkpoints and logs; validation
(:mod:`robustlab.evaluation.validation`: the evaluation's cascade) is sharded and merged.

Progress and logs go through one observer (:class:`robustlab.evaluation.record.RunLog`): with
``progress=True`` the main rank shows one bar over every batch of the run (its ETA is for the
whole run; a resumed run starts it where it stands) with the epoch, the running loss, the
learning rate and the last validation accuracies. With ``out`` each epoch's record goes to
``train_log.jsonl`` and, if the ``tensorboard`` package is installed, its scalars to
``out/tensorboard/`` (step = epoch; see :data:`TB_SCALARS`). These mirror the log: every
(re)start has TensorBoard discard the steps of earlier event files and writes the history
again, so a resumed run shows each epoch once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import distributed, models
from robustlab._modes import eval_mode
from robustlab._progress import tensorboard_available
from robustlab._validate import check_inputs, check_labels, probe_model
from robustlab.evaluation.record import RunLog
from robustlab.evaluation.validation import evaluate_epoch
from robustlab.models.init import init_weights
from robustlab.threat import ThreatModel
from robustlab.training.config import TrainConfig
from robustlab.training.objectives import create as create_objective
from robustlab.training.objectives.base import Objective
from robustlab.training.probe import OverfitProbe, Snapshot, probe_action
from robustlab.training.schedules import lr_at
from robustlab.training.state import resume_state, save_state

log = logging.getLogger(__name__)
STATE_FILE = "train_state.safetensors"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train_log.jsonl"
TB_DIR = "tensorboard"
# TensorBoard tag <- train_log.jsonl key; "time/epoch_s" is train_time_s + val_time_s
TB_SCALARS = (("train/loss", "train_loss"), ("train/lr", "lr"),
              ("val/clean_accuracy", "val_clean_acc"), ("val/robust_accuracy", "val_robust_acc"),
              ("probe/robust_accuracy", "probe_robust_acc"))
def _seeded(seed: int, epoch: int, stream: int, device: torch.device,
            rank: int = 0) -> torch.Generator:
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
        {"params": [p for p in params if not getattr(p, "robustlab_no_decay", False)]}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def _scalars(rec: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """One epoch record's TensorBoard scalars (:data:`TB_SCALARS`, ``time/epoch_s``) and its
    step, the epoch."""
    values = {tag: rec[key] for tag, key in TB_SCALARS if key in rec}
    values["time/epoch_s"] = rec["train_time_s"] + rec.get("val_time_s", 0.0)
    return rec["epoch"], values


def _postfix(epoch: int, passes: int, now: dict[str, Any],
             history: list[dict[str, Any]]) -> dict[str, str]:
    """The bar's postfix: epoch ``epoch`` (0-based) of the passes, the running loss and
    learning rate in ``now``, and the validation accuracies of the last finished epoch."""
    post = {"epoch": f"{epoch + 1}/{passes}", "loss": f"{now['train_loss']:.4f}",
            "lr": f"{now['lr']:.3g}"}
    last = history[-1] if history else {}
    for key, name in (("val_clean_acc", "val_clean"), ("val_robust_acc", "val_robust")):
        if key in last:
            post[name] = f"{100 * last[key]:.1f}%"
    return post


def _check_data(model: nn.Module, data: Any, val: Any, threat: ThreatModel | None) -> None:
    """``data`` and ``val`` are pairs ``(x, y)`` the model classifies, labels in range."""
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


class _Step(nn.Module):
    """The objective's whole loss as one module call, so that DDP sees one forward (inner
    attack included) per backward."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, y: Tensor, threat: ThreatModel | None,
                generator: torch.Generator) -> Tensor:
        return self.objective(self.model, x, y, threat=threat, generator=generator)


class Trainer:
    """Runs :class:`TrainConfig` on ``model`` with data ``(x, y)``, writing to ``out``.

    ``progress``: one progress bar over the run's batches (main rank). ``callback``: called
    with each epoch's record after its checkpoint (the bar is cleared while it runs, so it may
    print). ``tensorboard``: scalars in ``out/tensorboard/``; None: if the ``tensorboard``
    package is installed and ``out`` is set, True: required (ImportError if not installed),
    False: none.
    """

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
        tensorboard: bool | None = None,
    ) -> None:
        cfg.validate(threat)
        _check_data(model, data, val, threat)
        self.objective = create_objective(cfg.objective, **cfg.objective_options)
        if self.objective.needs_threat and threat is None:
            raise ValueError(f"objective {cfg.objective!r} needs threat=ThreatModel(...)")
        if out is not None and not hasattr(model, "robustlab_arch"):
            raise ValueError(
                "checkpoints (out=...) need a model built with robustlab.models.create(...), "
                "whose architecture can be recorded; train without out= for other models"
            )
        if tensorboard and out is None:
            raise ValueError(f"tensorboard={tensorboard!r} writes to out/{TB_DIR}/: pass out=... "
                             "or leave tensorboard unset")
        self.model, self.cfg, self.threat, self.val = model, cfg, threat, val
        self.x, self.y = data
        self.out = Path(out) if out is not None else None
        self.callback = callback
        self.device = next(model.parameters()).device
        self.world = distributed.current()
        writes = self.out is not None and self.world.main  # rank 0 writes the log
        board = self.out is not None and tensorboard_available(tensorboard)
        self.log = RunLog(self.out / LOG_FILE if writes else None, scalars=_scalars,
                          progress=progress and self.world.main,
                          tensorboard=self.out / TB_DIR if board and writes else None)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(model, cfg)
        self.passes = math.ceil(cfg.epochs / self.objective.replays)
        self.step: nn.Module = _Step(model, self.objective)
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step = DistributedDataParallel(self.step, device_ids=ids)
        self.probe_action = probe_action(cfg.overfit_probe, self.objective.single_step, threat)
        self.history: list[dict[str, Any]] = []
        self.stopped = False

    # --- checkpoints ------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """The settings as JSON: the objective's options as the objective reports them (an
        in-memory teacher module becomes ``"<module>"``)."""
        cfg = asdict(self.cfg)
        cfg["objective_options"] = {k: v for k, v in self.objective.config().items()
                                    if k != "name"}
        return json.loads(json.dumps(cfg))

    def _checkpoint(self, epoch: int) -> None:
        assert self.out is not None
        if self.world.main:
            meta = {"dataset": self.cfg.dataset,
                    "threat": self.threat.to_dict() if self.threat else None,
                    "objective": self.cfg.objective,
                    "objective_config": self.objective.config(), "epoch": epoch,
                    "seed": self.cfg.seed, "train_config": self._config()}
            models.save(self.model, self.out / MODEL_FILE, meta=meta)
            info = {"epoch": epoch, "config": self._config(), "history": self.history,
                    "stopped": self.stopped}
            save_state(self.out / STATE_FILE, self.model, self.optimizer, info,
                       extra={"objective." + k: v for k, v in self.objective.state_dict().items()})
        distributed.barrier(self.world)

    def _resume(self) -> int:
        assert self.out is not None
        info = resume_state(self.out / STATE_FILE, self.model, self.optimizer, self.objective,
                            self._config())
        self.history = info["history"]
        self.stopped = bool(info.get("stopped", False))
        self.log.rewrite(self.history)  # drop records of an epoch that did not reach its checkpoint
        return int(info["epoch"])

    def _fresh(self) -> int:
        if self.world.main and self.out is not None and (self.out / STATE_FILE).exists():
            raise FileExistsError(
                f"{self.out} already holds a training run; pass --resume (resume=True) "
                "to continue it, or choose another --out"
            )
        if self.cfg.init is not None:  # fine-tuning; a resumed run has its own weights
            left = init_weights(self.model, self.cfg.init)
            log.info("initialised from %s; left at init: %s", self.cfg.init, left)
        # dropout & co. draw from the global RNG: start it from the run's seed
        torch.set_rng_state(torch.Generator().manual_seed(self.cfg.seed).get_state())
        return 0

    # --- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            start = self._resume() if resume else self._fresh()
            if self.stopped:
                log.info("this run was stopped by the overfitting probe; nothing to resume")
                return self.history
            self.x, self.y = self.objective.setup(self.model, self.x, self.y)
            probe = None
            if self.probe_action != "off":
                assert self.threat is not None
                b = min(self.cfg.batch_size, len(self.x))
                probe = OverfitProbe(self.probe_action, self.x[:b], self.y[:b], self.threat)
                probe.snapshot = Snapshot(self.model, self.optimizer, self.objective)
            try:
                self._open_log(start)
                for epoch in range(start, self.passes):
                    self.objective.begin_epoch(epoch, self.passes)
                    rec = self._epoch(epoch)
                    if probe is not None:
                        value = probe.measure(self.model,
                                              _seeded(self.cfg.seed, epoch, 2, self.device))
                        self.stopped = probe.judge(value, rec, self.history, self.model,
                                                   self.optimizer, self.objective)
                    self.history.append(rec)
                    if self.out is not None:
                        self._checkpoint(epoch + 1)
                    self.log.write(rec)
                    self.log.show(_postfix(epoch, self.passes, rec, self.history), refresh=False)
                    with self.log.aside():  # the callback may print
                        if self.callback is not None:
                            self.callback(rec)
                    if self.stopped:
                        break
            finally:
                self.log.close()
        return self.history

    def _open_log(self, start: int) -> None:
        """The bar over the batches of every pass, standing at the start of pass ``start``,
        and TensorBoard holding the history's scalars."""
        per_pass = math.ceil(len(self.x) / self.cfg.batch_size)
        self.log.open(total=self.passes * per_pass, initial=start * per_pass, desc="training",
                      history=self.history)
        if self.history:
            self.log.show(_postfix(start - 1, self.passes, self.history[-1], self.history))

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, n, m, world = self.cfg, len(self.x), self.objective.replays, self.world
        order = torch.randperm(n, generator=_seeded(cfg.seed, epoch, 0, torch.device("cpu")))
        gen = _seeded(cfg.seed, epoch, 1, self.device, world.rank)
        if world.rank > 0:  # rank 0 carries its RNG state; the others start each epoch anew
            torch.set_rng_state(_seeded(cfg.seed, epoch, 3, torch.device("cpu"),
                                        world.rank).get_state())
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        self.model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        lr, scale_lr = cfg.lr, 0.5 ** sum(r.get("overfit") == "rolled back" for r in self.history)
        for i, idx in enumerate(batches):
            local = distributed.shard(idx, world)
            xb, yb = self.x[local].to(self.device), self.y[local].to(self.device)
            if cfg.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            # DDP averages the ranks' gradients: weigh each rank's mean by its share
            weight = len(local) * world.size / len(idx)
            for r in range(m):
                progress = (epoch * len(batches) * m + i * m + r) / len(batches)
                lr = scale_lr * lr_at(cfg.schedule, cfg.lr, progress, self.passes * m,
                                      **cfg.schedule_options)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                total += self._step(xb, yb, gen, weight, f"epoch {epoch + 1}, batch {i}") \
                    * len(local)
                seen += len(local)
            self.log.advance(_postfix(epoch, self.passes, {"train_loss": total / seen, "lr": lr},
                                      self.history))
        train_time = time.perf_counter() - t0
        total, seen = distributed.all_sum([total, float(seen)], world, self.device)
        rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": total / seen,
                               "train_time_s": train_time}
        if m > 1:
            rec["epochs_equivalent"] = (epoch + 1) * m
        if self.val is not None:
            t1 = time.perf_counter()
            rec |= evaluate_epoch(self.model, *self.val, self.threat, cfg.val_attack,
                                  batch_size=max(cfg.batch_size, 256), world=world,
                                  seed=cfg.seed)
            rec |= {"val_attack": cfg.val_attack, "val_n": len(self.val[0]),
                    "val_time_s": time.perf_counter() - t1}
        self.model.train()
        return rec

    def _step(self, xb: Tensor, yb: Tensor, gen: torch.Generator, weight: float,
              where: str) -> float:
        """One optimiser step on the objective's loss (scaled by ``weight``); its value."""
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.cfg.precision == "bf16" else contextlib.nullcontext())
        with autocast:
            loss = self.step(xb, yb, self.threat, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at {where}; lower the "
                                     "learning rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1 else loss).backward()
        self.objective.after_backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.item()


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
    tensorboard: bool | None = None,
    **config: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data = (x, y)`` with a registered objective; returns the per-epoch
    history (also written to ``out/train_log.jsonl`` with a checkpoint every epoch).

    ``config`` takes any :class:`TrainConfig` field (epochs, batch_size, lr, schedule, ...).
    With ``resume=True`` the run in ``out`` continues from its last checkpoint. ``progress``,
    ``callback`` and ``tensorboard`` as in :class:`Trainer`.
    """
    try:
        cfg = TrainConfig(objective=objective, **config)
    except TypeError as e:
        valid = ", ".join(TrainConfig.__dataclass_fields__)
        raise TypeError(f"{e}; valid training settings are: {valid}") from None
    trainer = Trainer(model, data, cfg, threat=threat, out=out, val=val, progress=progress,
                      callback=callback, tensorboard=tensorboard)
    return trainer.run(resume=resume)
