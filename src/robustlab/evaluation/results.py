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

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, ``per_sample.jsonl`` and ``summary.md`` into ``out``, and
        with the clean inputs known, ``examples.safetensors``: a few clean and adversarial
        inputs with their labels and predictions (see :func:`example_indices`), named in the
        results under ``examples``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"results": out / "results.json", "per_sample": out / "per_sample.jsonl",
                 "summary": out / "summary.md"}
        idx = example_indices(self.per_sample) if self.x is not None else []
        if idx:  # none where every point is misclassified without attack
            rows = [self.per_sample[i] for i in idx]
            tensors = {
                "index": torch.tensor(idx, dtype=torch.int64),
                "x": self.x[idx].float().contiguous(),
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
    return sorted(broken[:k] + robust[:max(0, k - len(broken))])


def min_norm_curve(min_norm: Tensor, threat: ThreatModel, points: int = 41, *,
                   search: str = "minimal") -> list[dict]:
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
    return [{"eps": float(e), "robust_accuracy": float((min_norm > e).float().mean())}
            for e in grid]


def build_result(st: EvalState, x: Tensor, y: Tensor, pred: Tensor, clean: Tensor,
                 threat: ThreatModel, flags: list[dict[str, Any]],
                 extra: dict[str, Any], search: str = "minimal") -> EvalResult:
    """The :class:`EvalResult` of a finished cascade ``st`` on ``(x, y)`` (clean predictions
    ``pred``, clean-correct mask ``clean``); ``extra``: the run's settings for the record.
    Where a minimum-norm attack gave every clean-correct point a norm, the record holds the
    curve (``min_norm_curve``) and how its norms were searched (``min_norm_search``, see
    :func:`min_norm_curve`)."""
    dist = threat.distance(st.x_adv, x)
    per_sample = []
    for i in range(len(x)):
        row = {"index": i, "label": int(y[i]), "clean_pred": int(pred[i]),
               "adv_pred": int(st.adv_pred[i]), "robust": bool(st.robust[i]),
               "broken_by": st.broken_by[i], "distance": float(dist[i])}
        m = float(st.min_norm[i])
        if not math.isnan(m):  # known: a minimum-norm attack ran on it (None: found none)
            row["min_norm"] = m if math.isfinite(m) else None
        per_sample.append(row)
    flags = list({f["name"]: f for f in flags}.values())  # one flag per kind
    record = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "clean_accuracy": float(clean.float().mean()),
        "robust_accuracy": float(st.robust.float().mean()),
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
        clean_accuracy=record["clean_accuracy"], robust_accuracy=record["robust_accuracy"],
        per_attack=st.per_attack, flags=flags, robust=st.robust, x_adv=st.x_adv,
        broken_by=st.broken_by, per_sample=per_sample, record=record, x=x,
    )
