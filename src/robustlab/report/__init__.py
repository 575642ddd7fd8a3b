"""Reports: render run folders (``results.json``, ``certify.json``, ``train_log.jsonl`` ...)
into a self-contained HTML page, a Markdown summary and a leaderboard.

This package reads what runs recorded and never runs a model: it imports nothing of the
attacks, defenses, models or training. ``runs`` loads a run folder, ``summary`` renders one
results record as Markdown, ``plots`` draws inline SVG, ``leaderboard`` ranks the runs,
``markup`` holds the shared formatting, ``html`` assembles the page. The entry points below
load on first use, so that writing a Markdown summary never loads matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustlab.report.html import render_html, write_report
    from robustlab.report.leaderboard import leaderboard_markdown
    from robustlab.report.runs import Run, load_run
    from robustlab.report.summary import markdown

_WHERE = {
    "render_html": "html",
    "write_report": "html",
    "leaderboard_markdown": "leaderboard",
    "Run": "runs",
    "load_run": "runs",
    "markdown": "summary",
}
__all__ = ["Run", "leaderboard_markdown", "load_run", "markdown", "render_html", "write_report"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"robustlab.report.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'robustlab.report' has no attribute {name!r}")
