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
``out/tensorboard/`` (step = epoch; see :data:`robustlab.training.records.TB_SCALARS`).
These mirror the log: every (re)start has TensorBoard discard the steps of earlier event files
and writes the history again, so a resumed run shows each epoch once.

Features of :class:`TrainConfig` (each in its own module, with paper, formula and cost):
a hold-out of the training data for model selection with ``model_best.safetensors``
(:mod:`~robustlab.training.selection`), EMA and SWA weight averages, validated and saved in
place of the raw weights (:mod:`~robustlab.training.averaging`), AWP around the objective's
loss (:mod:`~robustlab.training.awp`; the adversarial point is then crafted outside the DDP
forward, by an input-gradient attack that accumulates no parameter gradient), random crops and
flips (:mod:`~robustlab.training.augment`) and label smoothing
(:mod:`~robustlab.training.split_loss`). The resumable state holds the raw weights, the
optimiser and the average; the log records each validation of the hold-out
(``holdout_clean_acc``, ``holdout_robust_acc``) and the best epoch so far (``best_epoch``).

Hooks beyond the objective's loss: after every optimiser step the trainer calls
``objective.after_step()`` and then ``robustlab_after_step()`` on every module of the model
that defines one (a model option that must act on the weights after each update, e.g.
Parseval's retraction in :mod:`robustlab.models.lipschitz`); after each validation of the
hold-out it hands its ``holdout_*`` accuracies to ``objective.record_validation`` (and, once
before training, ``holdout_n`` alone, so the objective knows a hold-out is coming); each
pass's log record takes in ``objective.epoch_log()`` (the curriculum's ``lesson``).
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

from robustlab import distributed
from robustlab._progress import tensorboard_available
from robustlab.evaluation.record import RunLog
from robustlab.models.init import init_weights
from robustlab.threat import ThreatModel
from robustlab.training.awp import AWP
from robustlab.training.config import TrainConfig
from robustlab.training.features import BEST_FILE, Features
from robustlab.training.objectives import create as create_objective
from robustlab.training.probe import OverfitProbe, Snapshot, probe_action
from robustlab.training.records import TB_SCALARS, postfix, scalars
from robustlab.training.schedules import lr_at
from robustlab.training.selection import due
from robustlab.training.setup import check_data, make_optimizer, seeded
from robustlab.training.state import resume_state, save_state

log = logging.getLogger(__name__)
STATE_FILE = "train_state.safetensors"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train_log.jsonl"
TB_DIR = "tensorboard"
__all__ = ["BEST_FILE", "TB_SCALARS", "TrainConfig", "Trainer", "fit", "make_optimizer"]


