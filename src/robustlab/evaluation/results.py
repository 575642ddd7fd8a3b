"""The evaluation result: data first (JSON + per-sample JSONL), rendering elsewhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from robustlab._io import atomic_write

SCHEMA = "robustlab.evaluation/1"


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

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, ``per_sample.jsonl`` and ``summary.md`` into ``out``."""
        from robustlab.evaluation.summary import markdown

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"results": out / "results.json", "per_sample": out / "per_sample.jsonl",
                 "summary": out / "summary.md"}
        atomic_write(paths["results"], json.dumps(self.record, indent=2) + "\n")
        atomic_write(paths["per_sample"], "".join(json.dumps(r) + "\n" for r in self.per_sample))
        atomic_write(paths["summary"], markdown(self.record))
        return paths
