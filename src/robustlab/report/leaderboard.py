"""The leaderboard: one row per evaluation of each run, ranked within each threat model by
robust accuracy, as Markdown (``robustlab compare``) and as the report's HTML table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from robustlab.report.markup import duration, esc, pct, table, threat_label
from robustlab.report.runs import Document, Run


# --- rows ----------------------------------------------------------------------------
def _method(run: Run, doc: Document) -> str:
    objective = (run.model or {}).get("objective")
    defense = (doc.data.get("config") or {}).get("defense")
    parts = [objective] if objective else []
    if defense:
        name = defense.get("name", defense) if isinstance(defense, dict) else defense
        parts.append(f"defense: {name}")
    return " + ".join(parts) or "–"


def leaderboard_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per evaluation of each run, ranked within each threat model by robust accuracy
    (then clean accuracy); ``rank`` counts within the threat model."""
    rows = []
    for run in runs:
        log = run.train_log
        train_time = sum(r.get("train_time_s", 0.0) for r in log) if log else None
        model = run.model or {}
        for doc in run.evaluations:
            d = doc.data
            rows.append({
                "run": run.name, "where": doc.where, "method": _method(run, doc),
                "architecture": (model.get("architecture") or {}).get("name", "–"),
                "clean_accuracy": d["clean_accuracy"], "robust_accuracy": d["robust_accuracy"],
                "suite": d.get("suite", "–"), "n": d["n"], "threat": d["threat"],
                "epochs": model.get("epoch", len(log) or None), "train_time_s": train_time,
                "flags": [f["name"] for f in d.get("flags", [])],
            })
    rows.sort(key=lambda r: (r["threat"]["norm"], r["threat"]["eps"], -r["robust_accuracy"],
                             -r["clean_accuracy"]))
    for i, r in enumerate(rows):
        same = i > 0 and rows[i - 1]["threat"] == r["threat"]
        r["rank"] = rows[i - 1]["rank"] + 1 if same else 1
    return rows


LEADERBOARD_HEAD = ("rank", "run", "method", "architecture", "clean", "robust (suite, points)",
                    "threat model", "epochs", "train time", "flags")


def _leaderboard_cells(r: dict[str, Any]) -> list[str]:
    name = r["run"] if r["where"] == "." else f"{r['run']}/{r['where']}"
    return [str(r["rank"]), name, r["method"], r["architecture"], pct(r["clean_accuracy"]),
            f"{pct(r['robust_accuracy'])} ({r['suite']}, {r['n']})", threat_label(r["threat"]),
            "–" if r["epochs"] is None else str(r["epochs"]), duration(r["train_time_s"]),
            ", ".join(r["flags"]) or "none"]


def _by_threat(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(threat_label(r["threat"]), []).append(r)
    return groups


def leaderboard_markdown(runs: Sequence[Run]) -> str:
    """The leaderboard as Markdown, one table per threat model."""
    lines = ["# robustlab leaderboard", ""]
    groups = _by_threat(leaderboard_rows(runs))
    if not groups:
        return "\n".join(lines + ["No evaluation results in these runs (run robustlab evaluate "
                                  "first).", ""])
    for label, rows in groups.items():
        lines += [f"## {label}", "", "| " + " | ".join(LEADERBOARD_HEAD) + " |",
                  "|" + "---|" * len(LEADERBOARD_HEAD)]
        for r in rows:
            cells = [c.replace("|", "/") for c in _leaderboard_cells(r)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Robust accuracy is the per-sample worst case over the suite's attacks; a row "
                 "with flags is not to be trusted as it stands.")
    return "\n".join(lines) + "\n"


def leaderboard_html(runs: Sequence[Run]) -> str:
    groups = _by_threat(leaderboard_rows(runs))
    out = ['<section id="leaderboard"><h2>Leaderboard</h2>']
    for label, rows in groups.items():
        out.append(f"<h3>{esc(label)}</h3>")
        out.append(table(LEADERBOARD_HEAD, [_leaderboard_cells(r) for r in rows], "num"))
    if not groups:
        out.append("<p>No evaluation results in these runs.</p>")
    out.append("</section>")
    return "".join(out)
