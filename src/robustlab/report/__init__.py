"""Reports: render run folders (``results.json``, ``certify.json``, ``train_log.jsonl`` ...)
into a self-contained HTML page, a Markdown summary and a leaderboard.

This package reads what runs recorded and never runs a model: it imports nothing of the
attacks, defenses, models or training. ``runs`` loads a run folder, ``summary`` renders one
results record as Markdown, ``plots`` draws inline SVG, ``html`` assembles the page and the
leaderboard.
"""

from robustlab.report.html import leaderboard_markdown, render_html, write_report
from robustlab.report.runs import Run, load_run
from robustlab.report.summary import markdown

__all__ = ["Run", "leaderboard_markdown", "load_run", "markdown", "render_html", "write_report"]
