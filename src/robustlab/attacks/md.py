"""Margin-decomposition attack (Xingjun Ma, Linxi Jiang, Hanxun Huang, Zejia Weng, James Bailey,
Yu-Gang Jiang, "Imbalanced Gradients: A Subtle Cause of Overestimated Adversarial Robustness",
Machine Learning 2023, https://arxiv.org/abs/2006.13726): PGD on one term of the margin at a
time, then on the whole margin, for models whose margin gradient is dominated by one term.

Distance: linf, l2. Attacks: ``md``, ``md-mt`` (multi-targeted). Both run PGD's loop
(:class:`~robustlab.attacks.pgd.PGD`) with their own loss and step-size schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.attacks.losses import cw_margin, is_success, rejects
from robustlab.attacks.optimizers import StepRule
from robustlab.attacks.pgd import PGD, LossAt, _Best
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

__all__ = ["MD", "MDMT", "TERMS", "step_sizes", "term_at"]


def _true(logits: Tensor, y: Tensor) -> Tensor:
    return logits.gather(1, y[:, None]).squeeze(1)


def _other(logits: Tensor, y: Tensor, t: Tensor | None) -> Tensor:
    """``z_t`` for targets ``t``; without targets ``max_{j != y} z_j``."""
    if t is not None:
        return logits.gather(1, t[:, None]).squeeze(1)
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


#: the losses of MD's schedule, to maximise, each ``(logits, y, targets or None) -> (N,)`` in
#: logit units: ``"true"`` = ``-z_y``, ``"other"`` = ``z_max = max_{j != y} z_j`` (MD-MT: the
#: target's ``z_t``), ``"margin"`` = ``other - z_y`` (positive iff that class beats ``y``)
TERMS: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "true": lambda logits, y, t: -_true(logits, y),
    "other": _other,
    "margin": lambda logits, y, t: _other(logits, y, t) - _true(logits, y),
}


def term_at(step: int, run: int, change_point: int) -> str:
    """The :data:`TERMS` entry MD maximises at ``step`` (0-based) of ``run`` (0-based; runs
    alternate 0, 1 within each random start): ``"true"`` (run 0) or ``"other"`` (run 1)
    before ``change_point``, ``"margin"`` from it on."""
    if step >= change_point:
        return "margin"
    return ("true", "other")[run % 2]


def step_sizes(first: float, steps: int, change_point: int) -> list[float]:
    """The lp length of each of the ``steps`` steps of a run, in input units: cosine
    annealing from ``first``, restarted at ``change_point``: step ``i`` of a stage (0-based)
    has ``first * (1 + cos(pi * i / P)) / 2``, with the period ``P = max(change_point, steps -
    change_point)`` (the authors' ``steps - change_point`` whenever the second stage is the
    longer, as in their settings)."""
    period = max(change_point, steps - change_point, 1)
    return [
        first * (1 + math.cos(math.pi * (i if i < change_point else i - change_point) / period)) / 2
        for i in range(steps)
    ]


@register("md")
class MD(PGD):
    """MD: for each random start, two runs of ``steps`` sign (linf) or normalised-gradient (l2)
    steps from a uniform point of the ball; before ``change_point``, run 0 maximises ``-z_y``
    (the true logit alone) and run 1 ``z_max = max_{j != y} z_j`` (the largest other logit
    alone); from ``change_point`` on both maximise the margin ``z_max - z_y``
    (:func:`term_at`). Step lengths follow :func:`step_sizes`. A point leaves the batch at its
    first misclassified iterate, and later runs attack only the points still unbroken.

    When the gradient of one margin term dwarfs the other's (a saturating true-class logit, a
    steep but bounded wrong-class logit), the margin's gradient follows the large term even
    where the small one leads across the boundary; attacking each term alone first finds that
    path (the paper's "imbalanced gradients").

    Args:
        threat: threat model (linf or l2); every iterate stays in its ball and bounds.
        steps: steps per run, N (>= 1). Default 50 (the authors').
        change_point: steps of the first stage, in [0, N] (0: the margin only; N: the single
            terms only). Default ``round(0.4 N)``, 20 of 50 (the authors' experiments).
        restarts: random starts (>= 1), each two runs. Default 1.
        step_size: first (largest) step of each stage, lp length in input units (> 0).
            Default ``2 eps``.
        seed: seed of the attack's generator when the call passes none.

    Shapes: x (N, ...) in the threat bounds, y (N,) int64. Returns each point's first
    misclassified iterate, else the last iterate with the highest C&W margin
    ``max_(j != y) z_j - z_y`` over its runs; ``res.loss`` is that margin (positive iff broken).
    Cost: at most ``2 restarts N`` forward/backward passes and ``2 restarts`` forward passes
    per point (the authors' 2 x 50 per start), spent only while the point is unbroken.

    Differences from the reference code (HanxunH/MDAttack, ``attacks/MD.py``): its step 0
    ascends ``z_y`` (towards the true class; not in the paper's description): ours starts the
    first stage at step 0; its change-point step keeps the first stage's annealed length, ours
    restarts at ``step_size``; points leave the batch once broken (the reference attacks every
    point in every run and keeps its last misclassified iterate); a point never broken returns
    its best iterate (the reference returns the clean point); the loss is per sample (the
    reference's batch mean has the same sign steps). Ours, not the paper's: l2 (steps of l2
    length from :func:`step_sizes`, ``2 eps`` first). Not built in: the DLR variant
    (``use_dlr``), ODI starts, the MDE ensemble.

    Example:
        >>> res = MD(ThreatModel("linf", 8 / 255))(model, x, y)
        >>> robust_acc = res.robust_accuracy
    """

    norms = ("linf", "l2")
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 50,
        change_point: int | None = None,
        restarts: int = 1,
        step_size: float | None = None,
        seed: int = 0,
    ) -> None:
        starts = positive_int(restarts, "restarts")
        super().__init__(
            threat,
            steps=steps,
            restarts=2 * starts,
            loss="cw-margin",
            early_stop=True,
            keep_best=False,
            seed=seed,
        )
        self.starts = starts
        cp = round(0.4 * self.steps) if change_point is None else change_point
        self.change_point = integer(cp, "change_point", minimum=0, maximum=self.steps)
        if step_size is None:
            self.step_size = 2 * threat.eps
        else:
            self.step_size = number(step_size, "step_size", low=0, low_open=True)
        self._sizes = step_sizes(self.step_size, self.steps, self.change_point)
        self._run = self._i = 0  # the run and the step the loop is at (set by _rule, _step)

    def config(self) -> dict[str, Any]:
        drop = ("random_start", "early_stop", "keep_best", "optimizer")
        cfg = {n: v for n, v in super().config().items() if n not in drop}
        # runs: the two first-stage terms, each a run from every random start
        return cfg | {"restarts": self.starts, "change_point": self.change_point, "runs": 2}

    def _rule(self) -> StepRule:
        """PGD asks for a fresh rule at the start of each run: count the run, reset the step."""
        self._run, self._i = self._run + 1, 0
        return super()._rule()

    def _step(self, xa: Tensor, d: Tensor, x: Tensor) -> Tensor:
        step = self.threat.steepest_step(d, self._sizes[self._i])
        self._i += 1
        return self.threat.project(xa + step, x)

    def _scheduled(self, model: nn.Module, targets: Tensor | None) -> LossAt:
        """The :data:`~robustlab.attacks.pgd.LossAt` of the current run and step; ``targets``
        (n,): MD-MT's target class of each attacked row."""

        def f(xa: Tensor, y: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            t = targets if targets is None or rows is None else targets[rows]
            term = TERMS[term_at(self._i, self._run, self.change_point)]
            return term(logits, y, t), logits

        return f

    def _runs(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        targets: Tensor | None = None,
    ) -> Tensor:
        self._run = -1
        return PGD.perturb(self, model, x, y, generator, loss=self._scheduled(model, targets))

    # PGD.perturb's loss= option is fixed by this attack, so it does not take it
    def perturb(  # type: ignore[override]
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Tensor:
        return self._runs(model, x, y, generator)


@register("md-mt")
class MDMT(MD):
    """MD-MT: :class:`MD` once per target class ``t``, the ``k`` classes other than ``y`` with
    the largest clean logits, most likely first, each on the points no earlier target broke:
    run 0 maximises ``-z_y`` and run 1 ``z_t`` before ``change_point``, both ``z_t - z_y``
    after. Success is any misclassification.

    Args:
        k: number of targets (>= 1), capped at classes - 1. Default 9 (every other class of
            CIFAR-10, as the authors).
        threat, steps, change_point, restarts, step_size, seed: as :class:`MD` (restarts per
            target).

    Returns as :class:`MD`. Cost: at most ``k`` times MD's, plus one forward pass on the clean
    points and one per target. Difference from the reference code (``MDMTAttack``): it targets
    every class, the predicted one included, by clean-logit rank 9, 8, ..., 1, then 10; ours
    the k most likely classes other than ``y``, most likely first (as MM and APGD-T).

    Example:
        >>> res = MDMT(ThreatModel("linf", 8 / 255), k=3)(model, x, y)
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        k: int = 9,
        steps: int = 50,
        change_point: int | None = None,
        restarts: int = 1,
        step_size: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            change_point=change_point,
            restarts=restarts,
            step_size=step_size,
            seed=seed,
        )
        self.k = positive_int(k, "k")

    def config(self) -> dict[str, Any]:
        return super().config() | {"k": self.k}

    # PGD.perturb's loss= option is fixed by this attack, so it does not take it
    def perturb(  # type: ignore[override]
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Tensor:
        with torch.no_grad():
            clean = model(x)
        order = clean.masked_fill(F.one_hot(y, clean.shape[1]).bool(), float("-inf"))
        order = order.argsort(dim=1, descending=True)
        best, reject = _Best(x), rejects(model)
        for r in range(min(self.k, clean.shape[1] - 1)):
            idx = (~best.success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = self._runs(model, x[idx], y[idx], generator, order[idx, r])
            with torch.no_grad():
                logits = model(xa)
            best.update(
                idx, xa, cw_margin(logits, y[idx], False), is_success(logits, y[idx], False, reject)
            )
        return best.x
