"""Reading a run directory: everything the report and the leaderboard render, as data.

A run directory (``robustlab train --out``) holds the checkpoint's sidecar ``model.json``, the
recipe ``recipe.json`` and the per-epoch ``train_log.jsonl``; beside them or in subdirectories,
what later commands wrote: ``results.json`` of ``robustlab evaluate`` / ``audit`` (with
``examples.safetensors``), ``certify.json`` of ``robustlab certify`` and ``smoothing.json`` of
``robustlab smooth``. A directory that holds only results (an evaluation's ``--out``) is a run
too. Nothing here runs a model: the report is rendered from what the commands recorded.

A file with one of these names that robustlab did not write (another tool's ``results.json``,
a file that is not JSON) is skipped and named, with the reason, in ``Run.skipped``; the
commands print those lines. A folder may hold several runs: each evaluation's model is the
nearest ``model.json`` above it (:meth:`Run.model_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

EVALUATION, CERTIFICATION, SMOOTHING = "results.json", "certify.json", "smoothing.json"
SIDECAR = "model.json"  # a checkpoint's sidecar: how it was built and trained
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
    models: dict[Path, dict[str, Any]] = field(default_factory=dict)  # folder -> model.json
    skipped: list[str] = field(default_factory=list)  # files that are not robustlab's, and why

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
            raise FileNotFoundError(
                f"{self.path / doc.path} names {ref['file']} but {path} is "
                "missing; copy the whole results folder"
            )
        return load_file(str(path))

    def model_of(self, doc: Document) -> dict[str, Any] | None:
        """The sidecar (``model.json``) of the model ``doc`` evaluated: the nearest one in the
        folders from ``doc``'s up to the run's, else the one beside the checkpoint the
        evaluation recorded (if that file is there), else None."""
        for folder in (doc.path.parent, *doc.path.parent.parents):
            if folder in self.models:
                return self.models[folder]
        ckpt = (doc.data.get("config") or {}).get("checkpoint")
        if isinstance(ckpt, str) and ckpt.endswith(".safetensors"):
            sidecar = Path(ckpt).with_suffix(".json")
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                return None
            return meta if isinstance(meta, dict) else None
        return None

    def main_evaluation(self) -> Document | None:
        """The run's headline evaluation: ``results.json`` in the run folder itself, else the
        first non-audit one, else the first one."""
        for pick in (
            lambda d: d.path.parent == Path("."),
            lambda d: d.data.get("suite") != "audit",
            lambda d: True,
        ):
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


def _problem(doc: Any, keys: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why ``doc`` is not the kind of robustlab file whose ``keys`` (name -> type) it must
    hold, or None when it is."""
    if not isinstance(doc, dict):
        return f"holds a JSON {type(doc).__name__}, not an object"
    missing = [k for k in keys if k not in doc]
    if missing:
        return f"is missing {', '.join(missing)}"
    wrong = [k for k, t in keys.items() if not isinstance(doc[k], t) or isinstance(doc[k], bool)]
    if wrong:
        return f"has {', '.join(wrong)} of the wrong type"
    if "threat" in keys and not {"norm", "eps"} <= set(doc["threat"]):
        return "has a threat without norm and eps"
    return None


NUMBER = (int, float)
KINDS: dict[
    str, tuple[str, dict[str, type | tuple[type, ...]]]
] = {  # file name -> (what it is, the keys and types every such file holds)
    EVALUATION: (
        "robustlab evaluation result",
        {
            "clean_accuracy": NUMBER,
            "robust_accuracy": NUMBER,
            "threat": dict,
            "per_attack": list,
            "n": int,
        },
    ),
    CERTIFICATION: (
        "robustlab certification summary",
        {"config": dict, "certified_accuracy": list, "norm": str},
    ),
    SMOOTHING: ("robustlab smoothing curve", {"config": dict, "rows": list}),
    SIDECAR: ("robustlab checkpoint sidecar", {"architecture": dict}),
}


def _documents(root: Path, name: str, skipped: list[str]) -> list[Document]:
    """The robustlab files called ``name`` under ``root``; any other file of that name (not
    JSON, or not written by robustlab) is named in ``skipped`` with the reason."""
    what, keys = KINDS[name]
    docs = []
    for p in _found(root, name):
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            skipped.append(f"{p} is not valid JSON ({e})")
            continue
        problem = _problem(doc, keys)
        if problem is None:
            docs.append(Document(p.relative_to(root), doc))
        else:
            skipped.append(f"{p} is not a {what}: it {problem}")
    return docs


def load_run(path: str | Path) -> Run:
    """Read the run directory ``path``; a missing folder, or one with nothing to report, is
    an error naming what the folder should hold."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"run directory {root} does not exist (give the --out of "
            "robustlab train, evaluate, audit or certify)"
        )
    run = Run(path=root)
    for doc in _documents(root, SIDECAR, run.skipped):
        run.models[doc.path.parent] = doc.data
    run.model = run.models.get(Path("."))
    if (root / "recipe.json").exists():
        run.recipe = _json(root / "recipe.json")
    if (root / "train_log.jsonl").exists():
        run.train_log = _jsonl(root / "train_log.jsonl")
    run.evaluations = _documents(root, EVALUATION, run.skipped)
    run.certifications = _documents(root, CERTIFICATION, run.skipped)
    run.smoothing = _documents(root, SMOOTHING, run.skipped)
    if not (run.model or run.train_log or run.evaluations or run.certifications or run.smoothing):
        skipped = "".join(f"; skipped: {s}" for s in run.skipped)
        raise ValueError(
            f"{root} holds nothing to report: no model.json, train_log.jsonl, "
            f"{EVALUATION}, {CERTIFICATION} or {SMOOTHING} (run robustlab train, "
            "evaluate, audit, certify or smooth with --out there first)"
            f"{skipped}"
        )
    return run
