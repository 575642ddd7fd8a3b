"""The leaderboard ranks like RobustBench and the report says what it shows (issue 16, items 6
and 12). Runs are copies of the fixture runs (tests/fixtures/report_runs) with their recorded
results edited: a suite, a flag, a size, a data set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.report import plots
from robustlab.report.html import render_html
from robustlab.report.leaderboard import leaderboard_markdown, leaderboard_rows
from robustlab.report.runs import load_run
from robustlab.report.summary import adaptive_text

RUNS = Path(__file__).parent / "fixtures" / "report_runs"
PGD, NATURAL = RUNS / "pgd-at", RUNS / "natural"


def _copy(src: Path, dst: Path, **edits) -> Path:
    """A copy of the run ``src`` whose own results.json gets ``edits`` (``None`` deletes)."""
    shutil.copytree(src, dst)
    path = dst / "results.json"
    doc = json.loads(path.read_text())
    for k, v in edits.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    doc["config"]["checkpoint"] = str(dst / "model.safetensors")
    path.write_text(json.dumps(doc))
    return dst


def _flag(name="gradient-masking"):
    return [{"name": name, "message": "FGSM beats PGD"}]


# --- item 6: the leaderboard ---------------------------------------------------------------
def test_one_row_per_model_the_strongest_evaluation(tmp_path):
    """pgd-at holds a custom-suite evaluation (100 points) and an audit (40 points): one row,
    the audit's, not two rows with different numbers."""
    rows = leaderboard_rows([load_run(PGD), load_run(NATURAL)])
    assert sorted(r["run"] for r in rows) == ["natural", "pgd-at"]
    pgd = next(r for r in rows if r["run"] == "pgd-at")
    assert (pgd["suite"], pgd["n"], pgd["where"]) == ("audit", 40, "audit")
    # the same model given twice (its run and its audit folder) is still one row
    rows = leaderboard_rows([load_run(PGD), load_run(PGD / "audit")])
    assert len(rows) == 1


def test_standard_outranks_more_points_of_a_weaker_suite(tmp_path):
    run = _copy(PGD, tmp_path / "run", suite="standard", n=100)
    shutil.rmtree(run / "audit")
    weak = run / "quick-1000"
    weak.mkdir()
    doc = json.loads((run / "results.json").read_text()) | {
        "suite": "quick",
        "n": 1000,
        "robust_accuracy": 0.5,
    }
    (weak / "results.json").write_text(json.dumps(doc))
    (row,) = leaderboard_rows([load_run(run)])
    assert (row["suite"], row["n"]) == ("standard", 100)
    # between two evaluations of one strength, more points win
    doc = doc | {"suite": "standard", "n": 1000}
    (weak / "results.json").write_text(json.dumps(doc))
    (row,) = leaderboard_rows([load_run(run)])
    assert (row["suite"], row["n"]) == ("standard", 1000)


def test_a_weak_evaluation_does_not_outrank_a_strong_one(tmp_path):
    """A naturally trained model evaluated with FGSM + PGD-20 (quick) at 50% does not rank
    above an adversarially trained one at 31% under AutoAttack (standard)."""
    nat = _copy(NATURAL, tmp_path / "natural", suite="quick", robust_accuracy=0.5)
    pgd = _copy(PGD, tmp_path / "pgd-at", suite="standard")
    shutil.rmtree(pgd / "audit")
    rows = leaderboard_rows([load_run(nat), load_run(pgd)])
    assert [(r["rank"], r["run"]) for r in rows] == [(1, "pgd-at"), (2, "natural")]
    md = leaderboard_markdown([load_run(nat), load_run(pgd)])
    assert "quick" in md and "weaker" in md


def test_flagged_rows_rank_below_every_unflagged_row(tmp_path):
    high = _copy(NATURAL, tmp_path / "flagged", robust_accuracy=0.9, flags=_flag())
    low = _copy(NATURAL, tmp_path / "clean-low", robust_accuracy=0.1)
    pgd = _copy(PGD, tmp_path / "pgd", robust_accuracy=0.3)
    shutil.rmtree(pgd / "audit")
    runs = [load_run(p) for p in (high, low, pgd)]
    rows = leaderboard_rows(runs)
    assert [r["run"] for r in rows] == ["pgd", "clean-low", "flagged"]
    md = leaderboard_markdown(runs)
    line = next(ln for ln in md.splitlines() if "| flagged |" in ln)
    assert "FLAGGED" in line and "gradient-masking" in line
    assert md.index("| clean-low |") < md.index("| flagged |")


def test_points_are_shown(tmp_path):
    md = leaderboard_markdown([load_run(PGD), load_run(NATURAL)])
    line = next(ln for ln in md.splitlines() if "| natural |" in ln)
    assert "(custom, 100 points" in line


def test_models_of_different_data_sets_are_ranked_apart(tmp_path):
    cfg = json.loads((NATURAL / "results.json").read_text())["config"]
    other = _copy(NATURAL, tmp_path / "mnist", config=cfg | {"dataset": "mnist"})
    md = leaderboard_markdown([load_run(NATURAL), load_run(other)])
    assert md.count("\n## ") == 2 and "(mnist)" in md and "(fashion-mnist)" in md
    assert [r["rank"] for r in leaderboard_rows([load_run(NATURAL), load_run(other)])] == [1, 1]


