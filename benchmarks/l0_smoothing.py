"""l0 certified accuracy against radius for smallcnn models trained with uniform-l0 noise on
Fashion-MNIST (issue 21, item 6): Lee et al. 2019's discrete smoothing, certified with
Cohen et al.'s CERTIFY and the exact l0 radius of ``robustlab.defenses.l0_certificate``.

Models (``benchmarks/.cache/``, trained once per recipe): smallcnn with the ``gaussian-aug``
objective, ``noise="uniform-l0"`` and ``sigma`` = the keep probability alpha, one per
``--alphas``. Lee et al.'s MNIST settings (METHODS-2 card F4: batch 400, Nesterov SGD lr 0.05,
step decay x0.1 every third of training, trained with the certified noise) on the budget of the
other benchmark models: the first ``--train-n`` training images, ``--epochs`` epochs.

Certification (per alpha, the first ``--images`` test images, which are 8-bit, k/255: checked):
n0 = 100, n = ``--n`` (default 10,000; the paper uses 100,000), failure probability 0.001.
Reported: certified accuracy at l0 radius r = 0, 1, ... up to the largest certified (the
fraction of points predicted correctly with radius >= r; r counts changed pixels of the 784),
the average certified radius, the clean accuracy of the smoothed classifier, abstentions, and
CPU seconds (``time.process_time``) of training and certification. Also, per alpha, the
largest radius any point could get at this n (all n votes for the top class): radii are
bounded by n and alpha before any model is run.

Resumable: the rows of each (alpha, image) are cached in ``benchmarks/.cache/l0_smoothing/``
(``certify.jsonl`` of ``robustlab.evaluation.run_certification``, CPU seconds in
``cpu.jsonl``); points are certified in rounds of ``--chunk`` per alpha, so an interrupted run
has about as many points for every alpha, and a rerun with a smaller ``--images`` reports
from the cache alone. Run from the repository root:
``.venv/bin/python benchmarks/l0_smoothing.py --threads 1``. Results:
``benchmarks/results/l0_smoothing.md/.json`` and ``l0_smoothing.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE_DIR,
    RESULTS_DIR,
    _recipe_key,
    machine_record,
    trained_model,
    write_results,
)
from torch import Tensor, nn

import robustlab as rl
from robustlab.defenses.certify import lower_confidence_bound
from robustlab.defenses.l0_certificate import l0_radius, l0_threshold
from robustlab.evaluation.certification import certification_summary, run_certification
from robustlab.noise import L0_LEVELS, check_quantised

DATASET = "fashion-mnist"
ROWS = CACHE_DIR / "l0_smoothing"
N0, FAILURE = 100, 0.001


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def recipe(alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    """Lee et al.'s MNIST training (card F4) on this budget: batch 400, Nesterov SGD lr 0.05,
    lr x0.1 after each third of the epochs (their step decay every 10 of 30 epochs)."""
    return {
        "arch": "smallcnn",
        "dataset": DATASET,
        "train_n": args.train_n,
        "epochs": args.epochs,
        "batch_size": 400,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "piecewise",
        "schedule_options": {"milestones": [1 / 3, 2 / 3], "gamma": 0.1},
        "seed": 0,
        "objective": "gaussian-aug",
        "objective_options": {"sigma": alpha, "noise": "uniform-l0"},
    }


def quantisation(x: Tensor) -> dict[str, Any]:
    """How far the test images lie from the levels k/255 (in levels), and whether
    ``check_quantised`` (what ``certify`` requires) accepts them."""
    scaled = x.double() * L0_LEVELS
    worst = float((scaled - scaled.round()).abs().max())
    try:
        check_quantised(x)
        ok, reason = True, None
    except ValueError as e:
        ok, reason = False, str(e)
    return {"max_offset_levels": worst, "accepted": ok, "reason": reason}


def reachable(alpha: float, n: int, d: int) -> dict[str, Any]:
    """The largest l0 radius at this n (p_lower of n votes out of n) and the threshold
    rho_1^-1(1/2) that p_lower must exceed for radius 1."""
    best = lower_confidence_bound(n, n, FAILURE)
    return {
        "max_p_lower": best,
        "max_radius": l0_radius(best, alpha, d),
        "threshold_r1": float(l0_threshold(1, alpha)),
        "max_radius_binarised": l0_radius(best, alpha, d, levels=1),
    }


def notes(record: dict[str, Any]) -> list[str]:
    """What the numbers can and cannot say, from the record itself."""
    n, out = record["args"]["n"], []
    for c in record["certify"]:
        if c["max_radius"] == 0:
            out.append(
                f"- alpha {c['alpha']:g} cannot certify any radius above 0 at n = {n}, whatever "
                f"the model: even n votes out of n give p_lower = {c['max_p_lower']:.5f}, and "
                f"radius 1 needs p_lower > {c['threshold_r1']:.5f} on 8-bit inputs (K = "
                f"{L0_LEVELS}: the noise moves a pixel to a given other value with probability "
                f"(1 - alpha)/{L0_LEVELS} only, so one changed pixel changes the noise's "
                f"likelihood by a factor up to {c['alpha'] * L0_LEVELS / (1 - c['alpha']):.0f}). "
                f"On binarised inputs (K = 1, Lee et al.'s MNIST) the same alpha and n reach "
                f"radius {c['max_radius_binarised']}. Its only certified column is r=0, the "
                "clean accuracy of the smoothed classifier."
            )
    out.append(
        "- Paper: Lee et al. certify binarised MNIST (K = 1, alpha 0.8, n = 100,000), "
        "not 8-bit Fashion-MNIST; METHODS-2 card F4 does not give their certified "
        "accuracies (it lists them as unverified), so no number is compared here."
    )
    out.append(
        "- Train s: wall seconds of training (1 thread, shared CPU), CPU seconds where "
        "this script trained the model (else '-': the model came from the cache)."
    )
    return out


def out_dir(alpha: float, rec: dict[str, Any], n: int) -> Path:
    return ROWS / f"alpha-{alpha:g}-n{n}-{_recipe_key(rec)}"


def read_rows(path: Path, name: str, ids: set[int]) -> dict[int, dict[str, Any]]:
    """Rows of ``path/name`` (JSON lines, the first of certify.jsonl is its header) whose
    ``index`` is in ``ids``; a half-written last line is dropped."""
    file = path / name
    rows = {}
    if file.exists():
        for line in file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if "index" in row and row["index"] in ids:
                rows[row["index"]] = row
    return rows


def certify_chunk(
    model: nn.Module, x: Tensor, y: Tensor, alpha: float, out: Path, args: argparse.Namespace
) -> None:
    """Certify the first ``len(x)`` test points (those already in ``out`` are skipped),
    appending each new point's CPU seconds to ``out/cpu.jsonl``."""
    cpu = [time.process_time()]

    def on_row(row: dict[str, Any]) -> None:
        now = time.process_time()
        with open(out / "cpu.jsonl", "a") as f:
            f.write(json.dumps({"index": row["index"], "cpu_seconds": now - cpu[0]}) + "\n")
        cpu[0] = now

    out.mkdir(parents=True, exist_ok=True)
    run_certification(
        model,
        x,
        y,
        sigma=alpha,
        noise="uniform-l0",
        n0=N0,
        n=args.n,
        alpha=FAILURE,
        batch_size=args.batch,
        seed=0,
        out=out,
        resume=True,
        on_row=on_row,
        config={"model": out.name},
    )


