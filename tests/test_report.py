"""The HTML report and the leaderboard, rendered from fixture runs (no training here).

The fixtures in tests/fixtures/report_runs are real small runs made through the CLI by
tests/fixtures/make_report_runs.py (checkpoints removed): PGD-AT with an evaluation, an audit,
two certifications and a smoothing curve; natural training with an evaluation.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import html5lib
import pytest
import torch
from safetensors.torch import load_file

from robustlab.cli import main
from robustlab.evaluation.results import example_indices
from robustlab.report import plots
from robustlab.report.html import render_html, write_report
from robustlab.report.leaderboard import leaderboard_markdown, leaderboard_rows
from robustlab.report.markup import eps_label
from robustlab.report.runs import load_run

RUNS = Path(__file__).parent / "fixtures" / "report_runs"
PGD, NATURAL = RUNS / "pgd-at", RUNS / "natural"
XHTML = "{http://www.w3.org/1999/xhtml}"
URL_ATTRS = {
    "src",
    "href",
    "srcset",
    "action",
    "formaction",
    "poster",
    "data",
    "background",
    "{http://www.w3.org/1999/xlink}href",
}


def parse(page: str):
    """Strict HTML5 parse: any parse error raises."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=True).parse(page)


def external_references(tree) -> list[str]:
    """Everything in the parsed page that a browser would fetch from outside the file."""
    bad = []
    for el in tree.iter():
        tag = el.tag.split("}")[-1] if isinstance(el.tag, str) else ""
        if tag in ("script", "link", "iframe", "object", "embed", "base"):
            bad.append(f"<{tag}>")
        for k, v in el.attrib.items():
            if k in URL_ATTRS and not (v.startswith("data:") or v.startswith("#")):
                bad.append(f"{tag} {k}={v[:60]}")
            if k == "style" and re.search(r"url\((?!#)|@import", v):
                bad.append(f"{tag} style {v[:60]}")
        if tag == "style" and re.search(r"url\((?!\s*['\"]?#)|@import", el.text or ""):
            bad.append("<style> with url() or @import")
    return bad


@pytest.fixture(scope="module")
def runs():
    return [load_run(PGD), load_run(NATURAL)]


@pytest.fixture(scope="module")
def page(runs):
    return render_html(runs)


def test_fixture_runs_hold_every_part(runs):
    pgd, natural = runs
    assert pgd.model["objective"] == "pgd-at" and natural.model["objective"] == "natural"
    assert [e["epoch"] for e in pgd.train_log] == [1, 2]
    assert {d.where for d in pgd.evaluations} == {".", "audit"}
    assert len(pgd.certifications) == 2 and len(pgd.smoothing) == 1
    assert pgd.main_evaluation().where == "."
    assert pgd.main_evaluation().data["min_norm_curve"]


def test_page_is_valid_html_and_self_contained(page):
    tree = parse(page)
    assert external_references(tree) == []
    assert tree.find(f"{XHTML}head/{XHTML}title") is not None
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', ""
    )


def test_external_reference_detector_catches_what_it_should():
    page = (
        '<!DOCTYPE html><html><head><title>t</title><link rel="stylesheet" href="x.css">'
        '</head><body><img src="https://a.b/c.png" alt=""><img src="data:image/png;base64,'
        'AA" alt=""></body></html>'
    )
    assert external_references(parse(page)) == [
        "<link>",
        "link href=x.css",
        "img src=https://a.b/c.png",
    ]
    with pytest.raises(html5lib.html5parser.ParseError):
        parse("<!DOCTYPE html><html><body><div></span></body></html>")


def test_page_shows_the_recorded_numbers(page, runs):
    pgd = runs[0]
    d = pgd.main_evaluation().data
    tree = parse(page)
    text = " ".join(tree.itertext())
    assert f"{100 * d['clean_accuracy']:.2f}%" in text
    assert f"{100 * d['robust_accuracy']:.2f}%" in text
    # the cascade: each attack's points attacked and broken, in a row of its own
    rows = [
        " | ".join(" ".join(td.itertext()).strip() for td in tr.findall(f"{XHTML}td"))
        for tr in tree.iter(f"{XHTML}tr")
    ]
    for i, a in enumerate(d["per_attack"], 1):
        assert any(
            r.startswith(f"{i} | {a['config']['name']}")
            and f"| {a['attacked']} | {a['broken']} |" in r
            for r in rows
        ), a
    # the audit's verdicts, coloured by status
    audit = next(e for e in pgd.evaluations if e.where == "audit")
    for c in audit.data["audit"]["checks"]:
        assert f'<span class="badge {c["status"].lower()}">{c["status"]}</span>' in page
    # provenance: commit, seed, versions
    assert d["commit"] in page and f"torch {d['versions']['torch']}" in page


def test_plots_and_images(page, runs):
    tree = parse(page)
    svgs = list(tree.iter("{http://www.w3.org/2000/svg}svg"))
    titles = [s.get("aria-label") for s in svgs]
    # per run: eps curve (pgd-at: min-norm + audit sweep), training; pgd-at: smoothing, certify
    assert titles.count("robust accuracy against linf eps") == 2
    assert titles.count("training curves") == 2
    assert titles.count("smoothed accuracy against noise draws and sigma") == 1
    assert titles.count("certified accuracy against radius") == 1
    ids = [el.get("id") for s in svgs for el in s.iter() if el.get("id")]
    assert len(ids) == len(set(ids)), "plots share element ids"
    imgs = list(tree.iter(f"{XHTML}img"))
    n_examples = sum(
        len(load_file(str(r.path / d.path.parent / "examples.safetensors"))["index"])
        for r in runs
        for d in r.evaluations
    )
    assert len(imgs) == 3 * n_examples > 0
    assert all(i.get("src").startswith("data:image/png;base64,") for i in imgs)


