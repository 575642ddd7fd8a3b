"""The small formatting helpers every page of the report shares: escaping, percentages, eps and
threat-model labels, evaluation sizes, durations, HTML tables and badges."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


# --- formatting ---------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def eps_label(eps: float) -> str:
    """``8/255`` for a multiple of 1/255, else ``0.1``."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and eps < 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def threat_label(t: dict[str, Any]) -> str:
    return f"{t['norm']} ε = {eps_label(t['eps'])}"


def sizes_note(sizes: Sequence[int]) -> str:
    """A caption's warning when a plot puts evaluations of different sizes side by side
    (`` Evaluations of different sizes ... (n = 40 vs 100 points) ...``), else nothing."""
    n = sorted(set(sizes))
    if len(n) < 2:
        return ""
    return (
        f" Evaluations of different sizes side by side (n = {' vs '.join(map(str, n))} "
        "points): the smaller ones are noisier, and they need not be the same points."
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; cells are escaped unless given as ``Markup``."""

    def cell(v: Any, tag: str) -> str:
        return f"<{tag}>{v if isinstance(v, Markup) else esc(v)}</{tag}>"

    out = [
        f'<table class="{cls}">' if cls else "<table>",
        "<thead><tr>",
        *(cell(h, "th") for h in head),
        "</tr></thead><tbody>",
    ]
    for r in rows:
        out += ["<tr>", *(cell(v, "td") for v in r), "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


class Markup(str):
    """A string that is already HTML (not escaped again)."""


def status_badge(status: str) -> Markup:
    return Markup(f'<span class="badge {esc(status.lower())}">{esc(status)}</span>')
