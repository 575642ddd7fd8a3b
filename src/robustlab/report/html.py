"""``robustlab report`` and ``robustlab compare``: one self-contained HTML page, and a leaderboard.

The page is rendered from what the run directories recorded (see :mod:`robustlab.report.runs`)
and never runs a model: flags first, in colour; then per run the headline numbers, the attack
cascade, the audit's verdicts, robust accuracy against eps, clean / adversarial / perturbation
images, training curves, smoothing curves and certified accuracy, and the provenance (config,
versions, seed, commit, threat model). Plots are inline SVG and images inline PNG, the style is
inline CSS and there is no script: the file opens from disk, offline, and shows the same
everywhere. The leaderboard follows RobustBench (:mod:`robustlab.report.leaderboard`): one table
per data set and threat model, one row per model (its strongest evaluation), flagged rows last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from robustlab._io import atomic_write
from robustlab._provenance import package_version
from robustlab.report import plots
from robustlab.report.examples import examples_html
from robustlab.report.leaderboard import leaderboard_html
from robustlab.report.markup import (
    duration,
    esc,
    pct,
    sizes_note,
    status_badge,
    table,
    threat_label,
)
from robustlab.report.runs import Document, Run, load_run
from robustlab.report.summary import (
    DETECTION_HEAD,
    adaptive_text,
    attack_label,
    detection_notes,
    detection_rows,
    randomness_notes,
)

CERTIFIED_RADII = 5  # radii in the certification table


# --- flags --------------------------------------------------------------------------------------
def _flags(run: Run) -> list[tuple[str, str, str]]:
    """(where, name, message) of every flag a run recorded: the evaluations' sanity and audit
    flags, and catastrophic overfitting in training."""
    found = [
        (doc.where, f["name"], f.get("message", ""))
        for doc in run.evaluations
        for f in doc.data.get("flags", [])
    ]
    found += [
        (
            "training",
            "catastrophic-overfitting",
            f"epoch {r['epoch']}: the overfitting probe collapsed; the run {r['overfit']}",
        )
        for r in run.train_log
        if "overfit" in r
    ]
    return found


def _flags_html(runs: Sequence[Run]) -> str:
    rows = [(run.name, *f) for run in runs for f in _flags(run)]
    n_eval = sum(len(run.evaluations) for run in runs)
    if not rows:
        return (
            f'<div class="banner ok"><strong>No sanity flag</strong> was raised by the '
            f"{n_eval} evaluation(s) and the training logs of this report.</div>"
        )
    items = "".join(
        f"<li><strong>{esc(name)}</strong> ({esc(run)}, {esc(where)}): {esc(msg)}</li>"
        for run, where, name, msg in rows
    )
    return (
        f'<div class="banner flag"><strong>{len(rows)} flag(s) raised: do not trust the '
        f"robust accuracy they concern as it stands.</strong><ul>{items}</ul></div>"
    )


# --- one evaluation -----------------------------------------------------------------------------
def _cascade(d: dict[str, Any]) -> str:
    rows = []
    for i, a in enumerate(d["per_attack"], 1):
        if a.get("skipped"):
            rows.append(
                [str(i), attack_label(a["config"]), "skipped: " + str(a["skipped"]), "–", "–", "–"]
            )
            continue
        rows.append(
            [
                str(i),
                attack_label(a["config"]),
                str(a["attacked"]),
                str(a["broken"]),
                pct(a["robust_accuracy"]),
                duration(a["time_s"]),
            ]
        )
    clean_wrong = round((1 - d["clean_accuracy"]) * d["n"])
    rows.insert(
        0,
        [
            "0",
            "clean (no attack)",
            str(d["n"]),
            str(clean_wrong),
            pct(d["clean_accuracy"]),
            duration((d.get("timings") or {}).get("clean_s")),
        ],
    )
    return table(
        ("#", "attack", "points attacked", "points broken", "accuracy after", "time"), rows, "num"
    )


def _audit(d: dict[str, Any]) -> str:
    aud = d.get("audit")
    if not aud:
        return ""
    rows = [[c["name"], status_badge(c["status"]), c["evidence"]] for c in aud["checks"]]
    rows += [[c["name"], "not applicable", c["evidence"]] for c in aud.get("not_applicable", [])]
    return (
        "<h4>Audit checklist</h4>"
        + table(("check", "verdict", "evidence"), rows, "audit")
        + f"<p>Plain PGD-20: {pct(aud['naive_robust_accuracy'])} · FGSM: "
        f"{pct(aud.get('fgsm_robust_accuracy'))} · adaptive attacks: "
        f"{esc(adaptive_text(aud['adaptive']))}.</p>"
    )


def _detection(d: dict[str, Any]) -> str:
    """A detector's detection figures (the record's ``detection``); empty for other models."""
    det = d.get("detection")
    if not det:
        return ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in detection_notes(det))
    return f'<h4>Detection</h4><ul class="note">{notes}</ul>' + table(
        DETECTION_HEAD, detection_rows(det), "detection"
    )


def _provenance(d: dict[str, Any]) -> str:
    cfg = d.get("config") or {}
    rows = [
        ("threat model", f"{threat_label(d['threat'])}, bounds {d['threat']['bounds']}"),
        ("suite", d.get("suite", "–")),
        ("points", d["n"]),
        ("seed", d.get("seed", "–")),
        ("commit", d.get("commit") or "unknown"),
        ("created", d.get("created", "–")),
        *((k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in cfg.items()),
        ("adaptive", json.dumps(d.get("adaptive", {}))),
        ("versions", ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())),
        ("total time", duration((d.get("timings") or {}).get("total_s"))),
    ]
    return (
        "<details><summary>Configuration, versions and provenance</summary>"
        + table(("", ""), rows, "kv")
        + "</details>"
    )


def _evaluation(run: Run, doc: Document) -> str:
    d = doc.data
    title = "Audit" if "audit" in d else "Evaluation"
    flags = "".join(
        f'<li class="flag-item"><strong>{esc(f["name"])}</strong>: {esc(f.get("message", ""))}</li>'
        for f in d.get("flags", [])
    )
    cards = "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>'
        for k, v in (
            ("clean accuracy", pct(d["clean_accuracy"])),
            ("robust accuracy", pct(d["robust_accuracy"])),
            *(
                [
                    (
                        f"verified accuracy ({d['verification']['method']})",
                        pct(d["verified_accuracy"]),
                    )
                ]
                if "verified_accuracy" in d
                else []
            ),
            ("threat model", threat_label(d["threat"])),
            ("suite", f"{d.get('suite', '–')} · {d['n']} points"),
        )
    )
    v = d.get("versions") or {}
    ident = (
        f"seed {d.get('seed', '–')} · commit {(d.get('commit') or 'unknown')[:12]} · "
        f"robustlab {v.get('robustlab', '?')} · torch {v.get('torch', '?')} · "
        f"{d.get('created', '')}"
    )
    return (
        f'<section class="evaluation"><h3>{title}: {esc(doc.path)}</h3>'
        f'<div class="cards">{cards}</div><p class="meta">{esc(ident)}</p>'
        + (f'<ul class="flags">{flags}</ul>' if flags else "")
        + '<p class="note">Robust accuracy is the per-sample worst case over every attack: '
        "each attack runs on the points still robust, and its predictions are recomputed "
        "on its adversarial inputs.</p>"
        + "".join(f'<p class="note">{esc(note)}</p>' for note in randomness_notes(d))
        + _cascade(d)
        + _detection(d)
        + _audit(d)
        + examples_html(run, doc)
        + _provenance(d)
        + "</section>"
    )


# --- curves -------------------------------------------------------------------------------------
def _series(
    label: str, kind: str, curve: Sequence[dict[str, float]], n: Sequence[float]
) -> dict[str, Any]:
    """A plot series from ``{"eps", "robust_accuracy"}`` rows; ``n``: the sizes of the
    evaluations it shows."""
    return {
        "label": label,
        "kind": kind,
        "eps": [p["eps"] for p in curve],
        "accuracy": [p["robust_accuracy"] for p in curve],
        "n": sorted(set(n)),
    }


def _where(doc: Document) -> str:
    """`` (folder)`` for a results file in a subfolder of the run, nothing for the run's own."""
    return "" if doc.where == "." else f" ({doc.where})"