def summarise(
    alpha: float,
    out: Path,
    ids: list[int],
    top: int,
    model: nn.Module,
    d: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rows = read_rows(out, "certify.jsonl", set(ids))
    cpu = read_rows(out, "cpu.jsonl", set(ids))
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RuntimeError(
            f"alpha {alpha:g}: {len(missing)} points not certified "
            f"(first {missing[:5]}); rerun to resume"
        )
    ordered = [rows[i] for i in ids]
    meta = model.robustlab_meta
    return {
        "alpha": alpha,
        "model": out.name,
        **reachable(alpha, args.n, d),
        **certification_summary(ordered, radii=list(range(top + 1)), norm="l0"),
        "largest_radius": max(r["radius"] for r in ordered),
        "certify_cpu_seconds": sum(cpu[i]["cpu_seconds"] for i in ids if i in cpu),
        "cpu_rows": sum(i in cpu for i in ids),
        "certify_wall_seconds": sum(r["seconds"] for r in ordered),
        "train_seconds": meta.get("train_seconds"),
        "train_cpu_seconds": meta.get("train_cpu_seconds"),
        "train_threads": meta.get("threads"),
    }


def models_for(args: argparse.Namespace) -> dict[float, tuple[nn.Module, dict[str, Any]]]:
    """One trained model per alpha; a model trained now records its CPU seconds in its
    ``robustlab_meta`` as ``train_cpu_seconds`` (a cached one reports None for it unless
    this script trained it)."""
    out = {}
    for alpha in args.alphas:
        rec = recipe(alpha, args)
        cached = (CACHE_DIR / f"l0-{alpha:g}-{_recipe_key(rec)}.safetensors").exists()
        t0 = time.process_time()
        model = trained_model(f"l0-{alpha:g}", rec, log=log)
        cpu_file = out_dir(alpha, rec, args.n) / "train_cpu.json"
        if "train_cpu_seconds" not in model.robustlab_meta:
            if not cpu_file.exists() and not cached:  # trained just now
                cpu_file.parent.mkdir(parents=True, exist_ok=True)
                cpu_file.write_text(json.dumps({"train_cpu_seconds": time.process_time() - t0}))
            if cpu_file.exists():
                model.robustlab_meta["train_cpu_seconds"] = json.loads(cpu_file.read_text())[
                    "train_cpu_seconds"
                ]
        out[alpha] = (model, rec)
    return out


# --- output ------------------------------------------------------------------------------------
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(record: dict[str, Any]) -> str:
    a, m, q = record["args"], record["machine"], record["quantisation"]
    top = record["largest_radius"]
    lines = [
        "# l0 certified accuracy of uniform-l0 smoothing (Lee et al. 2019), Fashion-MNIST",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['cpu']}, {m['nproc']} cores (shared), torch threads "
        f"{a['threads']}, torch {m['torch']}, robustlab commit {m['robustlab_commit']} "
        f"(src changes: {m['src_changes'] or 'none'})",
        "",
        f"smallcnn trained with gaussian-aug noise=uniform-l0 (first {a['train_n']} "
        f"training images, {a['epochs']} epochs, batch 400, Nesterov SGD lr 0.05 x0.1 "
        f"after each third); CERTIFY on the first {a['images']} test images per alpha, "
        f"n0 = {N0}, n = {a['n']} (the paper: 100,000), failure probability {FAILURE}; "
        f"radius = pixels changed (of {record['d']}), levels K = {L0_LEVELS}. Test images "
        f"on the levels k/255: {'yes' if q['accepted'] else 'NO: ' + str(q['reason'])} "
        f"(largest offset {q['max_offset_levels']:.2g} levels).",
        "",
        "Certified accuracy (%) at l0 radius r:",
        "",
        "| alpha | clean (smoothed) | abstain | "
        + " | ".join(f"r={r}" for r in range(top + 1))
        + " | ACR | largest possible r at this n | train s (wall / CPU) "
        "| certify CPU s/point |",
        "|---|---|---|" + "---|" * (top + 1) + "---|---|---|---|",
    ]
    for c in record["certify"]:
        cells = [pct(p["accuracy"]) for p in c["certified_accuracy"]]
        train = c["train_cpu_seconds"]
        lines.append(
            f"| {c['alpha']:g} | {pct(c['clean_accuracy'])} | {pct(c['abstain_rate'])} | "
            + " | ".join(cells)
            + f" | {c['average_certified_radius']:.3f} | "
            f"{c['max_radius']} (p_lower <= {c['max_p_lower']:.5f}; r=1 needs > "
            f"{c['threshold_r1']:.5f}) | {c['train_seconds']:.0f} / "
            f"{'-' if train is None else f'{train:.0f}'} | "
            f"{c['certify_cpu_seconds'] / max(c['cpu_rows'], 1):.2f} |"
        )
    lines += ["", *record.get("notes", []), ""]
    return "\n".join(lines)


