"""Reading a run directory: everything the report and the leaderboard render, as data.

A run directory (``robustlab train --out``) holds the checkpoint's sidecar ``model.json``, the
recipe ``recipe.json`` and the per-epoch ``train_log.jsonl``; beside them or in subdirectories,
what later commands wrote: ``results.json`` of ``robustlab evaluate`` / ``audit`` (with
``examples.safetensors``), ``certify.json`` of ``robustlab certify`` and ``smoothing.json`` of
``robustlab smooth``. A directory that holds only results (an evaluation's ``--out``) is a run
too. Nothing here runs a model: the report is rendered from what the commands recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

EVALUATION, CERTIFICATION, SMOOTHING = "results.json", "certify.json", "smoothing.json"
MAX_DEPTH = 3  # subdirectory levels searched for results (run/audit/eps_0/results.json: 2)


@dataclass
class Document:
    """One results file: ``path`` relative to the run, and its parsed ``data``."""

    path: Path
    data: dict[str, Any]

    @property
    def where(self) -> str:
        """The folder of the file inside the run (``.`` for the run's own)."""
        return str(self.path.parent)


@dataclass
class Run:
    """What one run directory recorded (each part empty where the run has none)."""

    path: Path
    model: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[Document] = field(default_factory=list)
    certifications: list[Document] = field(default_factory=list)
    smoothing: list[Document] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def examples(self, doc: Document) -> dict[str, Tensor] | None:
        """The saved clean / adversarial examples of the evaluation ``doc``, if it has any."""
        ref = doc.data.get("examples")
        if not ref:
            return None
        path = self.path / doc.path.parent / ref["file"]
        if not path.exists():
            raise FileNotFoundError(f"{self.path / doc.path} names {ref['file']} but {path} is "
                                    "missing; copy the whole results folder")
        return load_file(str(path))

    def main_evaluation(self) -> Document | None:
        """The run's headline evaluation: ``results.json`` in the run folder itself, else the
        first non-audit one, else the first one."""
        for pick in (lambda d: d.path.parent == Path("."),
                     lambda d: d.data.get("suite") != "audit", lambda d: True):
            for doc in self.evaluations:
                if pick(doc):
                    return doc
        return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was it written by robustlab?") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break  # the line being written when a run died
            raise ValueError(f"{path}, line {i}, is not valid JSON") from None
    return rows


def _found(root: Path, name: str) -> list[Path]:
    """Files called ``name`` under ``root`` (at most MAX_DEPTH folders down), skipping the
    per-rank folders of a sharded evaluation, in path order."""
    hits = []
    for p in sorted(root.rglob(name)):
        rel = p.relative_to(root)
        if len(rel.parts) - 1 > MAX_DEPTH or any(s.startswith("shard-") for s in rel.parts):
            continue
        hits.append(p)
    return hits


def _require(doc: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ValueError(f"{path} is not a {what} (missing {', '.join(missing)}); the report "
                         "reads the files written by robustlab's commands")


def load_run(path: str | Path) -> Run:
    """Read the run directory ``path``; a missing folder, or one with nothing to report, is
    an error naming what the folder should hold."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist (give the --out of "
                                "robustlab train, evaluate, audit or certify)")
    run = Run(path=root)
    if (root / "model.json").exists():
        run.model = _json(root / "model.json")
    if (root / "recipe.json").exists():
        run.recipe = _json(root / "recipe.json")
    if (root / "train_log.jsonl").exists():
        run.train_log = _jsonl(root / "train_log.jsonl")
    for p in _found(root, EVALUATION):
        doc = _json(p)
        _require(doc, ("clean_accuracy", "robust_accuracy", "threat", "per_attack", "n"), p,
                  "robustlab evaluation result")
        run.evaluations.append(Document(p.relative_to(root), doc))
    for p in _found(root, CERTIFICATION):
        doc = _json(p)
        _require(doc, ("config", "certified_accuracy", "norm"), p, "certification summary")
        run.certifications.append(Document(p.relative_to(root), doc))
    for p in _found(root, SMOOTHING):
        doc = _json(p)
        _require(doc, ("config", "rows"), p, "smoothing curve")
        run.smoothing.append(Document(p.relative_to(root), doc))
    if not (run.model or run.train_log or run.evaluations or run.certifications
            or run.smoothing):
        raise ValueError(f"{root} holds nothing to report: no model.json, train_log.jsonl, "
                         f"{EVALUATION}, {CERTIFICATION} or {SMOOTHING} (run robustlab train, "
                         "evaluate, audit, certify or smooth with --out there first)")
    return run
