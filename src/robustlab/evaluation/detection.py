"""Detection figures of an evaluation of a detector: how well its score tells each attack's
outputs from clean inputs.

For a model that rejects (it declares ``rejects``: K + 1 outputs, the last one "rejected"),
:func:`~robustlab.evaluation.evaluate` records under ``detection``:

- ``clean_fpr``: the fraction of the n clean test points the detector rejects (its
  false-positive rate there; the fitted rate is the one it aimed at on held-out training
  points);
- per stage of the cascade, in the order of ``per_attack``, over that attack's outputs on the
  points it attacked (the points no earlier stage broke: clean-correct and not rejected):
  ``auroc``, the area under the ROC curve of the detection score with those outputs as the
  positives and the n clean test points as the negatives (:func:`auroc`: the probability that
  an output scores above a clean point, ties counted half); ``tpr``, the fraction of those
  outputs rejected (the true-positive rate at the fitted threshold); ``fooled``, how many of
  them the classifier alone (the first K outputs) misclassifies, and ``tpr_fooled``, the
  fraction of those rejected (the detection rate of the adversarial examples proper).

The score is the detector's own ``score(x)`` where the model has one (robustlab's
:class:`~robustlab.defenses.detector.Detector`; ``score: "score"``), else the rejection margin
``z_K - max_{k < K} z_k`` of its outputs, positive exactly where it rejects
(``"rejection-margin"``); ``threshold``, ``fitted_fpr`` and ``fit_samples`` are the
detector's (None where it has none: a threshold given rather than fitted has no
``fit_samples``), ``left_out`` the suite's stages that could not run, with the reason. The cascade
(:mod:`~robustlab.evaluation.cascade`) keeps only each point's worst case, so the attacks'
outputs are scored as they are made: :class:`DetectionWatch` wraps each attack of the cascade
and scores what it returns. A stage that did not run in this session (skipped, or finished
before an interrupted evaluation resumed) has no figures, and says why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import check_logits
from robustlab.attacks import Attack, AttackResult
from robustlab.evaluation.adapt import Step

#: what the figures of a stage are computed over, in words (recorded beside them)
OVER = (
    "each stage's outputs on the points it attacked (positives) against the n clean test "
    "points (negatives); tpr: the fraction of those outputs rejected"
)


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """The area under the ROC curve of scores where higher means positive: the probability that
    a positive scores above a negative, a tie counted half (the Mann-Whitney statistic divided
    by ``len(negatives) * len(positives)``), exact: counts, then one division. Both sets must
    be non-empty and free of NaN."""
    neg = negatives.detach().flatten().double().cpu().sort().values
    pos = positives.detach().flatten().double().cpu()
    if not len(neg) or not len(pos):
        raise ValueError(
            f"the AUROC needs scores of both kinds, got {len(neg)} negatives and "
            f"{len(pos)} positives"
        )
    if torch.isnan(neg).any() or torch.isnan(pos).any():
        raise ValueError(
            "the detection scores contain NaN: the AUROC is undefined; check the "
            "detector's score on these inputs"
        )
    below = torch.searchsorted(neg, pos, right=False)  # negatives strictly below each positive
    at_or_below = torch.searchsorted(neg, pos, right=True)
    wins = 2 * below.sum() + (at_or_below - below).sum()  # twice the statistic: integers
    return float(wins) / (2 * len(neg) * len(pos))


def score_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per input of ``x`` (on the model's device), on the CPU: the detection score (the
    model's ``score(x)`` if it has one, else the rejection margin ``z_K - max_{k<K} z_k``),
    whether the model rejects it (its prediction is the last output) and the classifier's own
    prediction (the argmax of the first K outputs). One forward pass, no gradients."""
    with torch.no_grad():
        z = check_logits(model(x), len(x))
        k = z.shape[1] - 1
        score = score_of(model)
        s = score(x) if score is not None else z[:, k] - z[:, :k].amax(1)
        return s.double().cpu(), (z.argmax(1) == k).cpu(), z[:, :k].argmax(1).cpu()


def score_of(model: nn.Module) -> Any:
    """The model's own detection score ``score(x) -> (N,)`` where it has one, else None."""
    score = getattr(model, "score", None)
    return score if callable(score) else None


class _Tally:
    """One stage's scored outputs, batch by batch."""

    def __init__(self) -> None:
        self.scores: list[Tensor] = []
        self.rejected: list[Tensor] = []
        self.fooled: list[Tensor] = []

    def points(self) -> int:
        return sum(len(s) for s in self.scores)


