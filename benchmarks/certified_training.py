"""Certified training on Fashion-MNIST, linf eps 0.1 (issue 21, items 2 and 6): models trained
with the ``ibp`` and ``crown-ibp`` objectives, verified by bound propagation, next to their
clean and empirical (``fast`` suite) robust accuracy and their training cost.

Models (``benchmarks/.cache/``, trained once per recipe): ``ibp-small`` (Gowal et al.'s small
CNN, no max pooling) trained naturally, with IBP and with CROWN-IBP on the first ``--train-n``
training images for ``--epochs`` epochs (warm-up 1 epoch, eps ramp over ``--ramp`` epochs,
Adam lr 1e-3, batch 128), and the PGD-AT smallcnn of ``benchmarks/smoothing.py`` (its recipe,
so its cached model is reused).

Per model, on the first ``--n`` test images: clean accuracy, ``fast``-suite robust accuracy,
verified accuracy by IBP and CROWN-IBP (the smallcnn: IBP only, CROWN refuses max pooling) and
by full CROWN on the first ``--crown-n`` of them (one backward pass per hidden neuron: about
6 s per point at one thread), each checked to be <= the empirical robust accuracy on the same
points; training time as a ratio to the natural ibp-small's (same budget and threads). Rows are
cached in ``benchmarks/.cache/certified_training/`` (one JSON per model, a key per measure), so
an interrupted run resumes. Run from the repository root:
``.venv/bin/python benchmarks/certified_training.py --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _common import CACHE_DIR, _recipe_key, machine_record, trained_model, write_results
from torch import Tensor, nn

import robustlab as rl
from robustlab.defenses.verify import check_below_empirical, verify

DATASET, EPS = "fashion-mnist", 0.1
ROWS = CACHE_DIR / "certified_training"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    base = {
        "arch": "ibp-small",
        "dataset": DATASET,
        "train_n": args.train_n,
        "batch_size": 128,
        "optimizer": "adam",
        "lr": 1e-3,
        "momentum": 0.9,
        "schedule": "constant",
        "seed": 0,
        "epochs": args.epochs,
    }
    schedule = {"warmup": 1, "ramp": args.ramp}
    pgd = {
        "arch": "smallcnn",
        "dataset": DATASET,
        "train_n": 15000,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "seed": 0,
        "objective": "pgd-at",
        "eps": EPS,
        "epochs": 4,
        "objective_options": {"steps": 10, "step_size": 0.025},
    }  # smoothing.py's
    return {
        "natural": base | {"objective": "natural"},
        "ibp": base
        | {"objective": "ibp", "eps": EPS, "objective_options": schedule | {"kappa_final": 0.5}},
        "crown-ibp": base
        | {
            "objective": "crown-ibp",
            "eps": EPS,
            "objective_options": schedule | {"kappa_final": 0.0, "beta_final": 0.0},
        },
        "pgd-at": pgd,
    }


def _measure(row: dict[str, Any], path, key: str, fn) -> Any:
    """``row[key]``, computed by ``fn()`` (value, seconds) and saved unless already there."""
    if key not in row:
        t0 = time.perf_counter()
        row[key] = fn()
        row[f"{key}_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(row, indent=1))
        log(f"  {key}: {row[key]} ({row[f'{key}_s']:.0f} s)")
    return row[key]


def measure(
    name: str,
    model: nn.Module,
    recipe: dict[str, Any],
    x: Tensor,
    y: Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One model's row: accuracies (fractions), verified counts, times (s)."""
    threat = rl.ThreatModel("linf", EPS)
    path = ROWS / f"{name}-{_recipe_key(recipe)}-n{args.n}.json"
    row = json.loads(path.read_text()) if path.exists() else {}
    meta = model.robustlab_meta
    row |= {
        "model": name,
        "arch": recipe["arch"],
        "train_s": meta["train_seconds"],
        "train_threads": meta.get("threads"),
    }
    with torch.no_grad():
        _measure(row, path, "clean", lambda: float((model(x).argmax(1) == y).float().mean()))

    def fast() -> float:  # the per-sample outcome is kept for the checks below
        ev = rl.evaluate(model, x, y, threat, suite="fast")
        row["robust_mask"] = ev.robust.int().tolist()
        return ev.robust_accuracy

    _measure(row, path, "robust", fast)
    robust = torch.tensor(row["robust_mask"], dtype=torch.bool)
    methods = ["ibp"] if recipe["arch"] == "smallcnn" else ["ibp", "crown-ibp"]
    for method in methods:

        def run(method: str = method) -> float:
            ver = verify(model, x, y, threat, method)
            check_below_empirical(ver, robust)  # a sound verifier never beats the attacks
            return ver.accuracy

        _measure(row, path, f"verified_{method}", run)
    if recipe["arch"] != "smallcnn" and args.crown_n:
        k = args.crown_n

        def crown() -> float:
            ver = verify(model, x[:k], y[:k], threat, "crown", batch_size=k)
            check_below_empirical(ver, robust[:k])
            return ver.accuracy

        _measure(row, path, f"verified_crown_first{k}", crown)
        _measure(
            row,
            path,
            f"verified_crown-ibp_first{k}",
            lambda: verify(model, x[:k], y[:k], threat, "crown-ibp").accuracy,
        )
    return row