def test_files_that_are_not_robustlab_results_are_skipped_and_named(tmp_path, capsys):
    folder = tmp_path / "experiments"
    shutil.copytree(NATURAL, folder / "natural")
    (folder / "sweep").mkdir()
    (folder / "sweep" / "results.json").write_text(json.dumps({"accuracy": 0.93, "lr": 0.1}))
    (folder / "notes").mkdir()
    (folder / "notes" / "results.json").write_text("[1, 2, 3]")
    (folder / "broken").mkdir()
    (folder / "broken" / "results.json").write_text("{not json")
    run = load_run(folder)
    assert len(run.evaluations) == 1 and len(run.skipped) == 3
    assert main(["compare", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "| 1 | experiments/natural | natural | smallcnn |" in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 3 and all("skipped" in ln for ln in lines)
    for name in ("sweep", "notes", "broken"):
        assert sum(str(folder / name / "results.json") in ln for ln in lines) == 1
    # a folder with nothing but an unrelated file: one clear error naming it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "results.json").write_text(json.dumps({"accuracy": 0.93}))
    assert main(["compare", str(lone)]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err and "results.json" in err and "Traceback" not in err


def test_the_report_names_skipped_files(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(NATURAL, run)
    (run / "extra").mkdir()
    (run / "extra" / "results.json").write_text(json.dumps({"accuracy": 0.93}))
    page = render_html([load_run(run)])
    assert "extra/results.json" in page and "not a robustlab" in page


# --- item 12: report details ---------------------------------------------------------------
def _legend_texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_minimum_norm_legend_has_no_dot(runs_page):
    assert "minimum-norm attacks (.)" not in runs_page
    assert "minimum-norm attacks, 100 points" in runs_page


def test_plots_of_different_sizes_say_so(runs_page, tmp_path):
    # pgd-at: the evaluation's minimum-norm curve (100 points) beside the audit's sweep (40)
    assert "n = 40 vs 100" in runs_page
    # the natural run has one evaluation of one size: no such caption
    page = render_html([load_run(NATURAL)])
    assert " vs " not in page.replace("adversarial vs", "")
    # certifications of different sizes
    run = tmp_path / "run"
    shutil.copytree(PGD, run)
    cert = run / "certify_gaussian_0.5" / "certify.json"
    doc = json.loads(cert.read_text())
    (cert).write_text(json.dumps(doc | {"n": 2 * doc["n"]}))
    page = render_html([load_run(run)])
    assert f"n = {doc['n']} vs {2 * doc['n']}" in page


def _line_styles(svg: str) -> list[tuple[str, str]]:
    """(dash pattern, marker shape) of each plotted data line of a matplotlib SVG (the lines
    clipped to the axes in a data colour: no tick, grid line or legend handle), colour
    aside."""
    styles = []
    for style, marker in re.findall(
        r'<g id="[^"]*line2d_\d+">\s*<path d="[^"]*" clip-path="[^"]*" style="([^"]*)"/>'
        r'\s*(?:<defs>\s*<path id="[^"]*" d="([^"]*)")?',
        svg,
    ):
        if "stroke: #" not in style:  # grid lines are drawn in currentColor
            continue
        dash = re.search(r"stroke-dasharray: ([^;]+)", style)
        styles.append((dash.group(1) if dash else "solid", marker))
    return styles


def test_overlapping_smoothing_lines_stay_distinguishable():
    rows = [
        {"sigma": s, "samples": n, "vote": "prediction", "accuracy": 0.5}
        for s in (0.12, 0.25, 0.5)
        for n in (1, 4, 16)
    ]  # three identical series
    svg = plots.smoothing_curves(rows, None, "k")
    styles = _line_styles(svg)
    assert len(styles) == 3 and len(set(styles)) == 3, styles


@pytest.fixture(scope="module")
def runs_page():
    return render_html([load_run(PGD), load_run(NATURAL)])


def _names_in_examples(page: str) -> list[str]:
    return re.findall(r'class="cap">label ([^<]*)<br>', page)


def test_examples_show_class_names_from_the_model_sidecar(tmp_path):
    """A results file without recorded class names (the Python API, an older CLI): the report
    takes them from the run's model.json, else shows numbers."""
    run = tmp_path / "user-model"
    shutil.copytree(NATURAL, run)
    doc = json.loads((run / "results.json").read_text())
    doc["config"].pop("classes", None)
    (run / "results.json").write_text(json.dumps(doc))
    assert all(s.isdigit() for s in _names_in_examples(render_html([load_run(run)])))
    names = [
        "tee",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "boot",
    ]
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(meta | {"classes": names}))
    shown = _names_in_examples(render_html([load_run(run)]))
    assert shown and all(s in names for s in shown)
    # names recorded in the results win over the sidecar's
    doc["config"]["classes"] = [n.upper() for n in names]
    (run / "results.json").write_text(json.dumps(doc))
    shown = _names_in_examples(render_html([load_run(run)]))
    assert shown and all(s.isupper() for s in shown)


def test_adaptive_text_says_the_attacks_saw_log_outputs():
    plain = {"bpda": False, "eot": 1, "repeats": 1}
    assert "log" not in adaptive_text(plain)
    text = adaptive_text(plain | {"log_outputs": True, "temperature": 40.2})
    assert "log of the outputs" in text and "temperature of 40.2" in text
