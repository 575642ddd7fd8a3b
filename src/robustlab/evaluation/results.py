"""The evaluation result: data first (JSON + per-sample JSONL), rendering elsewhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from robustlab._io import atomic_path, atomic_write
from robustlab.report.summary import markdown

SCHEMA = "robustlab.evaluation/1"
EXAMPLES = "examples.safetensors"
N_EXAMPLES = 8  # adversarial examples kept beside the results for the report's image grid


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