class Watched:
    """An attack of the cascade whose outputs are scored by the detector as they are made:
    calling it calls the attack, then scores ``res.x_adv`` on ``model`` (the detector itself,
    not the view the attack may see) into ``tally``; every other attribute is the attack's."""

    def __init__(self, attack: Attack, model: nn.Module, tally: _Tally) -> None:
        self.attack, self._model, self._tally = attack, model, tally

    def __getattr__(self, name: str) -> Any:
        if "attack" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["attack"], name)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> AttackResult:
        res = self.attack(model, x, y, **kw)
        s, rejected, pred = score_outputs(self._model, res.x_adv)
        self._tally.scores.append(s)
        self._tally.rejected.append(rejected)
        self._tally.fooled.append(pred != y.cpu())
        return res


class DetectionWatch:
    """Scores a detector's clean inputs and every attack's outputs in one evaluation, and turns
    them into the record's ``detection`` section (see the module docstring)."""

    def __init__(self, model: nn.Module, steps: list[Step]) -> None:
        self.model = model
        self.tallies = [_Tally() for _ in steps]
        self.steps = [
            Step(Watched(s.attack, model, t), s.skipped)  # type: ignore[arg-type]
            for s, t in zip(steps, self.tallies, strict=True)
        ]
        self.clean: tuple[Tensor, Tensor] | None = None
        self.start = (0, 0)

    def score_clean(self, x: Tensor, batch_size: int, device: torch.device) -> None:
        """Score the clean test points ``x`` (on the CPU)."""
        parts = [
            score_outputs(self.model, x[i : i + batch_size].to(device))
            for i in range(0, len(x), batch_size)
        ]
        self.clean = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def resumed_at(self, attack: int, batch: int) -> None:
        """Where the cascade starts in this session (an interrupted run resumes there)."""
        self.start = (attack, batch)

    def figures(
        self, per_attack: list[dict[str, Any]], left_out: list[str] | None = None
    ) -> dict[str, Any]:
        """The ``detection`` section, its stages aligned with ``per_attack``; ``left_out``:
        the stages of the suite that were not run, each with its reason."""
        if self.clean is None:
            raise ValueError("score the clean points first (DetectionWatch.score_clean)")
        clean_s, clean_rej = self.clean
        stages = [self._stage(i, a, clean_s) for i, a in enumerate(per_attack)]
        return {
            "score": "score" if score_of(self.model) is not None else "rejection-margin",
            "threshold": _number(getattr(self.model, "threshold", None)),
            "fitted_fpr": _number(getattr(self.model, "fpr", None)),
            "fit_samples": _count(getattr(self.model, "fit_samples", None)),
            "clean_fpr": float(clean_rej.double().mean()) if len(clean_rej) else None,
            "clean_points": len(clean_s),
            "over": OVER,
            "stages": stages,
            "left_out": list(left_out or []),
        }

    def _stage(self, i: int, a: dict[str, Any], clean_s: Tensor) -> dict[str, Any]:
        tally = self.tallies[i]
        m = tally.points()
        row: dict[str, Any] = {
            "stage": a["attack"],
            "joint": joint_stage(a["config"]),
            "points": m,
            "auroc": None,
            "tpr": None,
            "fooled": 0,
            "tpr_fooled": None,
        }
        if a.get("skipped"):
            return row | {"note": f"skipped: {a['skipped']}"}
        if i < self.start[0]:
            return row | {
                "note": "ran before the evaluation was resumed: its outputs were not kept"
            }
        if m:
            s, rej = torch.cat(tally.scores), torch.cat(tally.rejected)
            fooled = torch.cat(tally.fooled)
            row |= {
                "auroc": auroc(clean_s, s) if len(clean_s) else None,
                "tpr": float(rej.double().mean()),
                "fooled": int(fooled.sum()),
                "tpr_fooled": float(rej[fooled].double().mean()) if fooled.any() else None,
            }
        if i == self.start[0] and self.start[1] and m < a.get("attacked", m):
            row["note"] = (
                f"resumed within this stage: over the {m} of its {a['attacked']} "
                "points attacked after the resume"
            )
        elif not m:
            row["note"] = "no point left to attack"
        return row


def joint_stage(cfg: dict[str, Any]) -> bool:
    """Whether an attack (its recorded config) is one of the adaptive attacks on a detector:
    a loss on the joint classifier-and-detector (``detector-margin``), or high-confidence C&W
    (``kappa`` > 0) crafted on the classifier and replayed on the detector."""
    inner = cfg.get("attack") if cfg.get("name") == "transfer" else None
    if isinstance(inner, dict):
        return inner.get("name") == "cw-linf" and inner.get("kappa", 0) > 0
    return cfg.get("loss") == "detector-margin"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int) else None