def test_examples_show_the_saved_adversarial_inputs(runs):
    pgd = runs[0]
    doc = pgd.main_evaluation()
    ex = pgd.examples(doc)
    rows = [json.loads(r) for r in (PGD / "per_sample.jsonl").read_text().splitlines()]
    assert ex["index"].tolist() == example_indices(rows) == doc.data["examples"]["indices"]
    for j, i in enumerate(ex["index"].tolist()):
        assert int(ex["label"][j]) == rows[i]["label"]
        assert int(ex["adv_pred"][j]) == rows[i]["adv_pred"]
        dist = (ex["x_adv"][j] - ex["x"][j]).abs().max().item()
        assert dist <= doc.data["threat"]["eps"] + 1e-6
        assert dist == pytest.approx(rows[i]["distance"], abs=1e-6)
        if rows[i]["broken_by"] is None:
            assert torch.equal(ex["x_adv"][j], ex["x"][j])


def test_example_indices_prefer_broken_points():
    rows = [{"broken_by": b} for b in ("clean", None, "1:pgd", None, "2:fab", "clean", None)]
    assert example_indices(rows, k=3) == [1, 2, 4]
    assert example_indices(rows, k=8) == [1, 2, 3, 4, 6]
    assert example_indices([{"broken_by": "clean"}], k=4) == []


def test_plot_svg_follows_the_page_theme():
    svg = plots.robustness_curves(
        [{"label": "a", "eps": [0, 0.1], "accuracy": [0.9, 0.5]}], "linf", 0.1, "k"
    )
    assert svg.startswith("<svg ") and plots.INK not in svg and "currentColor" in svg
    assert "<metadata>" not in svg and "ε (ℓ∞ radius" in svg and "robust accuracy (%)" in svg


def test_flags_banner(tmp_path, runs):
    assert '<div class="banner ok">' in render_html(runs[1:])  # the natural run: no flag
    run = tmp_path / "flagged"
    shutil.copytree(NATURAL, run)
    doc = json.loads((run / "results.json").read_text())
    doc["flags"] = [{"name": "gradient-masking", "message": "FGSM beats PGD <b>"}]
    (run / "results.json").write_text(json.dumps(doc))
    page = render_html([load_run(run)])
    banner = page[page.index('<div class="banner') :]
    assert banner.startswith('<div class="banner flag">')
    assert "gradient-masking" in banner[:600] and "FGSM beats PGD &lt;b&gt;" in banner[:600]
    assert page.index("banner flag") < page.index('<section class="run"')


def test_leaderboard(runs):
    rows = leaderboard_rows(runs)
    linf = [r for r in rows if r["threat"] == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}]
    assert [r["rank"] for r in linf] == list(range(1, len(linf) + 1))
    assert [r["robust_accuracy"] for r in linf] == sorted(
        (r["robust_accuracy"] for r in linf), reverse=True
    )
    # one row per model: pgd-at's strongest evaluation, its audit (issue 16, item 6)
    pgd = next(r for r in rows if r["run"] == "pgd-at")
    assert pgd["where"] == "audit" and sum(r["run"] == "pgd-at" for r in rows) == 1
    assert pgd["method"] == "pgd-at" and pgd["architecture"] == "smallcnn"
    assert pgd["epochs"] == 2
    assert pgd["train_time_s"] == pytest.approx(sum(e["train_time_s"] for e in runs[0].train_log))
    md = leaderboard_markdown(runs)
    assert "## linf ε = 0.1" in md
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {pgd['rank']} | pgd-at/audit |"))
    assert f"{100 * pgd['robust_accuracy']:.2f}%" in line and "smallcnn" in line


def test_eps_label():
    assert eps_label(8 / 255) == "8/255" and eps_label(0.1) == "0.1" and eps_label(0.5) == "0.5"
    assert eps_label(0.0) == "0"


def test_bad_run_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="nothing to report"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"clean_accuracy": 0.5}))
    with pytest.raises(ValueError, match="missing robust_accuracy"):
        load_run(tmp_path)
    run = tmp_path / "copy"
    shutil.copytree(NATURAL, run)
    (run / "examples.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="examples.safetensors is missing"):
        render_html([load_run(run)])
    with pytest.raises(ValueError, match="no runs"):
        render_html([])


def test_cli_report_and_compare(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(PGD), str(NATURAL), "-o", str(out)]) == 0
    assert f"report: {out.resolve()}" in capsys.readouterr().out
    page = out.read_text()
    assert 'id="leaderboard"' in page and external_references(parse(page)) == []
    assert main(["compare", str(PGD), str(NATURAL)]) == 0
    printed = capsys.readouterr().out
    assert printed == leaderboard_markdown([load_run(PGD), load_run(NATURAL)])
    assert main(["compare", str(PGD), "-o", str(tmp_path / "board.md")]) == 0
    assert (tmp_path / "board.md").read_text().startswith("# robustlab leaderboard")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_write_report_default_single_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(NATURAL, run)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
    path = write_report([run], tmp_path / "sub" / "x.html", title="mine")
    assert "<title>mine</title>" in path.read_text()