def markdown(record: dict[str, Any]) -> str:
    args, rows = record["args"], record["rows"]
    k = args["crown_n"]
    nat = next((r["train_s"] for r in rows if r["model"] == "natural"), None)
    lines = [
        "# Certified training: Fashion-MNIST, linf eps 0.1",
        "",
        f"First {args['n']} test images; ibp-small models trained {args['epochs']} epochs on the "
        f"first {args['train_n']} training images (warm-up 1 epoch, eps ramp over "
        f"{args['ramp']} epochs), PGD-AT smallcnn from benchmarks/smoothing.py (4 epochs, 15,000 "
        f"images, 10-step PGD). Accuracies in %; verified <= fast-suite robust checked per point. "
        f"Full CROWN on the first {k} points only (one backward pass per hidden neuron).",
        "",
        f"| model | clean | fast robust | verified IBP | verified CROWN-IBP | CROWN-IBP, first "
        f"{k} | CROWN, first {k} | train s | x natural |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def pct(key: str, r: dict = r) -> str:
            return f"{100 * r[key]:.1f}" if key in r else "-"

        same = r["arch"] == "ibp-small" and nat is not None
        ratio = f"{r['train_s'] / nat:.1f}" if same else "-"
        lines.append(
            f"| {r['model']} ({r['arch']}) | {pct('clean')} | {pct('robust')} | "
            f"{pct('verified_ibp')} | {pct('verified_crown-ibp')} | "
            f"{pct(f'verified_crown-ibp_first{k}')} | {pct(f'verified_crown_first{k}')} "
            f"| {r['train_s']:.0f} | {ratio} |"
        )
    threads = {r["model"]: r["train_threads"] for r in rows}
    lines += ["", f"Training threads per model: {threads} (ratios compare equal threads only)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-n", type=int, default=15000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--ramp", type=float, default=5.0, help="epochs of the eps ramp")
    p.add_argument("--n", type=int, default=500, help="test images")
    p.add_argument("--crown-n", type=int, default=10, help="test images for full CROWN")
    p.add_argument("--models", default="natural,ibp,crown-ibp,pgd-at")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stem", default="certified_training")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ROWS.mkdir(parents=True, exist_ok=True)
    recs = recipes(args)
    x, y = rl.data.load(DATASET, split="test", n=args.n)
    rows = []
    for name in args.models.split(","):
        model = trained_model(f"cert-{name}" if name != "pgd-at" else name, recs[name], log=log)
        log(f"model {name}: measuring")
        rows.append(measure(name, model, recs[name], x, y, args))
    record = {
        "machine": machine_record(),
        "args": vars(args),
        "recipes": recs,
        "rows": [{k: v for k, v in r.items() if k != "robust_mask"} for r in rows],
    }
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
