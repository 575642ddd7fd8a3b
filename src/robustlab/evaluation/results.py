"""The evaluation result: data first (JSON + per-sample JSONL), rendering elsewhere."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from robustlab._io import atomic_path, atomic_write
from robustlab._provenance import git_commit, versions
from robustlab._validate import one_of
from robustlab.evaluation.state import EvalState
from robustlab.report.summary import markdown
from robustlab.threat import ThreatModel

SCHEMA = "robustlab.evaluation/1"
EXAMPLES = "examples.safetensors"
N_EXAMPLES = 8  # adversarial examples kept beside the results for the report's image grid
#: how the minimal norms behind ``min_norm_curve`` were searched (see :func:`min_norm_curve`)
MIN_NORM_SEARCH = ("minimal", "early-stop")
#: a standard error of the robust accuracy above this (1 point) raises ``unstable-estimate``
UNSTABLE_SE = 0.01


@dataclass
class EvalResult:
    """Outcome of :func:`robustlab.evaluate`.

    Attributes:
        clean_accuracy: fraction of the n points classified correctly without attack.
        robust_accuracy: fraction still correct after every attack (per-sample worst case).
        per_attack: one dict per attack in cascade order: its config, points attacked, points
            it broke, robust accuracy after it, time.
        flags: sanity flags (``{"name", "message"}``); an empty list means none was raised.
        robust: bool (n,) per-sample outcome; x_adv: the worst-case inputs (n, ...), equal to
            the clean input where no attack succeeded; broken_by: per sample, ``"clean"``
            (misclassified without attack), the attack label that broke it, or None.
        record: the full JSON-able results document (schema, versions, seed, commit, ...).
        x: the clean inputs (n, ...), kept to save a few examples beside the results.
        robust_accuracy_se, clean_accuracy_se: their standard errors over the model's
            randomness (:func:`spread`; 0 for a deterministic model).
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    robust: Tensor
    x_adv: Tensor
    broken_by: list[str | None]
    per_sample: list[dict[str, Any]] = field(repr=False)
    record: dict[str, Any] = field(repr=False)
    x: Tensor | None = field(default=None, repr=False)
    robust_accuracy_se: float = 0.0
    clean_accuracy_se: float = 0.0

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, ``per_sample.jsonl`` and ``summary.md`` into ``out``, and
        with the clean inputs known, ``examples.safetensors``: a few clean and adversarial
        inputs with their labels and predictions (see :func:`example_indices`), named in the
        results under ``examples``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "results": out / "results.json",
            "per_sample": out / "per_sample.jsonl",
            "summary": out / "summary.md",
        }
        x = self.x
        idx = example_indices(self.per_sample) if x is not None else []
        if x is not None and idx:  # none where every point is misclassified without attack
            rows = [self.per_sample[i] for i in idx]
            tensors = {
                "index": torch.tensor(idx, dtype=torch.int64),
                "x": x[idx].float().contiguous(),
                "x_adv": self.x_adv[idx].float().contiguous(),
                "label": torch.tensor([r["label"] for r in rows], dtype=torch.int64),
                "clean_pred": torch.tensor([r["clean_pred"] for r in rows], dtype=torch.int64),
                "adv_pred": torch.tensor([r["adv_pred"] for r in rows], dtype=torch.int64),
            }
            paths["examples"] = out / EXAMPLES
            with atomic_path(paths["examples"]) as tmp:
                save_file(tensors, str(tmp))
            self.record["examples"] = {"file": EXAMPLES, "indices": idx}
        atomic_write(paths["results"], json.dumps(self.record, indent=2) + "\n")
        atomic_write(paths["per_sample"], "".join(json.dumps(r) + "\n" for r in self.per_sample))
        atomic_write(paths["summary"], markdown(self.record))
        return paths


def example_indices(per_sample: list[dict[str, Any]], k: int = N_EXAMPLES) -> list[int]:
    """Up to ``k`` points worth showing, in index order: the points an attack broke first
    (clean correct, adversarial wrong), then robust ones; never points misclassified without
    attack (their "adversarial" input is the clean one)."""
    broken = [i for i, r in enumerate(per_sample) if r["broken_by"] not in (None, "clean")]
    robust = [i for i, r in enumerate(per_sample) if r["broken_by"] is None]
    return sorted(broken[:k] + robust[: max(0, k - len(broken))])


def min_norm_curve(
    min_norm: Tensor, threat: ThreatModel, points: int = 41, *, search: str = "minimal"
) -> list[dict]:
    """Robust accuracy against eps from the per-sample minimal norms: robust at e iff the
    smallest adversarial perturbation found is larger than e (an upper bound, like any attack's
    number). ``search``: how the norms were found. ``"minimal"``: every minimum-norm attack ran
    its whole search (no early stop), so the curve holds at every eps from 0. ``"early-stop"``:
    an attack stopped at the first adversarial point inside the threat's eps, whose norm only
    bounds the minimal one from above (a curve built on it overstates robust accuracy below
    eps), so the curve starts at eps, where it is valid."""
    finite = min_norm[torch.isfinite(min_norm)]
    top = max(2 * threat.eps, float(finite.max()) if len(finite) else 0.0) or 1.0
    low = threat.eps if one_of(search, "search", MIN_NORM_SEARCH) == "early-stop" else 0.0
    grid = torch.linspace(low, top, points)
    return [
        {"eps": float(e), "robust_accuracy": float((min_norm > e).float().mean())} for e in grid
    ]


