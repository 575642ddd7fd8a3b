"""Curriculum adversarial training (Cai, Liu, Song, "Curriculum Adversarial Training", IJCAI
2018, arXiv:1805.04807; no reference code was released).

An attack family A(k) whose strength grows with k: A(0) is the clean input, A(k) for k >= 1 is
PGD-k (random start, fixed step). Training goes through lessons l = 0, 1, ..., K; in lesson l
each minibatch is split into l + 1 near-equal parts, part j attacked with A(j) (batch mixing,
against forgetting the weaker attacks; ``mix=False`` attacks the whole batch with A(l)):

    L = (1/N) sum_i CE(f(A(j_i)(x_i)), y_i),   j_i = i mod (l + 1)

The lesson moves on (l <- l + 1, at most K) at the start of an epoch when the l-accuracy of
the epoch before (accuracy on the A(l) examples) has not improved for ``patience`` epochs
(the paper's criterion, patience 10) or, with ``threshold`` set, has reached the threshold
(for short runs, where 10 stale epochs never happen). The lesson, its best l-accuracy, its
stale epochs and the running counts are the objective's state (:meth:`state_dict`), so a
resumed run continues the same curriculum; under DDP the counts are summed over ranks.

Defaults: K = 10 PGD steps (pgd-at's), step ``2.5 eps / K``, patience 10 (paper). The paper's
K, eps, step and batch split are not known to us (unverified, card H4).

Which accuracy is judged. The paper judges the l-accuracy on a validation set. When the run
holds out training data (``val_split`` > 0), the trainer hands each check of the hold-out to
:meth:`record_validation` and the criteria judge its robust accuracy (``holdout_robust_acc``,
under the run's ``val_attack``, PGD-10 by default) instead: the next lesson starts at the
first epoch after a check where it reached ``threshold`` or has not improved for ``patience``
*checks* (one every ``val_every`` epochs); epochs without a check judge nothing. Without a
hold-out, the l-accuracy is measured on the training minibatches themselves (the A(l) rows,
from the logits of the training forward, train mode).

Differences from the paper: the hold-out is attacked by the ``val_attack``, not by A(l) (the
accuracy under A(K) when the ``val_attack`` is PGD-K); without a hold-out the accuracy comes
from training batches, not from a validation set; the paper's input quantization at inference
(a gradient-masking transform) is not part of the objective. Cost in lesson l: about 1 + (mean
attack steps) F/B per minibatch, l / 2 + 1 with mixing, l + 1 without; the hold-out's checks
are the trainer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import distributed
from robustlab._validate import number, positive_int
from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

_FIELDS = ("lesson", "best", "stale", "correct", "seen", "holdout", "pending")


@register("curriculum")
class Curriculum(Objective):
    """Mean CE over a minibatch attacked by PGD-0 ... PGD-l (lesson l), l raised by the
    lesson's accuracy.

    Args:
        max_steps: K, the last lesson's PGD steps (>= 1). Default 10.
        step_size: PGD step in input units (> 0); ``None`` means ``2.5 eps / max_steps``.
        patience: epochs (hold-out checks, with a hold-out) without a better accuracy before
            the next lesson (>= 1); ``None`` turns this criterion off. Default 10 (paper).
        threshold: accuracy in [0, 1] (l-accuracy, or hold-out robust accuracy) at which the
            next lesson starts; ``None`` (default) turns this criterion off.
        mix: split each minibatch over A(0) ... A(l) (paper) or attack all of it with A(l).
    """

    def __init__(
        self,
        max_steps: int = 10,
        step_size: float | None = None,
        patience: int | None = 10,
        threshold: float | None = None,
        mix: bool = True,
    ) -> None:
        positive_int(max_steps, "curriculum max_steps")
        if step_size is not None:
            number(step_size, "curriculum step_size", low=0, low_open=True)
        if patience is not None:
            positive_int(patience, "curriculum patience")
        if threshold is not None:
            number(threshold, "curriculum threshold", low=0, high=1)
        if patience is None and threshold is None:
            raise ValueError(
                "curriculum needs a criterion to move on: set patience (epochs) "
                "or threshold (an accuracy), or both"
            )
        self.max_steps, self.step_size, self.mix = max_steps, step_size, bool(mix)
        self.patience, self.threshold = patience, threshold
        self.lesson, self.best, self.stale = 0, -1.0, 0
        self.correct, self.seen = 0.0, 0.0
        # holdout: the trainer announced a hold-out; pending: its last check's robust
        # accuracy, not yet judged (-1: none)
        self.holdout, self.pending = False, -1.0

    def config(self) -> dict:
        return super().config() | {
            "max_steps": self.max_steps,
            "step_size": self.step_size,
            "patience": self.patience,
            "threshold": self.threshold,
            "mix": self.mix,
        }

    # --- the schedule ---------------------------------------------------------------------
    def record(self, correct: float, seen: float) -> None:
        """Count ``correct`` of ``seen`` A(l) examples towards this epoch's l-accuracy."""
        self.correct, self.seen = self.correct + float(correct), self.seen + float(seen)

    def record_validation(self, metrics: dict[str, float]) -> None:
        """Note that the run has a hold-out (its training batches are no longer judged) and
        keep its robust accuracy, if given, for the next :meth:`begin_epoch` to judge."""
        self.holdout = True
        if "holdout_robust_acc" in metrics:
            self.pending = float(metrics["holdout_robust_acc"])

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Judge the accuracy of the epoch that ended (if any): the hold-out's last check if
        the run has a hold-out, else the training batches' l-accuracy; start the next lesson
        when a criterion says so; the counts start again."""
        world = distributed.current()
        if world.size > 1:  # the process group's device, as distributed.init_from_env chose it
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
            self.correct, self.seen = distributed.all_sum([self.correct, self.seen], world, device)
        if self.holdout:
            if self.pending >= 0:
                self._judge(self.pending)
        elif self.seen > 0:
            self._judge(self.correct / self.seen)
        self.correct, self.seen, self.pending = 0.0, 0.0, -1.0

    def _judge(self, accuracy: float) -> None:
        """One look at the lesson's accuracy: the next lesson if a criterion is met."""
        improved = accuracy > self.best
        self.best, self.stale = max(self.best, accuracy), 0 if improved else self.stale + 1
        done = (self.threshold is not None and accuracy >= self.threshold) or (
            self.patience is not None and self.stale >= self.patience
        )
        if done and self.lesson < self.max_steps:
            self.lesson, self.best, self.stale = self.lesson + 1, -1.0, 0

    def epoch_log(self) -> dict[str, float]:
        """The lesson the pass trained in (its PGD steps), for the training log."""
        return {"lesson": self.lesson}

    def state_dict(self) -> dict[str, Tensor]:
        values = [
            self.lesson,
            self.best,
            self.stale,
            self.correct,
            self.seen,
            float(self.holdout),
            self.pending,
        ]
        return {"schedule": torch.tensor(values, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """The state of :meth:`state_dict` (7 values; the 5 of states saved before the
        hold-out hook load as a run without hold-out checks)."""
        shape = state["schedule"].shape if set(state) == {"schedule"} else None
        if shape not in ((len(_FIELDS),), (5,)):
            raise ValueError(
                f"curriculum state holds 'schedule' ({', '.join(_FIELDS)}), got {sorted(state)}"
            )
        values = state["schedule"].tolist() + [0.0, -1.0][len(state["schedule"]) - 5 :]
        lesson, best, stale, correct, seen, holdout, pending = values
        self.lesson, self.best, self.stale = int(lesson), best, int(stale)
        self.correct, self.seen = correct, seen
        self.holdout, self.pending = bool(holdout), pending

    # --- the loss -------------------------------------------------------------------------
    def strengths(self, n: int) -> Tensor:
        """PGD steps of each of ``n`` rows in the current lesson, shape (n,)."""
        if not self.mix:
            return torch.full((n,), self.lesson, dtype=torch.long)
        return torch.arange(n) % (self.lesson + 1)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        steps = self.strengths(len(x)).to(x.device)
        xa = x.detach().clone()
        step = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.max_steps
        for k in steps.unique().tolist():
            rows = steps == k
            if k > 0:
                attack = PGD(threat, steps=k, step_size=step, keep_best=False)
                xa[rows] = attack.craft(model, x[rows], y[rows], generator)
        logits = model(xa)
        top = steps == self.lesson
        self.record((logits[top].argmax(1) == y[top]).sum().item(), top.sum().item())
        return F.cross_entropy(logits, y)
