"""Robust self-training (Carmon, Raghunathan, Schmidt, Liang, Duchi, "Unlabeled Data Improves
Adversarial Robustness", NeurIPS 2019, https://arxiv.org/abs/1905.13736; reference code
github.com/yaircarmon/semisup-adv).

    1. a naturally trained teacher labels the unlabelled pool: y~_i = argmax f_t(x_i);
    2. a robust objective (TRADES, beta = 6, in the paper) is minimised on labelled + pseudo-
       labelled data: L = base(model, x, y or y~).

The unlabelled pool (:mod:`~robustlab.training.objectives.pool`) is given as data
(``unlabeled``: images appended to the training set) and/or emulated by hiding labels (the
first ``labeled`` training images keep theirs); its images get the teacher's predictions in
:meth:`setup` (the trainer calls it once with the whole training set, before training and again
on resume). The base objective sees the pseudo-labels as labels. ``pseudo_label_accuracy``
says how many pseudo-labels of the hidden-label part agree with the hidden ones (also logged).

Original setting: CIFAR-10 with 500K pseudo-labelled Tiny Images, TRADES beta 6, eps 8/255,
10 steps of 2/255, half of every batch unlabelled (``unsup_fraction`` 0.5), 200 epochs. Here the
batches are drawn uniformly from the mixed set, so the unlabelled fraction per batch is the
pool's share of the data in expectation (0.5 for 30000 of 60000 labelled), not exactly.
Cost: the base objective's, plus one teacher forward per unlabelled image at setup.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.threat import ThreatModel
from robustlab.training.objectives import create, register
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.distillation import Teacher, check_teacher, teacher_name
from robustlab.training.objectives.pool import check_pool, describe, join, teacher_logits

log = logging.getLogger(__name__)


@register("rst")
class RST(Objective):
    """A robust ``base`` objective on labelled plus teacher-pseudo-labelled data.

    Args:
        teacher: a naturally trained model: a robustlab checkpoint path or an ``nn.Module``
            (required).
        labeled: number of leading training images that keep their labels (>= 0); the rest
            join the unlabelled pool (their labels are never read). ``None``: all keep theirs.
        unlabeled: unlabelled images (N, C, H, W) in the threat's bounds, appended to the
            training set with pseudo-labels. ``labeled`` or ``unlabeled`` (or both) is required.
        base: registered objective applied to every minibatch of the mix, default ``"trades"``.
        base_options: its options; ``None`` means ``{"beta": 6.0}`` for trades (RST's value),
            ``{}`` otherwise.

    Attributes set by :meth:`setup`: ``pseudo_label_accuracy`` (fraction of pseudo-labels equal
    to the hidden labels, ``None`` without a pool) and ``pseudo_label_errors`` (their number).
    """

    def __init__(
        self,
        teacher: Teacher | None = None,
        labeled: int | None = None,
        base: str = "trades",
        base_options: dict[str, Any] | None = None,
        unlabeled: Tensor | None = None,
    ) -> None:
        if teacher is None:
            raise ValueError(
                "rst needs teacher=<path to a naturally trained robustlab "
                "checkpoint, or an nn.Module> (see configs/rst_teacher.toml)"
            )
        check_teacher(teacher, "rst")
        check_pool(labeled, unlabeled, "rst")
        if base == "rst":
            raise ValueError("rst base must be another objective, e.g. 'trades' or 'pgd-at'")
        if base_options is None:
            base_options = {"beta": 6.0} if base == "trades" else {}
        if not isinstance(base_options, dict):
            raise TypeError(f"rst base_options must be a dict, got {base_options!r}")
        self.teacher, self.labeled, self.unlabeled = teacher, labeled, unlabeled
        self.base_name, self.base_options = base, dict(base_options)
        self.base = create(base, **base_options)
        # follow the base (instance attributes shadow the class defaults)
        self.replays = self.base.replays
        self.needs_threat = self.base.needs_threat
        self.single_step = self.base.single_step  # type: ignore[misc]
        self.pseudo_label_accuracy: float | None = None
        self.pseudo_label_errors: int | None = None

    def config(self) -> dict:
        pool = {} if self.unlabeled is None else {"unlabeled": describe(self.unlabeled)}
        return (
            super().config()
            | {
                "teacher": teacher_name(self.teacher),
                "labeled": self.labeled,
                "base": self.base_name,
                "base_options": {k: v for k, v in self.base.config().items() if k != "name"},
            }
            | pool
        )

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_all, y_all, pool = join(x, y, self.labeled, self.unlabeled, "rst")
        if not len(pool):
            log.warning(
                "rst: labeled=%s covers the whole training set and no unlabeled "
                "images are given; no pseudo-labels",
                self.labeled,
            )
            return self.base.setup(model, x_all, y_all)
        preds = teacher_logits(self.teacher, pool, model, x, "rst").argmax(1)
        k = len(y_all) - len(pool)
        y_all[k:] = preds.to(y_all.device)
        hidden = len(x) - k  # the pool's hidden-label part, whose labels we can compare
        if hidden:
            errors = int((y_all[k : len(x)] != y[k:]).sum())
            self.pseudo_label_errors = errors
            self.pseudo_label_accuracy = 1.0 - errors / hidden
            log.info(
                "rst: %d pseudo-labels, %.2f%% agree with the hidden labels",
                len(pool),
                100 * self.pseudo_label_accuracy,
            )
        else:
            log.info("rst: %d pseudo-labels of the given unlabelled images", len(pool))
        return self.base.setup(model, x_all, y_all)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        return self.base(model, x, y, threat=threat, generator=generator)

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.base.begin_epoch(epoch, epochs)

    def after_backward(self) -> None:
        self.base.after_backward()

    def state_dict(self) -> dict[str, Tensor]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.base.load_state_dict(state)