def plot(record: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, c in enumerate(record["certify"]):  # markers and dashes: equal curves stay visible
        pts = c["certified_accuracy"]
        ax.plot(
            [p["radius"] for p in pts],
            [100 * p["accuracy"] for p in pts],
            marker="osd^v"[k % 5],
            ls=("-", "--", ":", "-.")[k % 4],
            ms=7 - k,
            label=f"alpha {c['alpha']:g} (ACR {c['average_certified_radius']:.2f})",
        )
    ax.set_xlabel("l0 radius (pixels changed)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"uniform-l0 smoothing, Fashion-MNIST, n = {record['args']['n']}")
    ax.legend()
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{record['args']['stem']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--alphas",
        type=floats,
        default=[0.2, 0.8, 0.9],
        help="keep probabilities, one model each (comma-separated)",
    )
    p.add_argument("--train-n", type=int, default=15000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=100, help="test points per alpha")
    p.add_argument("--n", type=int, default=10_000, help="estimation draws per point")
    p.add_argument("--chunk", type=int, default=10, help="points per alpha per round")
    p.add_argument("--batch", type=int, default=1000, help="noisy images per forward")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--stem", default="l0_smoothing")
    args = p.parse_args()
    if (
        min(args.train_n, args.epochs, args.images, args.n, args.chunk, args.batch, args.threads)
        < 1
    ):
        p.error("--train-n, --epochs, --images, --n, --chunk, --batch and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"machine": machine_record(), "args": vars(args)}
    x_test, y_test = rl.data.load(DATASET, split="test", n=args.images)
    record["quantisation"] = quantisation(x_test)
    d = x_test[0].numel()
    record["d"] = d
    models = models_for(args)
    record["recipes"] = {f"{a:g}": rec for a, (_, rec) in models.items()}
    for start in range(0, args.images, args.chunk):
        stop = min(start + args.chunk, args.images)
        for alpha, (model, rec) in models.items():
            t0 = time.perf_counter()
            certify_chunk(
                model, x_test[:stop], y_test[:stop], alpha, out_dir(alpha, rec, args.n), args
            )
            log(f"alpha {alpha:g}: points {start}..{stop - 1} ({time.perf_counter() - t0:.0f} s)")
    ids = list(range(args.images))
    top = 0
    for alpha, (_, rec) in models.items():
        rows = read_rows(out_dir(alpha, rec, args.n), "certify.jsonl", set(ids))
        top = max([top, *(int(r["radius"]) for r in rows.values() if r["correct"])])
    record["largest_radius"] = top
    record["certify"] = [
        summarise(a, out_dir(a, rec, args.n), ids, top, model, d, args)
        for a, (model, rec) in models.items()
    ]
    record["notes"] = notes(record)
    record["plot"] = plot(record)
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}, {record['plot']}")


if __name__ == "__main__":
    main()
