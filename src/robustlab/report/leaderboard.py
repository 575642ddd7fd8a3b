"""The leaderboard, ranked as RobustBench ranks: one table per data set and threat model, one row
per model (checkpoint) in it, as Markdown (``robustlab compare``) and as the report's HTML table.

A model's row is its strongest evaluation at that threat model: a reference evaluation (the
audit, AutoAttack's ``standard``, ``rand`` for randomised models) over a weaker suite, then
more points over fewer; its other evaluations are listed beside it, never ranked as rows of
their own. Rows are ranked by robust accuracy (then clean accuracy) after two keys that come
first: a flagged row ranks below every unflagged row, and a row from a weaker suite below every
row from a stronger one (a weak attack's robust accuracy is a looser upper bound, not a number
to compare with AutoAttack's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from robustlab.report.markup import duration, esc, pct, table, threat_label
from robustlab.report.runs import Document, Run

# the strength of a suite's evaluation; a suite not listed (custom attacks) counts as the weakest
STRENGTH = {"audit": 3, "standard": 3, "rand": 3, "fast": 2, "pgd-strong": 1, "pgd": 1}
REFERENCE = 3  # audit, standard, rand: the evaluations the leaderboard is ranked on


# --- rows ----------------------------------------------------------------------------
def _method(model: dict[str, Any], doc: Document) -> str:
    objective = model.get("objective")
    defense = (doc.data.get("config") or {}).get("defense")
    parts = [objective] if objective else []
    if defense:
        name = defense.get("name", defense) if isinstance(defense, dict) else defense
        parts.append(f"defense: {name}")
    return " + ".join(parts) or "–"


def strength(doc: Document) -> int:
    return STRENGTH.get(str(doc.data.get("suite", "custom")), 0)


def _model_key(run: Run, doc: Document) -> str:
    """What identifies the evaluated model: the checkpoint the evaluation recorded, else the
    model spec and weights hash of a user's own model (``robustlab evaluate --model``,
    :func:`robustlab.benchmark`), else the folder of its nearest model.json, else the run
    folder."""
    cfg = doc.data.get("config") or {}
    ckpt = cfg.get("checkpoint")
    if isinstance(ckpt, str) and ckpt:
        return os.path.normpath(os.path.abspath(ckpt))
    if isinstance(cfg.get("model"), str) and cfg.get("weights_sha256"):
        return f"{cfg['model']}@{cfg['weights_sha256']}"
    for folder in (doc.path.parent, *doc.path.parent.parents):
        if folder in run.models:
            return str((run.path / folder).resolve())
    return str(run.path.resolve())


def _dataset(run: Run, doc: Document) -> str | None:
    return (doc.data.get("config") or {}).get("dataset") or (run.model_of(doc) or {}).get("dataset")


def _group_key(run: Run, doc: Document) -> tuple[Any, ...]:
    t = doc.data["threat"]
    return (_dataset(run, doc) or "", t["norm"], t["eps"], tuple(t.get("bounds") or ()))


def _row(run: Run, doc: Document, others: Sequence[Document]) -> dict[str, Any]:
    d, model = doc.data, run.model_of(doc) or {}
    own = model is run.model  # the run's own training log belongs to this model
    log = run.train_log if own else []
    flags = [f.get("name", "?") for f in d.get("flags", [])]
    if any("overfit" in r for r in log):
        flags.append("catastrophic-overfitting")
    cfg = d.get("config") or {}
    return {
        "run": cfg.get("name") or run.name,
        "where": doc.where,
        "method": _method(model, doc),
        "architecture": (
            (model.get("architecture") or {}).get("name")
            or cfg.get("architecture")
            or cfg.get("model")
            or "–"
        ),
        "dataset": _dataset(run, doc),
        "clean_accuracy": d["clean_accuracy"],
        "robust_accuracy": d["robust_accuracy"],
        "suite": d.get("suite", "custom"),
        "n": d["n"],
        "threat": d["threat"],
        "strength": strength(doc),
        "flags": flags,
        "epochs": model.get("epoch", len(log) or None),
        "train_time_s": sum(r.get("train_time_s", 0.0) for r in log) if log else None,
        "others": [
            (o.data.get("suite", "custom"), o.data["n"], o.data["robust_accuracy"]) for o in others
        ],
    }


def leaderboard_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per model and (data set, threat model): its strongest evaluation (see the
    module's docstring), ranked within the group; ``rank`` counts within the group."""
    groups: dict[tuple[Any, ...], dict[str, list[tuple[Run, Document]]]] = {}
    seen = set()
    for run in runs:
        for doc in run.evaluations:
            if (file := (run.path / doc.path).resolve()) in seen:
                continue  # a folder given twice (a run and its audit folder)
            seen.add(file)
            models = groups.setdefault(_group_key(run, doc), {})
            models.setdefault(_model_key(run, doc), []).append((run, doc))
    rows = []
    for key in sorted(groups, key=str):
        ranked = []
        for evaluations in groups[key].values():
            run, best = max(evaluations, key=lambda e: (strength(e[1]), e[1].data["n"]))
            ranked.append(_row(run, best, [d for _, d in evaluations if d is not best]))
        ranked.sort(
            key=lambda r: (
                bool(r["flags"]),
                -r["strength"],
                -r["robust_accuracy"],
                -r["clean_accuracy"],
            )
        )
        for i, r in enumerate(ranked, 1):
            r["rank"] = i
        rows += ranked
    return rows