class Trainer:
    """Runs :class:`TrainConfig` on ``model`` with data ``(x, y)``, writing to ``out``.

    ``progress``: one progress bar over the run's batches (main rank). ``callback``: called
    with each epoch's record after its checkpoint (the bar is cleared while it runs, so it may
    print). ``tensorboard``: scalars in ``out/tensorboard/``; None: if the ``tensorboard``
    package is installed and ``out`` is set, True: required (ImportError if not installed),
    False: none.

    ``val``: validated every ``val_every`` passes and only watched; the run's
    ``val_split`` training examples are held out of ``data`` here, validated at the same
    times and, with ``keep_best``, choose ``model_best.safetensors``. With ``average`` the
    model holds the averaged weights when the run ends (what ``model.safetensors`` holds).
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
        check_data(model, data, val, threat)
        self.objective = create_objective(cfg.objective, **cfg.objective_options)
        if self.objective.needs_threat and threat is None:
            raise ValueError(f"objective {cfg.objective!r} needs threat=ThreatModel(...)")
        if out is not None and not hasattr(model, "robustlab_arch"):
            raise ValueError(
                "checkpoints (out=...) need a model built with robustlab.models.create(...), "
                "whose architecture can be recorded; train without out= for other models"
            )
        if tensorboard and out is None:
            raise ValueError(
                f"tensorboard={tensorboard!r} writes to out/{TB_DIR}/: pass out=... "
                "or leave tensorboard unset"
            )
        self.model, self.cfg, self.threat, self.val = model, cfg, threat, val
        self.out = out = Path(out) if out is not None else None
        if cfg.channels_last:
            # Module.to takes memory_format= (documented); torch's annotations leave it out
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.features = Features(cfg, model, self.objective, data, threat, self.out)
        (self.x, self.y), self.average = self.features.data, self.features.average
        self.callback = callback
        self.device = next(model.parameters()).device
        self.world = distributed.current()
        writes = out is not None and self.world.main  # rank 0 writes the log
        board = out is not None and tensorboard_available(tensorboard)
        self.log = RunLog(
            out / LOG_FILE if out is not None and writes else None,
            scalars=scalars,
            progress=progress and self.world.main,
            tensorboard=out / TB_DIR if out is not None and board and writes else None,
        )
        self.optimizer = make_optimizer(model, cfg)
        self.passes = math.ceil(cfg.epochs / self.objective.replays)
        self.step: nn.Module = self.features.step
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
        cfg["objective_options"] = {k: v for k, v in self.objective.config().items() if k != "name"}
        return json.loads(json.dumps(cfg))

    def _checkpoint(self, epoch: int, best: bool) -> None:
        """The shown weights (and, if ``best``, ``model_best``), then the resumable state."""
        assert self.out is not None
        if self.world.main:
            meta = {
                "dataset": self.cfg.dataset,
                "threat": self.threat.to_dict() if self.threat else None,
                "objective": self.cfg.objective,
                "objective_config": self.objective.config(),
                "epoch": epoch,
                "seed": self.cfg.seed,
                "train_config": self._config(),
            }
            self.features.save(self.model, self.out / MODEL_FILE, meta, self.history[-1], best)
            info = {
                "epoch": epoch,
                "config": self._config(),
                "history": self.history,
                "stopped": self.stopped,
            }
            extra = {"objective." + k: v for k, v in self.objective.state_dict().items()}
            extra |= self.features.kept() or {}
            save_state(self.out / STATE_FILE, self.model, self.optimizer, info, extra=extra)
        distributed.barrier(self.world)

    def _resume(self) -> int:
        assert self.out is not None
        defaults = json.loads(json.dumps(asdict(TrainConfig())))  # for states saved before
        info, extra = resume_state(
            self.out / STATE_FILE,
            self.model,
            self.optimizer,
            self.objective,
            self._config(),
            defaults,
        )
        self.features.restore(extra)  # the average, if any
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
        if self.average is not None:  # EMA starts from the weights the run starts from
            self.average.reset(self.model)
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
                self.features.finish(self.model)
                return self.history
            self.x, self.y = self.objective.setup(self.model, self.x, self.y)
            self.features.announce(self.objective)
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
                    kept = self.features.kept() if probe is not None else None
                    rec = self._epoch(epoch)
                    if probe is not None:
                        value = probe.measure(
                            self.model, seeded(self.cfg.seed, epoch, 2, self.device)
                        )
                        self.stopped = probe.judge(
                            value, rec, self.history, self.model, self.optimizer, self.objective
                        )
                        if "overfit" in rec:  # the average goes back too
                            self.features.restore(kept)
                    best = self.features.select(self.history, rec)
                    self.history.append(rec)
                    if self.out is not None:
                        self._checkpoint(epoch + 1, best)
                    self.log.write(rec)
                    self.log.show(postfix(epoch, self.passes, rec, self.history), refresh=False)
                    with self.log.aside():  # the callback may print
                        if self.callback is not None:
                            self.callback(rec)
                    if self.stopped:
                        break
                self.features.finish(self.model)
            finally:
                self.log.close()
        return self.history

    def _open_log(self, start: int) -> None:
        """The bar over the batches of every pass, standing at the start of pass ``start``,
        and TensorBoard holding the history's scalars."""
        per_pass = math.ceil(len(self.x) / self.cfg.batch_size)
        self.log.open(
            total=self.passes * per_pass,
            initial=start * per_pass,
            desc="training",
            history=self.history,
        )
        if self.history:
            self.log.show(postfix(start - 1, self.passes, self.history[-1], self.history))

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, n, m, world = self.cfg, len(self.x), self.objective.replays, self.world
        order = torch.randperm(n, generator=seeded(cfg.seed, epoch, 0, torch.device("cpu")))
        gen = seeded(cfg.seed, epoch, 1, self.device, world.rank)
        crops = seeded(cfg.seed, epoch, 4, torch.device("cpu"))  # the same on every rank
        if world.rank > 0:  # rank 0 carries its RNG state; the others start each epoch anew
            torch.set_rng_state(
                seeded(cfg.seed, epoch, 3, torch.device("cpu"), world.rank).get_state()
            )
        batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        awp = cfg.awp and epoch >= cfg.awp_warmup
        self.model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        lr, scale_lr = cfg.lr, 0.5 ** sum(r.get("overfit") == "rolled back" for r in self.history)
        for i, idx in enumerate(batches):
            xb, yb = self._batch(idx, crops)
            # DDP averages the ranks' gradients: weigh each rank's mean by its share
            weight = len(yb) * world.size / len(idx)
            for r in range(m):
                progress = (epoch * len(batches) * m + i * m + r) / len(batches)
                lr = scale_lr * lr_at(
                    cfg.schedule, cfg.lr, progress, self.passes * m, **cfg.schedule_options
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                total += self._step(
                    xb, yb, gen, weight, f"epoch {epoch + 1}, batch {i}", awp
                ) * len(yb)
                seen += len(yb)
            self.log.advance(
                postfix(epoch, self.passes, {"train_loss": total / seen, "lr": lr}, self.history)
            )
        if self.average is not None:  # SWA: fold in this epoch, BatchNorm on the data
            self.average.end_epoch(self.model, epoch + 1, self.x.split(cfg.batch_size))
        train_time = time.perf_counter() - t0
        total, seen_all = distributed.all_sum([total, float(seen)], world, self.device)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": total / seen_all,
            "train_time_s": train_time,
        }
        if m > 1:
            rec["epochs_equivalent"] = (epoch + 1) * m
        rec |= self.objective.epoch_log()
        if self.average is not None:
            rec["weights"] = self.average.kind if self.average.ready else "raw"
        if due(epoch, self.passes, cfg.val_every):
            self.features.validate(rec, self.model, self.val, world, self.objective)
        self.model.train()
        return rec

    def _batch(self, idx: Tensor, crops: torch.Generator) -> tuple[Tensor, Tensor]:
        """This rank's share of the global batch ``idx`` on the device, augmented with
        draws for the whole global batch (so every rank count augments alike)."""
        local = distributed.shard(idx, self.world)
        xb, yb = self.x[local].to(self.device), self.y[local].to(self.device)
        xb = self.features.augmented(xb, len(idx), crops, self.world)
        if self.cfg.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def _step(
        self,
        xb: Tensor,
        yb: Tensor,
        gen: torch.Generator,
        weight: float,
        where: str,
        awp: bool = False,
    ) -> float:
        """One optimiser step on the objective's loss (scaled by ``weight``); its value. With
        ``awp`` the loss is taken at the perturbed weights ``w + v`` and ``v`` is removed after
        the optimiser step (:mod:`robustlab.training.awp`)."""
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            loss, v = self.features.loss(self.step, xb, yb, gen, self.world, weight, awp)
        try:
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at {where}; lower "
                    "the learning rate or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (loss * weight if weight != 1 else loss).backward()
            self.objective.after_backward()
            if self.cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        finally:
            AWP.apply(v, -1.0)
        self.features.after_step(self.model, self.objective)  # the hooks, then the average
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
    trainer = Trainer(
        model,
        data,
        cfg,
        threat=threat,
        out=out,
        val=val,
        progress=progress,
        callback=callback,
        tensorboard=tensorboard,
    )
    return trainer.run(resume=resume)
