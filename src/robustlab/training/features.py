"""The trainer's optional parts, built from its settings: the hold-out for model selection, the
weight average, AWP, augmentation and label smoothing (issue 23). Each part's method lives in
its own module (:mod:`~robustlab.training.selection`, :mod:`~robustlab.training.averaging`,
:mod:`~robustlab.training.awp`, :mod:`~robustlab.training.augment`,
:mod:`~robustlab.training.split_loss`); this class only says where the trainer's loop calls
them, so :mod:`~robustlab.training.trainer` stays one readable loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import distributed, models
from robustlab.evaluation.validation import evaluate_epoch
from robustlab.threat import ThreatModel
from robustlab.training.augment import Augment, flips_for
from robustlab.training.averaging import WeightAverage
from robustlab.training.awp import AWP
from robustlab.training.config import TrainConfig
from robustlab.training.objectives.base import Objective
from robustlab.training.selection import best_epoch, hold_out, selection_key
from robustlab.training.split_loss import SPLITS, TrainStep

BEST_FILE = "model_best.safetensors"


class Features:
    """The optional parts of a run of ``cfg`` on ``model`` with training data ``data``:
    :attr:`data` is what is left to train on, :attr:`holdout` the held-out pair (or None),
    :attr:`step` the step module (the objective's loss, split for AWP or label smoothing)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        objective: Objective,
        data: tuple[Tensor, Tensor],
        threat: ThreatModel | None,
        out: Path | None,
    ) -> None:
        if cfg.keep_best and out is None:
            raise ValueError(f"keep_best writes out/{BEST_FILE}: pass out=... (--out)")
        self.cfg, self.threat = cfg, threat
        self.data, self.holdout = hold_out(*data, cfg.val_split)
        self.augment: Augment | None = None
        if cfg.augment:
            x = self.data[0]
            if x.dim() != 4:
                raise ValueError(
                    f"augment = true crops and flips images (N, C, H, W); the "
                    f"training inputs have shape {tuple(x.shape)}: set "
                    "augment = false"
                )
            lo, hi = threat.bounds if threat is not None else (0.0, 1.0)
            self.augment = Augment(
                cfg.crop_pad, flips_for(cfg.flip, cfg.dataset), fill=min(max(0.0, lo), hi)
            )
        self.average = (
            None
            if cfg.average == "none"
            else WeightAverage(model, cfg.average, decay=cfg.ema_decay, start=cfg.swa_start)
        )
        self.awp = AWP(cfg.awp_gamma) if cfg.awp else None
        split = SPLITS[cfg.objective] if cfg.awp or cfg.label_smoothing else None
        self.step = TrainStep(model, objective, split, cfg.label_smoothing)

    def shown(self, model: nn.Module) -> nn.Module:
        """The weights that are validated and saved: the average once it holds weights."""
        return self.average.model if self.average is not None and self.average.ready else model

    def augmented(
        self, xb: Tensor, size: int, crops: torch.Generator, world: distributed.World
    ) -> Tensor:
        """This rank's share ``xb`` of a global batch of ``size`` examples, augmented with
        draws for the whole global batch (so every rank count augments alike)."""
        if self.augment is None:
            return xb
        offsets, flips = self.augment.draw(size, crops)
        rows = distributed.shard(torch.arange(size), world)
        return self.augment.apply(xb, offsets[rows], flips[rows])

    def loss(
        self,
        step: nn.Module,
        xb: Tensor,
        yb: Tensor,
        gen: torch.Generator,
        world: distributed.World,
        weight: float,
        awp: bool,
    ) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        """The step's loss through ``step`` (the DDP-wrapped :attr:`step`), and the weight
        perturbation ``v`` it was taken at (empty without ``awp``); the caller removes ``v``
        after the optimiser step."""
        if not awp:
            return step(xb, yb, self.threat, gen), []
        assert self.awp is not None
        x_adv = self.step.craft(xb, yb, self.threat, gen)
        v = self.awp.perturbation(
            self.step.model, lambda: self.step.outer(xb, x_adv, yb), world, weight
        )
        AWP.apply(v, 1.0)
        try:
            return step(xb, yb, self.threat, gen, x_adv), v
        except BaseException:
            AWP.apply(v, -1.0)
            raise

    def announce(self, objective: Objective) -> None:
        """Tell ``objective`` before training that the run has a hold-out (its size only)."""
        if self.holdout is not None:
            objective.record_validation({"holdout_n": len(self.holdout[0])})

    def after_step(self, model: nn.Module, objective: Objective) -> None:
        """What follows every optimiser step (AWP's ``v`` removed): the objective's
        ``after_step()``, ``robustlab_after_step()`` of every module of ``model`` that defines
        one (model options, e.g. Parseval's retraction), then the average takes the weights."""
        objective.after_step()
        for module in model.modules():
            hook = getattr(module, "robustlab_after_step", None)
            if callable(hook):
                hook()
        if self.average is not None:
            self.average.after_step(model)

    def validate(
        self,
        rec: dict[str, Any],
        model: nn.Module,
        val: tuple[Tensor, Tensor] | None,
        world: distributed.World,
        objective: Objective | None = None,
    ) -> None:
        """Clean and robust accuracy of the shown weights on ``val`` (``val_*`` keys) and on
        the hold-out (``holdout_*``) into ``rec``; the hold-out's entries (never ``val``'s)
        go to ``objective.record_validation``."""
        cfg, shown, t1 = self.cfg, self.shown(model), time.perf_counter()

        def run(x: Tensor, y: Tensor) -> dict[str, float]:
            size = max(cfg.batch_size, 256)
            return evaluate_epoch(
                shown,
                x,
                y,
                self.threat,
                cfg.val_attack,
                batch_size=size,
                world=world,
                seed=cfg.seed,
            )

        if val is not None:
            rec |= run(*val)
            rec |= {"val_attack": cfg.val_attack, "val_n": len(val[0])}
        if self.holdout is not None:
            got = run(*self.holdout)
            rec |= {k.replace("val_", "holdout_", 1): v for k, v in got.items()}
            rec |= {"val_attack": cfg.val_attack, "holdout_n": len(self.holdout[0])}
            if objective is not None:
                objective.record_validation(
                    {k: v for k, v in rec.items() if k.startswith("holdout_")}
                )
        if val is not None or self.holdout is not None:
            rec["val_time_s"] = time.perf_counter() - t1

    def select(self, history: list[dict[str, Any]], rec: dict[str, Any]) -> bool:
        """Mark ``rec`` with the best hold-out epoch so far (``best_epoch``); True if
        ``keep_best`` and it is ``rec``'s own."""
        if self.holdout is None:
            return False
        found = best_epoch([*history, rec], selection_key(self.threat is not None))
        if found is None:
            return False
        rec["best_epoch"] = found[0]
        return self.cfg.keep_best and found[0] == rec["epoch"]

    def save(
        self, model: nn.Module, path: Path, meta: dict[str, Any], rec: dict[str, Any], best: bool
    ) -> None:
        """The shown weights to ``path`` with ``meta`` (and what they are: ``weights``) and,
        if ``best``, to :data:`BEST_FILE` beside it, with the value that chose them."""
        if self.average is not None:
            meta = meta | {"weights": rec["weights"]}
        shown = self.shown(model)
        models.save(shown, path, meta=meta)
        if best:
            key = selection_key(self.threat is not None)
            meta = meta | {"selected_by": {key: rec[key]}}
            models.save(shown, path.parent / BEST_FILE, meta=meta)

    def kept(self) -> dict[str, Tensor] | None:
        """A copy of the average's state (None without one), for :meth:`restore`."""
        if self.average is None:
            return None
        return {k: v.clone() for k, v in self.average.state_dict().items()}

    def restore(self, kept: dict[str, Tensor] | None) -> None:
        """Put back the average of :meth:`kept` (after a resume, or when the probe rolled the
        weights back)."""
        if self.average is not None and kept is not None:
            self.average.load_state_dict(kept)

    def finish(self, model: nn.Module) -> None:
        """``model`` takes the averaged weights, the ones ``model.safetensors`` holds."""
        if self.average is not None and self.average.ready:
            model.load_state_dict(self.average.model.state_dict())