def _eps_series(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Per norm, what the run recorded of robust accuracy against eps."""
    by_norm: dict[str, list[dict[str, Any]]] = {}
    points: dict[str, list[dict[str, float]]] = {}
    for doc in run.evaluations:
        d, norm = doc.data, doc.data["threat"]["norm"]
        if d.get("min_norm_curve"):
            by_norm.setdefault(norm, []).append(
                _series(
                    f"minimum-norm attacks, {d['n']} points{_where(doc)}",
                    "steps",
                    d["min_norm_curve"],
                    [d["n"]],
                )
            )
        if (d.get("audit") or {}).get("eps_curve"):
            by_norm.setdefault(norm, []).append(
                _series(
                    f"audit ε sweep, APGD-CE, {d['n']} points{_where(doc)}",
                    "points",
                    d["audit"]["eps_curve"],
                    [d["n"]],
                )
            )
        if "audit" not in d:
            points.setdefault(norm, []).append(
                {"eps": d["threat"]["eps"], "robust_accuracy": d["robust_accuracy"], "n": d["n"]}
            )
    for norm, pts in points.items():
        if len(pts) > 1 or norm in by_norm:
            n = sorted({p["n"] for p in pts})
            by_norm.setdefault(norm, []).append(
                _series(
                    f"evaluations (suite), {' / '.join(map(str, n))} points",
                    "points",
                    sorted(pts, key=lambda p: p["eps"]),
                    n,
                )
            )
    return by_norm


def _curves(run: Run, key: str) -> str:
    out = []
    main = run.main_evaluation()
    eps_series = _eps_series(run)
    if run.evaluations and not eps_series:
        out.append(
            '<h3>Robust accuracy against ε</h3><p class="note">Not recorded: run a '
            "minimum-norm attack (fab, ddn, cw-l2, deepfool, ead, rays: one run gives "
            "every ε), "
            "robustlab audit (its ε sweep), or evaluations at several ε into this run "
            "folder.</p>"
        )
    for norm, series in eps_series.items():
        eps = main.data["threat"]["eps"] if main and main.data["threat"]["norm"] == norm else None
        out.append(
            f"<h3>Robust accuracy against ε ({esc(norm)})</h3>"
            f"<figure>{plots.robustness_curves(series, norm, eps, f'{key}-eps-{norm}')}"
            "<figcaption>Upper bounds, like every attack's number: a point counts as "
            "robust at ε when no attack found an adversarial input within ε."
            f"{esc(sizes_note([k for s in series for k in s['n']]))}"
            "</figcaption></figure>"
        )
    log = run.train_log
    if log:
        rows = [
            [
                str(r["epoch"]),
                f"{r['train_loss']:.4f}",
                f"{r['lr']:.4g}",
                pct(r.get("val_clean_acc")),
                pct(r.get("val_robust_acc")),
                duration(r.get("train_time_s")),
                r.get("overfit", ""),
            ]
            for r in log
        ]
        out.append(
            "<h3>Training</h3>" + f"<figure>{plots.training_curves(log, f'{key}-train')}"
            f"{_best_caption(log)}</figure><details><summary>Per-epoch log</summary>"
            + table(
                ("epoch", "loss", "lr", "val clean", "val robust", "time", "overfitting"),
                rows,
                "num",
            )
            + "</details>"
        )
    for i, doc in enumerate(run.smoothing):
        d = doc.data
        cfg = d["config"]
        out.append(
            f"<h3>Smoothing: {esc(doc.path)}</h3><figure>"
            + plots.smoothing_curves(d["rows"], d.get("base_accuracy"), f"{key}-smooth-{i}")
            + f"<figcaption>{esc(cfg.get('noise', 'gaussian'))} noise, {esc(cfg.get('n'))} "
            f"points, seed {esc(cfg.get('seed'))}; all n of one σ share the same draws."
            f"{esc(sizes_note([r['n'] for r in d['rows'] if 'n' in r]))}"
            "</figcaption></figure>"
        )
    if run.certifications:
        out.append(_certification(run, key))
    return "".join(out)


def _best_caption(log: Sequence[dict[str, Any]]) -> str:
    """The best hold-out epoch (the one ``model_best.safetensors`` holds with keep_best), or
    nothing for a run without a hold-out."""
    best = log[-1].get("best_epoch")
    rec = next((r for r in log if r["epoch"] == best), None)
    if rec is None:
        return ""
    robust = rec.get("holdout_robust_acc")
    what = (
        f"robust {pct(robust)}"
        if robust is not None
        else f"clean {pct(rec.get('holdout_clean_acc'))}"
    )
    return (
        f"<figcaption>Best epoch on the hold-out of the training data: {best} ({what} "
        f"on {esc(rec.get('holdout_n'))} held-out images; model_best.safetensors with "
        "keep_best).</figcaption>"
    )


def _certification(run: Run, key: str) -> str:
    docs = sorted(run.certifications, key=lambda c: c.data["config"].get("sigma", 0))
    curves, rows = [], []
    for doc in docs:
        d, cfg = doc.data, doc.data["config"]
        label = f"σ = {cfg.get('sigma', '?'):g}" + (" (denoised)" if cfg.get("denoiser") else "")
        curves.append({"label": label, "points": d["certified_accuracy"]})
        pts = d["certified_accuracy"]
        step = max(1, math.ceil(len(pts) / CERTIFIED_RADII))
        at = ", ".join(f"r={p['radius']:g}: {pct(p['accuracy'])}" for p in pts[::step])
        rows.append(
            [
                str(doc.path.parent),
                label,
                str(d["n"]),
                pct(d["clean_accuracy"]),
                pct(d["abstain_rate"]),
                f"{d['average_certified_radius']:.3f}",
                at,
                f"n0 {cfg.get('n0')}, n {cfg.get('n')}, α {cfg.get('alpha')}",
            ]
        )
    norms = {doc.data["norm"] for doc in docs}
    norm = norms.pop() if len(norms) == 1 else "mixed norms"
    return (
        "<h3>Certified accuracy (randomised smoothing, Cohen et al.)</h3><figure>"
        + plots.certified_curves(curves, norm, f"{key}-cert")
        + (
            f"<figcaption>{esc(sizes_note([doc.data['n'] for doc in docs]).strip())}</figcaption>"
            if len({doc.data["n"] for doc in docs}) > 1
            else ""
        )
        + "</figure>"
        + table(
            (
                "folder",
                "noise",
                "points",
                "smoothed clean",
                "abstained",
                f"ACR ({norm})",
                "certified accuracy",
                "CERTIFY",
            ),
            rows,
            "num",
        )
    )


def _training_config(run: Run) -> str:
    m = run.model
    if not m:
        return ""
    tc = m.get("train_config") or {}
    rows = [
        ("architecture", json.dumps(m.get("architecture"))),
        ("dataset", m.get("dataset")),
        ("objective", json.dumps(m.get("objective_config") or m.get("objective"))),
        ("training threat model", threat_label(m["threat"]) if m.get("threat") else "none"),
        ("epochs", f"{m.get('epoch')} of {tc.get('epochs', '?')}"),
        ("seed", m.get("seed")),
        ("commit", m.get("git_commit") or "unknown"),
        ("versions", f"robustlab {m.get('robustlab_version')}, torch {m.get('torch_version')}"),
        ("checkpoint sha256", m.get("sha256", "–")),
        *((k, json.dumps(v)) for k, v in tc.items() if k not in ("objective", "epochs", "seed")),
    ]
    return (
        "<details><summary>Training configuration (model.json)</summary>"
        + table(("", ""), rows, "kv")
        + "</details>"
    )


def _skipped(run: Run) -> str:
    if not run.skipped:
        return ""
    items = "".join(f"<li>{esc(s)}</li>" for s in run.skipped)
    return f'<div class="note">Files skipped (not robustlab results):<ul>{items}</ul></div>'


def _run(run: Run, i: int) -> str:
    main = run.main_evaluation()
    headline = ""
    if main is not None:
        d = main.data
        headline = (
            f'<p class="headline">{esc(threat_label(d["threat"]))}: clean '
            f"<strong>{pct(d['clean_accuracy'])}</strong>, robust <strong>"
            f"{pct(d['robust_accuracy'])}</strong> ({esc(d.get('suite', '–'))}, "
            f"{d['n']} points)</p>"
        )
    arch = ((run.model or {}).get("architecture") or {}).get("name")
    sub = " · ".join(
        x for x in (arch, (run.model or {}).get("objective"), (run.model or {}).get("dataset")) if x
    )
    return (
        f'<section class="run" id="run-{i}"><h2>{esc(run.name)}</h2>'
        f'<p class="path">{esc(run.path)}{" · " + esc(sub) if sub else ""}</p>{headline}'
        + _training_config(run)
        + _skipped(run)
        + "".join(_evaluation(run, doc) for doc in run.evaluations)
        + _curves(run, f"r{i}")
        + "</section>"
    )


CSS = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1d2430; --muted: #5b6575;
  --line: #d8dde5; --card: #f4f6f9; --ok: #1a7f37; --ok-bg: #e6f4ea; --bad: #b42318;
  --bad-bg: #fde8e6; --skip: #8a6d00; --skip-bg: #fff4cc; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #12161c; --fg: #e3e8ef; --muted: #9aa5b4; --line: #2e3642; --card: #1b2129;
    --ok: #6fdc8c; --ok-bg: #13301d; --bad: #ff8a80; --bad-bg: #3a1512; --skip: #f2cc60;
    --skip-bg: #33290a; } }
body { background: var(--bg); color: var(--fg); margin: 0 auto; max-width: 1180px;
  padding: 1.2rem 1.5rem 3rem; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid var(--line);
  padding-bottom: .2rem; margin-top: 2.2rem; } h3 { margin-top: 1.6rem; }
.path, .note, figcaption, .meta { color: var(--muted); font-size: .9em; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92em; }
th, td { border: 1px solid var(--line); padding: .25rem .55rem; text-align: left;
  vertical-align: top; }
thead th { background: var(--card); }
table.num td { font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.kv td { word-break: break-word; }
.banner { border-radius: 6px; padding: .7rem 1rem; margin: 1rem 0; border: 1px solid; }
.banner.ok { color: var(--ok); background: var(--ok-bg); }
.banner.flag { color: var(--bad); background: var(--bad-bg); }
.banner ul { margin: .4rem 0 0; color: var(--fg); }
ul.flags { color: var(--bad); }
.badge { font-weight: 600; padding: .05rem .45rem; border-radius: 4px; }
.badge.pass { color: var(--ok); background: var(--ok-bg); }
.badge.flag { color: var(--bad); background: var(--bad-bg); }
.badge.skip { color: var(--skip); background: var(--skip-bg); }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; margin: .6rem 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .45rem .8rem; min-width: 9rem; }
.card .k { color: var(--muted); font-size: .8em; } .card .v { font-size: 1.25em; font-weight: 600; }
figure { margin: .6rem 0; } svg.plot { max-width: 100%; height: auto; color: var(--fg); }
table.examples td { text-align: center; }
table.examples img { image-rendering: pixelated; width: 84px; height: 84px; display: block;
  margin: 0 auto; }
.cap { font-size: .78em; } .cap.broken { color: var(--bad); } .cap.robust { color: var(--ok); }
details { margin: .6rem 0; } summary { cursor: pointer; color: var(--muted); }
nav ul { padding-left: 1.2rem; }
"""


def render_html(runs: Sequence[Run], title: str | None = None) -> str:
    """The report page for ``runs`` (a complete HTML document as a string)."""
    if not runs:
        raise ValueError("no runs to report: give at least one run directory")
    title = title or ("robustlab report: " + ", ".join(r.name for r in runs))
    nav = "".join(f'<li><a href="#run-{i}">{esc(r.name)}</a></li>' for i, r in enumerate(runs))
    board = leaderboard_html(runs) if len(runs) > 1 else ""
    if board:
        nav = '<li><a href="#leaderboard">Leaderboard</a></li>' + nav
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="meta">Rendered {created} by robustlab '
        f"{package_version()} "
        "from the recorded results; nothing was recomputed.</p>"
        + _flags_html(runs)
        + f"<nav><ul>{nav}</ul></nav>"
        + board
        + "".join(_run(r, i) for i, r in enumerate(runs))
        + "</body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path | Run], out: str | Path, title: str | None = None
) -> Path:
    """Render the runs in ``run_dirs`` (folders, or runs already loaded by :func:`load_run`)
    into the HTML file ``out`` (written atomically)."""
    runs = [p if isinstance(p, Run) else load_run(p) for p in run_dirs]
    out = Path(out)
    atomic_write(out, render_html(runs, title))
    return out
