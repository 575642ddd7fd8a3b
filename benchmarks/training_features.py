"""The trainer's features (issue 23) against plain PGD-AT at a budget where robust overfitting
can appear: each feature's effect on the robust validation curve and on the test accuracy of
the weights it saves, and its cost per epoch as a ratio to plain PGD-AT's.

One run per row, all on the same data, seed and epochs: Fashion-MNIST, smallcnn, linf eps
0.1, PGD-10 adversarial training (step 2.5 eps / 10) on a small training set (the first
``--train-n + --val-n`` training images less ``--val-n`` held out: robust overfitting comes
soonest with little data) for ``--epochs`` epochs with the step decay of Rice et al.
(learning rate x 0.1 at 50 % and 75 % of the epochs). Every run holds out the same
``--val-n`` of these images (``val_split``: a permutation seeded with 0) and checks them with
PGD-10 after every epoch, so every row has a robust validation curve (the curve of the weights
the row saves: the average for EMA and SWA). Rows:

- ``pgd-at``: plain PGD-AT, the last epoch's weights (``model.safetensors``);
- ``+ keep_best``: the same run's ``model_best.safetensors`` (keep_best changes nothing in
  training; its cost is the hold-out check, ``check CPU s`` of every row);
- ``+ EMA``: the exponential moving average with a horizon of ``--ema-epochs`` epochs
  (``ema_decay = 1 - 1 / (ema_epochs x steps per epoch)``; Gowal et al.'s 0.995 at batch 512
  on CIFAR-10 is about 2 epochs);
- ``+ SWA``: the mean of the weights after each epoch from the first decay on (``swa_start``
  = epochs / 2, as Chen et al. start just after the first decay), BatchNorm recomputed;
- ``+ AWP``: gamma 1e-2, no warm-up (Wu et al.'s PGD-AT-AWP);
- ``+ augment``: random crop with 4 pixels of padding, no flip (a mirrored Fashion-MNIST
  item is not one of the data set);
- ``+ label smoothing``: 0.1;
- ``AWP + EMA + keep_best``: the three together, ``model_best.safetensors``.

For each row: the hold-out's robust accuracy after every epoch, its best epoch and value, the
last epoch's value (the overfitting gap = best - last, in points), clean and PGD-20 accuracy
(one random start, step 2.5 eps / 20) of the row's saved weights on the first ``--test-n``
test images, and the CPU seconds (``time.process_time``, one thread: robust to the other
processes of a shared machine) per epoch of training (the median over epochs) and of the
hold-out check, with the ratio of the training to plain PGD-AT's (``x plain``; keep_best's
ratio counts the check too).

Each run trains in ``benchmarks/.cache/training_features/<row>-<key>/`` (the key hashes the
settings) and resumes there if killed; a finished run's test accuracies are kept in
``test-<weights>-<n>.json`` beside it.

Run from the repository root::

    .venv/bin/python benchmarks/training_features.py --threads 1
    .venv/bin/python benchmarks/training_features.py --epochs 2 --train-n 256 --val-n 64 \\
        --test-n 100 --stem training_features_smoke          # a smoke run (a minute)
    # --runs plain,ema trains only those runs (several processes can train disjoint runs at
    # once, each with its own --stem); a last call without --runs collects every run

Results: ``benchmarks/results/training_features.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import robustlab as rl
from robustlab.training import TrainConfig, Trainer
from robustlab.training.trainer import BEST_FILE, MODEL_FILE, STATE_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import CACHE_DIR, machine_record, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THREAT = rl.ThreatModel("linf", 0.1)
DATASET = "fashion-mnist"
# row name -> (run name, weights file): two rows read the plain run
ROWS = {
    "pgd-at": ("plain", MODEL_FILE),
    "+ keep_best": ("plain", BEST_FILE),
    "+ EMA": ("ema", MODEL_FILE),
    "+ SWA": ("swa", MODEL_FILE),
    "+ AWP": ("awp", MODEL_FILE),
    "+ augment": ("augment", MODEL_FILE),
    "+ label smoothing": ("smoothing", MODEL_FILE),
    "AWP + EMA + keep_best": ("combo", BEST_FILE),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--train-n", type=int, default=500, help="training images")
    p.add_argument("--val-n", type=int, default=400, help="held-out training images")
    p.add_argument("--test-n", type=int, default=1000, help="clean / PGD-20 on the first n")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ema-epochs", type=float, default=2.0, help="EMA horizon in epochs")
    p.add_argument("--runs", default=None, help="comma-separated runs (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stem", default="training_features")
    return p.parse_args(argv)


def ema_decay_for(epochs: float, train_n: int, batch_size: int) -> float:
    """The EMA decay whose horizon ``1 / (1 - decay)`` is ``epochs`` epochs of optimiser
    steps (``ceil(train_n / batch_size)`` per epoch)."""
    steps = -(-train_n // batch_size)
    return 1.0 - 1.0 / (epochs * steps)


def run_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each run's :class:`TrainConfig` keywords beyond the shared ones."""
    ema = {
        "average": "ema",
        "ema_decay": ema_decay_for(args.ema_epochs, args.train_n, args.batch_size),
    }
    awp = {"awp": True, "awp_gamma": 1e-2, "awp_warmup": 0}
    return {
        "plain": {"keep_best": True},
        "ema": ema,
        "swa": {"average": "swa", "swa_start": args.epochs // 2},
        "awp": awp,
        "augment": {"augment": True, "crop_pad": 4},
        "smoothing": {"label_smoothing": 0.1},
        "combo": awp | ema | {"keep_best": True},
    }


def config_for(args: argparse.Namespace, extra: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        objective="pgd-at",
        objective_options={"steps": 10, "step_size": 0.025},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule="piecewise",  # x 0.1 at 50 % and 75 % of the epochs (Rice et al.)
        dataset=DATASET,
        val_split=args.val_n,
        val_every=1,
        val_attack={"name": "pgd", "steps": 10},
        overfit_probe="off",
        **extra,
    )


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cpu_times(path: Path) -> dict[int, dict[str, float]]:
    """Per-epoch CPU seconds recorded in ``path`` (JSON lines; the last line of an epoch wins)."""
    out: dict[int, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["epoch"]] = rec
    return out


def train_run(
    name: str, cfg: TrainConfig, data: tuple[torch.Tensor, torch.Tensor], log: Any
) -> tuple[Path, list[dict[str, Any]], dict[int, dict[str, float]]]:
    """Train (or resume, or find finished) run ``name`` of ``cfg`` in the cache; its folder,
    history and per-epoch CPU seconds (``cpu_s``: the epoch from the end of the last one's
    callback, hold-out check included; ``val_cpu_s``: the check alone)."""
    key = _key(vars(cfg), len(data[0]), "init seeded")
    out = CACHE_DIR / "training_features" / f"{name}-{key}"
    done, cpu_file = out / "done.json", out / "cpu.jsonl"
    if done.exists():
        log(f"{name}: trained, in {out.relative_to(ROOT)}")
        return out, json.loads(done.read_text())["history"], cpu_times(cpu_file)
    with torch.random.fork_rng():  # the same initial weights in every run (cfg.seed)
        torch.manual_seed(cfg.seed)
        model = rl.models.create("smallcnn", activation="relu")
    clock = {"t": 0.0, "val": 0.0}

    def tick(rec: dict[str, Any]) -> None:
        now = time.process_time()
        line = {"epoch": rec["epoch"], "cpu_s": now - clock["t"], "val_cpu_s": clock["val"]}
        with cpu_file.open("a") as f:
            f.write(json.dumps(line) + "\n")
        clock["t"], clock["val"] = now, 0.0
        log(
            f"{name}: epoch {rec['epoch']} loss {rec['train_loss']:.4f} hold-out robust "
            f"{rec.get('holdout_robust_acc', float('nan')):.3f} ({line['cpu_s']:.1f} CPU s)"
        )

    trainer = Trainer(model, data, cfg, threat=THREAT, out=out, callback=tick)
    check = trainer.features.validate

    def timed_check(*a: Any, **k: Any) -> None:  # the hold-out check's CPU seconds
        t0 = time.process_time()
        check(*a, **k)
        clock["val"] += time.process_time() - t0

    trainer.features.validate = timed_check  # type: ignore[method-assign]
    clock["t"] = time.process_time()
    history = trainer.run(resume=(out / STATE_FILE).exists())
    done.write_text(json.dumps({"history": history}))
    return out, history, cpu_times(cpu_file)


def accuracy_on_test(path: Path, xt: torch.Tensor, yt: torch.Tensor) -> dict[str, float]:
    """Clean and PGD-20 accuracy of the weights in ``path`` on ``(xt, yt)``."""
    model = rl.models.load(path)
    res = rl.evaluate(
        model, xt, yt, THREAT, attacks=[("pgd", {"steps": 20})], batch_size=500, progress=False
    )
    return {"test_clean": res.clean_accuracy, "test_pgd20": res.robust_accuracy}


def curve_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The hold-out robust accuracy of every epoch, its best (earliest of equals) and last
    value and the gap between them in points."""
    curve = [r["holdout_robust_acc"] for r in history]
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))
    return {
        "curve": curve,
        "clean_curve": [r["holdout_clean_acc"] for r in history],
        "best_epoch": best + 1,
        "best_val": curve[best],
        "final_val": curve[-1],
        "gap_points": 100 * (curve[best] - curve[-1]),
    }


def cost(cpu: dict[int, dict[str, float]], history: list[dict[str, Any]]) -> dict[str, float]:
    """Median CPU seconds per epoch of training (the check taken out) and of the hold-out
    check, and the median wall seconds the trainer recorded for both."""
    epochs = sorted(cpu)
    return {
        "train_cpu_s": statistics.median(cpu[e]["cpu_s"] - cpu[e]["val_cpu_s"] for e in epochs),
        "val_cpu_s": statistics.median(cpu[e]["val_cpu_s"] for e in epochs),
        "train_wall_s": statistics.median(r["train_time_s"] for r in history),
        "val_wall_s": statistics.median(r["val_time_s"] for r in history),
        "cpu_epochs": len(epochs),
    }


def evaluated(out: Path, weights: str, xt: torch.Tensor, yt: torch.Tensor) -> dict[str, float]:
    """:func:`accuracy_on_test` of ``out/weights``, kept in ``out/test-<weights>.json``."""
    kept = out / f"test-{Path(weights).stem}-{len(xt)}.json"
    if not kept.exists():
        kept.write_text(json.dumps(accuracy_on_test(out / weights, xt, yt)))
    return json.loads(kept.read_text())


def make_rows(
    runs: dict[str, tuple[Path, list[dict[str, Any]], dict[int, dict[str, float]]]],
    settings: dict[str, dict[str, Any]],
    test: tuple[torch.Tensor, torch.Tensor],
) -> list[dict[str, Any]]:
    """One record per row of :data:`ROWS` whose run was trained."""
    rows = []
    for row, (name, weights) in ROWS.items():
        if name not in runs:
            continue
        out, history, cpu = runs[name]
        rec = {"row": row, "run": name, "weights": weights, "settings": settings[name]}
        rec |= curve_summary(history) | cost(cpu, history) | evaluated(out, weights, *test)
        if weights == BEST_FILE:  # the epoch keep_best chose, as the trainer recorded it
            rec["chosen_epoch"] = history[-1]["best_epoch"]
        rows.append(rec)
    plain = next((r for r in rows if r["run"] == "plain"), None)
    for rec in rows:
        if plain is None:
            rec["x_plain"] = None
            continue
        spent = rec["train_cpu_s"] + (rec["val_cpu_s"] if rec["weights"] == BEST_FILE else 0)
        rec["x_plain"] = spent / plain["train_cpu_s"]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    settings = run_settings(args)
    names = args.runs.split(",") if args.runs else list(settings)
    if unknown := [n for n in names if n not in settings]:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {', '.join(settings)}")
    data = rl.data.load(DATASET, split="train", n=args.train_n + args.val_n)
    xt, yt = rl.data.load(DATASET, split="test", n=args.test_n)
    runs = {n: train_run(n, config_for(args, settings[n]), data, log) for n in names}
    record = {
        "machine": machine_record(),
        "settings": vars(args),
        "threat": THREAT.to_dict(),
        "rows": make_rows(runs, settings, (xt, yt)),
    }
    md, js = write_results(args.stem, render(record), record)
    print(render(record))
    log(f"results: {md.relative_to(ROOT)}, {js.relative_to(ROOT)}")
    return record


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def verdict(rows: list[dict[str, Any]], val_n: int) -> str:
    """Whether plain PGD-AT's hold-out robust accuracy fell after its best epoch, and by how
    much next to the hold-out's sampling noise and to keep_best's test gain."""
    plain = next((r for r in rows if r["row"] == "pgd-at"), None)
    if plain is None:
        return "Plain PGD-AT was not run: no verdict on robust overfitting."
    p = plain["best_val"]
    noise = 100 * (2 * p * (1 - p) / val_n) ** 0.5  # std of the difference of two checks
    gap = plain["gap_points"]
    seen = gap > 2 * noise
    text = (
        f"Plain PGD-AT's hold-out robust accuracy peaked at epoch {plain['best_epoch']} "
        f"({_pct(p)}) and ended at {_pct(plain['final_val'])}: a gap of {gap:.1f} points, "
        f"against a sampling noise of at most about {noise:.1f} points (one standard "
        f"deviation of the difference of two independent samples of {val_n} images; checks "
        "of the same images vary less). Robust overfitting "
        + ("appeared" if seen else "did not clearly appear (the gap is under two noise s.d.)")
        + " at this budget."
    )
    best = next((r for r in rows if r["row"] == "+ keep_best"), None)
    if best is not None:
        text += (
            f" On the test images, keep_best's weights (epoch {best['chosen_epoch']}) reach "
            f"{_pct(best['test_pgd20'])} PGD-20 against the last epoch's "
            f"{_pct(plain['test_pgd20'])} ({100 * (best['test_pgd20'] - plain['test_pgd20']):+.1f}"
            " points)."
        )
    return text


def render(rec: dict[str, Any]) -> str:
    s, m, rows = rec["settings"], rec["machine"], rec["rows"]
    e = s["epochs"]
    lines = [
        "# Trainer features against plain PGD-AT at a budget that can overfit",
        "",
        f"Fashion-MNIST, smallcnn, linf eps 0.1, PGD-10 AT (step 0.025) on {s['train_n']} "
        f"training images for {e} epochs (batch {s['batch_size']}, SGD lr {s['lr']}, x 0.1 "
        f"after epochs {e // 2} and {3 * e // 4}); hold-out: {s['val_n']} more training "
        "images, PGD-10 after every epoch (of the weights the row saves). Test: clean and "
        f"PGD-20 (1 start, step 2.5 eps / 20) on the first {s['test_n']} test images. Cost: "
        "median CPU seconds (`time.process_time`) per epoch; `x plain` = training CPU over "
        "plain PGD-AT's (keep_best: the hold-out check counted too).",
        "",
        f"Machine: {m.get('nproc')} cores, {m.get('cpu')}, torch {m.get('torch')}, "
        f"{s['threads']} thread(s); robustlab {m.get('robustlab_commit')}; {m.get('date')}.",
        f"Command: `{m.get('command')}`",
        "",
        "| row | weights | best epoch | best hold-out PGD-10 | last | gap (points) "
        "| test clean | test PGD-20 | train CPU s / epoch | x plain | check CPU s / epoch "
        "| train wall s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        weights = r["weights"] + (f" (epoch {r['chosen_epoch']})" if "chosen_epoch" in r else "")
        ratio = "-" if r["x_plain"] is None else f"{r['x_plain']:.2f}"
        lines.append(
            f"| {r['row']} | {weights} | {r['best_epoch']} | {_pct(r['best_val'])} | "
            f"{_pct(r['final_val'])} | {r['gap_points']:.1f} | {_pct(r['test_clean'])} | "
            f"{_pct(r['test_pgd20'])} | {r['train_cpu_s']:.1f} | {ratio} | "
            f"{r['val_cpu_s']:.1f} | {r['train_wall_s']:.1f} |"
        )
    lines += ["", verdict(rows, s["val_n"]), "", "Hold-out PGD-10 accuracy (%) after each epoch:"]
    lines += ["", "```"]
    width = max(len(r["run"]) for r in rows) if rows else 0
    for r in rows:
        if r["weights"] == MODEL_FILE or r["run"] == "combo":
            lines.append(f"{r['run']:<{width}}  " + " ".join(f"{100 * v:.0f}" for v in r["curve"]))
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