def spread(p: Tensor) -> tuple[float, float]:
    """The expected accuracy and its standard error over the model's randomness, from each
    point's probability ``p`` of being judged correct (``EvalState.p_robust``, ``p_clean``):
    ``mean(p)`` and ``sqrt(sum p (1 - p)) / n`` (fractions, like the accuracies; the points
    taken as independent). The standard error of the majority-vote accuracy the evaluation
    reports, under redrawing the model's randomness in its predictions; 0 for a deterministic
    model. A plug-in estimate: each ``p`` comes from the fractions of correct predictions seen
    in ``repeats`` draws, so with few repeats it underestimates the spread (a point whose
    draws all agreed counts as certain, e.g. every point at ``repeats=1``). The attacks'
    own randomness (random starts, EOT draws: fixed by the seed) is not included."""
    p = p.double()
    return float(p.mean()), float((p * (1 - p)).sum().sqrt() / len(p))


def merged_spread(records: list[dict[str, Any]]) -> dict[str, float]:
    """The spread entries of one record merged from the records of disjoint sets of points
    (shards): variances add, expectations average by points (see :func:`spread`)."""
    n = sum(r["n"] for r in records)
    expected = [r.get("robust_accuracy_expected", r["robust_accuracy"]) for r in records]
    out = {
        "robust_accuracy_expected": sum(e * r["n"] for e, r in zip(expected, records, strict=True))
        / n
    }
    for key in ("robust_accuracy_se", "clean_accuracy_se"):
        out[key] = math.sqrt(sum((r.get(key, 0.0) * r["n"]) ** 2 for r in records)) / n
    return out


def unstable_estimate(se: float, repeats: int) -> dict[str, Any] | None:
    """The ``unstable-estimate`` flag where the robust accuracy's standard error over the
    model's randomness ``se`` exceeds :data:`UNSTABLE_SE` (1 point), else None."""
    if se <= UNSTABLE_SE:
        return None
    return {
        "name": "unstable-estimate",
        "message": f"the robust accuracy varies with the model's randomness: its standard "
        f"error is {100 * se:.2f} points with {repeats} predictions per point "
        f"(over {100 * UNSTABLE_SE:g}); judge each point by more predictions "
        "(evaluate(..., repeats=N), CLI --repeats N) or evaluate more points",
    }


def build_result(
    st: EvalState,
    x: Tensor,
    y: Tensor,
    pred: Tensor,
    clean: Tensor,
    threat: ThreatModel,
    flags: list[dict[str, Any]],
    extra: dict[str, Any],
    search: str = "minimal",
) -> EvalResult:
    """The :class:`EvalResult` of a finished cascade ``st`` on ``(x, y)`` (clean predictions
    ``pred``, clean-correct mask ``clean``); ``extra``: the run's settings for the record.
    Where a minimum-norm attack gave every clean-correct point a norm, the record holds the
    curve (``min_norm_curve``) and how its norms were searched (``min_norm_search``, see
    :func:`min_norm_curve`). The spread over the model's randomness (:func:`spread`) is
    recorded as ``robust_accuracy_se``, ``robust_accuracy_expected`` and
    ``clean_accuracy_se``; a large one raises ``unstable-estimate``."""
    dist = threat.distance(st.x_adv, x)
    per_sample = []
    for i in range(len(x)):
        row = {
            "index": i,
            "label": int(y[i]),
            "clean_pred": int(pred[i]),
            "adv_pred": int(st.adv_pred[i]),
            "robust": bool(st.robust[i]),
            "broken_by": st.broken_by[i],
            "distance": float(dist[i]),
        }
        m = float(st.min_norm[i])
        if not math.isnan(m):  # known: a minimum-norm attack ran on it (None: found none)
            row["min_norm"] = m if math.isfinite(m) else None
        per_sample.append(row)
    expected, robust_se = spread(st.p_robust)
    if (flag := unstable_estimate(robust_se, extra.get("repeats", 1))) is not None:
        flags = [*flags, flag]
    flags = list({f["name"]: f for f in flags}.values())  # one flag per kind
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "clean_accuracy": float(clean.float().mean()),
        "robust_accuracy": float(st.robust.float().mean()),
        "robust_accuracy_se": robust_se,
        "robust_accuracy_expected": expected,
        "clean_accuracy_se": spread(st.p_clean)[1],
        "threat": threat.to_dict(),
        "n": len(x),
        "per_attack": st.per_attack,
        "flags": flags,
        "commit": git_commit(),
        "versions": versions(),
    } | extra
    if not torch.isnan(st.min_norm).any():
        record["min_norm_curve"] = min_norm_curve(st.min_norm, threat, search=search)
        record["min_norm_search"] = search
    return EvalResult(
        clean_accuracy=record["clean_accuracy"],
        robust_accuracy=record["robust_accuracy"],
        per_attack=st.per_attack,
        flags=flags,
        robust=st.robust,
        x_adv=st.x_adv,
        broken_by=st.broken_by,
        per_sample=per_sample,
        record=record,
        x=x,
        robust_accuracy_se=robust_se,
        clean_accuracy_se=record["clean_accuracy_se"],
    )
