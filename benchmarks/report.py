"""What the reporting costs: progress bars and logs in evaluation and training, and rendering.

Three parts, one record (``benchmarks/results/report.md/.json``):

1. ``evaluate``: the same evaluation (PGD-20, linf 0.1, ``--points`` Fashion-MNIST test points,
   the cached PGD-AT smallcnn of ``attack_speed.py``) bare (no ``out``, no progress bar)
   against with everything the CLI does (progress bar, ``eval_log.jsonl``, ``results.json``,
   ``per_sample.jsonl``, ``examples.safetensors``, resumable state), interleaved, median of
   ``--repeats``.
2. ``train``: one epoch of natural training on ``--train-n`` images, bare against with the
   progress bar, checkpoints, ``train_log.jsonl`` and TensorBoard scalars.
3. ``render``: ``robustlab report`` of the test fixtures (two runs: an evaluation each, an
   audit, two certifications, a smoothing curve, training logs): seconds and page size, and
   how much of it is plots and images.

Run from the repository root: ``.venv/bin/python benchmarks/report.py`` (about 3 minutes on 2
CPU cores; it needs matplotlib and tensorboard, both in ``.venv``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import interleaved, machine_record, median, trained_model, write_results
from attack_speed import RECIPES

import robustlab as rl
from robustlab.report.html import render_html
from robustlab.report.runs import load_run

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "report_runs"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet_bars() -> contextlib.AbstractContextManager:
    """tqdm writes to stderr: keep the bars (their cost is measured) off the terminal."""
    return contextlib.redirect_stderr(io.StringIO())


def evaluate_part(args: argparse.Namespace) -> dict[str, Any]:
    model = trained_model("smallcnn-pgd-at", RECIPES["pgd-at"], log=log)
    x, y = rl.data.load("fashion-mnist", split="test", n=args.points)
    threat = rl.ThreatModel("linf", 0.1)
    attacks = [("pgd", {"steps": 20})]
    tmp = tempfile.TemporaryDirectory()
    counter = iter(range(10_000))

    def bare() -> float:
        return rl.evaluate(model, x, y, threat, attacks=attacks).robust_accuracy

    def logged() -> float:
        with quiet_bars():
            out = Path(tmp.name) / str(next(counter))
            return rl.evaluate(
                model, x, y, threat, attacks=attacks, out=out, progress=True
            ).robust_accuracy

    interleaved({"bare": bare, "logged": logged}, 1)  # warm-up
    times, results = interleaved(
        {"bare": bare, "logged": logged},
        args.repeats,
        on_done=lambda r, k, s: log(f"evaluate {k}: {s:.2f} s"),
    )
    tmp.cleanup()
    assert results["bare"] == results["logged"], results
    return {
        "points": args.points,
        "attack": "pgd-20",
        "robust_accuracy": results["bare"],
        "seconds": {k: median(v) for k, v in times.items()},
        "ratio": median(times["logged"]) / median(times["bare"]),
    }


def train_part(args: argparse.Namespace) -> dict[str, Any]:
    x, y = rl.data.load("fashion-mnist", split="train", n=args.train_n)
    tmp = tempfile.TemporaryDirectory()
    counter = iter(range(10_000))
    opts = {"objective": "natural", "epochs": 1, "batch_size": 128, "lr": 0.05, "seed": 0}

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return rl.models.create("smallcnn")

    def bare() -> float:
        return rl.training.fit(model(), (x, y), **opts)[-1]["train_loss"]

    def logged() -> float:
        with quiet_bars():
            out = Path(tmp.name) / str(next(counter))
            return rl.training.fit(
                model(),
                (x, y),
                out=out,
                progress=True,
                tensorboard=True,
                dataset="fashion-mnist",
                **opts,
            )[-1]["train_loss"]

    interleaved({"bare": bare, "logged": logged}, 1)
    times, results = interleaved(
        {"bare": bare, "logged": logged},
        args.repeats,
        on_done=lambda r, k, s: log(f"train {k}: {s:.2f} s"),
    )
    tmp.cleanup()
    return {
        "images": args.train_n,
        "epochs": 1,
        "loss": results,
        "seconds": {k: median(v) for k, v in times.items()},
        "ratio": median(times["logged"]) / median(times["bare"]),
    }


def render_part(args: argparse.Namespace) -> dict[str, Any]:
    dirs = [FIXTURES / "pgd-at", FIXTURES / "natural"]
    times: list[float] = []
    page = ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        page = render_html([load_run(d) for d in dirs])
        times.append(time.perf_counter() - t0)
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    pngs = re.findall(r'data:image/png;base64,[^"]+', page)
    return {
        "runs": [d.name for d in dirs],
        "seconds": median(times),
        "bytes": len(page.encode()),
        "plots": len(svgs),
        "plot_bytes": sum(len(s.encode()) for s in svgs),
        "images": len(pngs),
        "image_bytes": sum(len(p) for p in pngs),
    }


def markdown(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    lines = [
        "# Reporting costs",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, robustlab commit "
        f"{m['robustlab_commit']}",
        "",
    ]
    titles = {
        "evaluate": "Evaluation: bare vs progress bar + logs + results files ({points} "
        "points, {attack}, median of {repeats})",
        "train": "Training: one epoch on {images} images, bare vs progress bar + "
        "checkpoint + train_log + TensorBoard (median of {repeats})",
    }
    for part, title in titles.items():
        if part in rec:
            p = rec[part]
            lines += [
                "## " + title.format(repeats=rec["repeats"], **p),
                "",
                "| bare (s) | with progress and files (s) | ratio |",
                "|---|---|---|",
                f"| {p['seconds']['bare']:.2f} | {p['seconds']['logged']:.2f} | {p['ratio']:.3f} |",
                "",
            ]
    if "render" in rec:
        r = rec["render"]
        lines += [
            "## Rendering the test fixtures' report (two runs)",
            "",
            "| seconds | page | plots | plot bytes | images | image bytes |",
            "|---|---|---|---|---|---|",
            f"| {r['seconds']:.2f} | {r['bytes'] / 1e3:.0f} kB | {r['plots']} | "
            f"{r['plot_bytes'] / 1e3:.0f} kB | {r['images']} | "
            f"{r['image_bytes'] / 1e3:.0f} kB |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="evaluate,train,render")
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--train-n", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stem", default="report")
    args = p.parse_args()
    parts = args.parts.split(",")
    rec: dict[str, Any] = {
        "machine": machine_record(),
        "repeats": args.repeats,
        "settings": vars(args),
    }
    for name, fn in (("evaluate", evaluate_part), ("train", train_part), ("render", render_part)):
        if name in parts:
            rec[name] = fn(args)
    md, js = write_results(args.stem, markdown(rec), rec)
    print(markdown(rec))
    log(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
