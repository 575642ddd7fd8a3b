"""The pretrained zoo on the command line: ``robustlab list zoo`` (each model with its card's
headline numbers) and ``robustlab compare RUN_DIR --zoo`` (the zoo's models as leaderboard
rows beside the user's runs, from their cards' evaluations; no model is run).

The zoo itself is :mod:`robustlab.models.zoo`; the leaderboard :mod:`robustlab.report.leaderboard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustlab.models.zoo import ZOO_DIR, cards
from robustlab.report.runs import Document, Run

#: the card's evaluations, in the order a line lists them
EVALUATIONS = ("standard", "fast")


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, float | int) else "-"


def zoo_lines(zoo: str | Path | None = None) -> list[str]:
    """What ``robustlab list zoo`` prints: per model its name, row, budget, clean accuracy and
    the robust accuracy of each suite with its number of points (and the verified accuracy of a
    certified-training model), and its flags."""
    found = cards(zoo)
    if not found:
        return [f"zoo: no pretrained models in {zoo or ZOO_DIR}"]
    lines = ["zoo (robustlab.models.pretrained(NAME); the card: NAME.json beside the weights):"]
    for name, c in found.items():
        ev = c.get("evaluation", {})
        parts = [
            f"clean {_pct(ev.get('clean', {}).get('accuracy'))} (n={ev.get('clean', {}).get('n')})"
        ]
        for suite in EVALUATIONS:
            if isinstance(e := ev.get(suite), dict):
                parts.append(
                    f"{e.get('suite', suite)} {_pct(e.get('robust_accuracy'))} (n={e.get('n')})"
                )
        if isinstance(v := ev.get("verified"), dict):  # certified training: a lower bound
            parts.append(f"verified {_pct(v.get('accuracy'))} ({v.get('method')}, n={v.get('n')})")
        budget = c.get("budget", {})
        flags = ", ".join(c.get("flags", [])) or "none"
        lines.append(
            f"  {name}: {c.get('row')} ({c.get('threat', {}).get('norm')} "
            f"{c.get('threat', {}).get('eps')}), {'; '.join(parts)}; flags: {flags}; "
            f"budget: {budget.get('summary', '?')}"
        )
    return lines


def zoo_runs(zoo: str | Path | None = None) -> list[Run]:
    """The zoo's models as :class:`~robustlab.report.runs.Run` objects whose evaluations are
    their cards' (one per suite the card holds), for the leaderboard."""
    runs = []
    folder = Path(zoo) if zoo is not None else ZOO_DIR
    for name, c in cards(zoo).items():
        sidecar = {
            "architecture": c.get("architecture", {}),
            "objective": c.get("objective"),
            "dataset": c.get("dataset"),
            "epoch": c.get("checkpoint", {}).get("epoch"),
        }
        docs = []
        for suite in EVALUATIONS:
            if isinstance(e := c.get("evaluation", {}).get(suite), dict) and "record" in e:
                data = dict(e["record"])
                data["config"] = {
                    "name": f"zoo: {name}",
                    "checkpoint": str(folder / f"{name}.safetensors"),
                    "dataset": c.get("dataset"),
                }
                where = Path(".") if suite == EVALUATIONS[0] else Path(suite)
                docs.append(Document(where / "results.json", data))
        if docs:
            runs.append(
                Run(
                    path=folder / name, model=sidecar, evaluations=docs, models={Path("."): sidecar}
                )
            )
    return runs