LEADERBOARD_HEAD = (
    "rank",
    "run",
    "method",
    "architecture",
    "clean",
    "robust (suite, points)",
    "threat model",
    "epochs",
    "train time",
    "flags",
    "other evaluations",
)
NOTE = (
    "Ranked as RobustBench ranks: one row per model, its strongest evaluation (audit, "
    "standard or rand over weaker suites, then more points over fewer); a row from a weaker "
    "suite ranks below every row from a stronger one, and a FLAGGED row below every "
    "unflagged row: its robust accuracy is not to be trusted as it stands. Robust accuracy "
    "is the per-sample worst case over the suite's attacks, an upper bound."
)


def _leaderboard_cells(r: dict[str, Any]) -> list[str]:
    name = r["run"] if r["where"] == "." else f"{r['run']}/{r['where']}"
    weaker = "" if r["strength"] >= REFERENCE else "; weaker suite"
    others = ", ".join(f"{s} {pct(a)} ({n} points)" for s, n, a in r["others"])
    return [
        str(r["rank"]),
        name,
        r["method"],
        r["architecture"],
        pct(r["clean_accuracy"]),
        f"{pct(r['robust_accuracy'])} ({r['suite']}, {r['n']} points{weaker})",
        threat_label(r["threat"]),
        "–" if r["epochs"] is None else str(r["epochs"]),
        duration(r["train_time_s"]),
        "FLAGGED: " + ", ".join(r["flags"]) if r["flags"] else "none",
        others or "–",
    ]


def _by_group(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = threat_label(r["threat"]) + (f" ({r['dataset']})" if r["dataset"] else "")
        groups.setdefault(label, []).append(r)
    return groups


def leaderboard_markdown(runs: Sequence[Run]) -> str:
    """The leaderboard as Markdown, one table per data set and threat model."""
    lines = ["# robustlab leaderboard", ""]
    groups = _by_group(leaderboard_rows(runs))
    if not groups:
        return "\n".join(
            lines + ["No evaluation results in these runs (run robustlab evaluate first).", ""]
        )
    for label, rows in groups.items():
        lines += [
            f"## {label}",
            "",
            "| " + " | ".join(LEADERBOARD_HEAD) + " |",
            "|" + "---|" * len(LEADERBOARD_HEAD),
        ]
        for r in rows:
            cells = [c.replace("|", "/") for c in _leaderboard_cells(r)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(NOTE)
    return "\n".join(lines) + "\n"


def leaderboard_html(runs: Sequence[Run]) -> str:
    groups = _by_group(leaderboard_rows(runs))
    out = ['<section id="leaderboard"><h2>Leaderboard</h2>']
    for label, rows in groups.items():
        out.append(f"<h3>{esc(label)}</h3>")
        out.append(table(LEADERBOARD_HEAD, [_leaderboard_cells(r) for r in rows], "num"))
    out.append(
        f'<p class="note">{esc(NOTE)}</p>'
        if groups
        else "<p>No evaluation results in these runs.</p>"
    )
    out.append("</section>")
    return "".join(out)
