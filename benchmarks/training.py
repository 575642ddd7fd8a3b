"""The adversarial-training family on one budget: robust accuracy and cost of every objective.

Every registered objective is trained from its shipped recipe (``configs/<name>.toml``:
Fashion-MNIST, smallcnn, linf eps 0.1, the method's options) with the same epochs budget
(``--epochs``; free-at's replays count against it, so it makes ``epochs / replays`` passes) and
the same data, then evaluated on the same test images:

- clean accuracy, PGD-20 and PGD-100 accuracy (one random start, step 2.5 eps / K, CE) on the
  first ``--test-n`` test images (10000 = the full test set);
- an attack suite (``--suite``, ``fast`` by default: APGD-CE + MM-9, within 0.3 points of
  AutoAttack's ``standard`` on our PGD-AT model, see BENCHMARKS.md; ``standard`` for the full
  AutoAttack cascade) on the first ``--suite-n`` test images, with the suite's sanity flags;
- wall time per epoch and its ratio to natural training's, from a timing phase of its own:
  every objective's optimiser steps timed on the same ``--timing-batches`` minibatches,
  interleaved over ``--repeats`` rounds (median), so a slow phase of a shared machine hits
  every objective alike; an epoch = the optimiser steps of one natural pass over ``--train-n``
  images. The whole training run's time (``train s``) is reported as measured.

Objectives that need a teacher (``distillation``, ``rst``) get one trained first from
``configs/distillation_teacher.toml`` / ``configs/rst_teacher.toml`` on the same budget; rst's
labelled part is scaled with ``--train-n`` (the recipe's 30000 of 60000 labelled = half).
Trained runs are kept in ``benchmarks/.cache/training/`` keyed by the settings (an interrupted
run resumes from its last checkpoint; delete the folder to retrain).

Run from the repository root::

    .venv/bin/python benchmarks/training.py                       # the full budget (hours on CPU)
    .venv/bin/python benchmarks/training.py --train-n 15000 --epochs 4 --test-n 2000
    # --train-only trains (or resumes) the runs into the cache and stops

Results: ``benchmarks/results/training.{md,json}`` (``--stem`` names another file, e.g. for a
second run of a few objectives under ``--suite standard``).

The trainer's features (keep_best, EMA, SWA, AWP, augmentation, label smoothing) are compared
with plain PGD-AT, effect and cost, at a budget where robust overfitting can appear, by
``benchmarks/training_features.py`` (results: ``benchmarks/results/training_features.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import robustlab as rl
from robustlab.config import Recipe, load_recipe
from robustlab.training import Trainer
from robustlab.training.trainer import MODEL_FILE, STATE_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import CACHE_DIR, interleaved, machine_record, median, seeded_model, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TEACHERS = {"distillation": "distillation_teacher", "rst": "rst_teacher"}
FULL_TRAIN = 60000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="the budget of every objective")
    p.add_argument("--train-n", type=int, default=FULL_TRAIN, help="first n training images")
    p.add_argument("--test-n", type=int, default=10000, help="PGD-20/100 on the first n")
    p.add_argument("--suite", default="fast", help="attack suite, or 'none'")
    p.add_argument("--suite-n", type=int, default=1000, help="the suite on the first n")
    p.add_argument("--objectives", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--timing-batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--stem", default="training", help="results file name: benchmarks/results/<stem>.{md,json}"
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="train (or resume) the runs into the cache and stop",
    )
    return p.parse_args(argv)


def recipe_for(name: str) -> Recipe:
    return load_recipe(CONFIGS / f"{name.replace('-', '_')}.toml")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prepare(name: str, args: argparse.Namespace, teachers: dict[str, Path]) -> Recipe:
    """The recipe of ``name`` with the benchmark's budget and, where needed, its teacher."""
    recipe = recipe_for(name)
    recipe.train.epochs = args.epochs
    opts = recipe.train.objective_options
    if name in TEACHERS:
        opts["teacher"] = str(teachers[TEACHERS[name]])
    if name == "rst":
        opts["labeled"] = opts["labeled"] * args.train_n // FULL_TRAIN
    if recipe.n_train is not None:  # the rst teacher's labelled part, scaled the same way
        recipe.n_train = recipe.n_train * args.train_n // FULL_TRAIN
    return recipe


def train(
    name: str, recipe: Recipe, data: tuple[Tensor, Tensor], log: Any
) -> tuple[nn.Module, list[dict[str, Any]], float]:
    """Train (or resume, or load) the run of ``recipe`` in the cache; model, history, seconds."""
    key = _key(
        recipe.source,
        recipe.train.epochs,
        recipe.train.objective_options,
        len(data[0]),
        recipe.n_train,
    )
    out = CACHE_DIR / "training" / f"{name}-{key}"
    x, y = data
    if recipe.n_train is not None:
        x, y = x[: recipe.n_train], y[: recipe.n_train]
    done = out / "done.json"
    if done.exists():
        info = json.loads(done.read_text())
        log(f"{name}: cached in {out.relative_to(ROOT)}")
        return rl.models.load(out / MODEL_FILE), info["history"], info["seconds"]
    model = seeded_model(recipe)
    trainer = Trainer(
        model,
        (x, y),
        recipe.train,
        threat=recipe.threat,
        out=out,
        callback=lambda r: log(
            f"{name}: pass {r['epoch']} loss {r['train_loss']:.4f} ({r['train_time_s']:.0f} s)"
        ),
    )
    history = trainer.run(resume=(out / STATE_FILE).exists())
    seconds = sum(r["train_time_s"] for r in history)  # the training loop, set-up excluded
    done.write_text(json.dumps({"history": history, "seconds": seconds}))
    return rl.models.load(out / MODEL_FILE), history, seconds


def time_steps(
    names: list[str],
    recipes: dict[str, Recipe],
    data: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    log: Any,
) -> dict[str, float]:
    """Median seconds per optimiser step of each objective on the same minibatches (one pass of
    the trainer's loop over ``--timing-batches`` batches; set-up such as a teacher's labelling
    is not timed)."""
    batch = recipes["natural"].train.batch_size
    x, y = data[0][: args.timing_batches * batch], data[1][: args.timing_batches * batch]
    per_step: dict[str, list[float]] = {n: [] for n in names}

    def task(name: str):
        def run() -> None:
            recipe = recipes[name]
            cfg = dataclasses.replace(recipe.train, epochs=1, overfit_probe="off")
            if "labeled" in cfg.objective_options:  # rst: half of the timing batches labelled
                cfg.objective_options = cfg.objective_options | {"labeled": len(x) // 2}
            trainer = Trainer(seeded_model(recipe), (x, y), cfg, threat=recipe.threat)
            rec = trainer.run()[0]
            steps = trainer.objective.replays * args.timing_batches
            per_step[name].append(rec["train_time_s"] / steps)

        return run

    tasks = {n: task(n) for n in names}
    for raw in ("natural", "pgd-at"):
        if raw in recipes:
            per_step[f"raw {raw}"] = []
            tasks[f"raw {raw}"] = _raw_task(recipes[raw], x, y, per_step[f"raw {raw}"])
    interleaved(tasks, 1)  # warm-up
    for v in per_step.values():
        v.clear()
    interleaved(
        tasks,
        args.repeats,
        on_done=lambda r, n, s: log(
            f"timing round {r + 1}: {n} {1000 * per_step[n][-1]:.0f} ms/step"
        ),
    )
    return {n: median(v) for n, v in per_step.items()}


def _raw_task(recipe: Recipe, x: Tensor, y: Tensor, times: list[float]):
    """The physical limit: the same optimiser steps as a hand-written PyTorch loop (natural:
    1 forward/backward; PGD-AT: K input-gradient steps in eval mode from a uniform start, then
    1 forward/backward in train mode), nothing else."""
    cfg = recipe.train
    opts = cfg.objective_options
    steps = opts.get("steps", 10) if recipe.train.objective == "pgd-at" else 0
    eps = float(recipe.threat.eps) if recipe.threat else 0.0
    alpha = opts.get("step_size") or 2.5 * eps / max(steps, 1)
    batch = cfg.batch_size

    def run() -> None:
        model = seeded_model(recipe)
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            if steps:
                model.eval()
                delta = (torch.rand_like(xb) * 2 - 1) * eps
                xa = (xb + delta).clamp(0, 1)
                for _ in range(steps):
                    xa.requires_grad_(True)
                    loss = torch.nn.functional.cross_entropy(model(xa), yb)
                    (g,) = torch.autograd.grad(loss, xa)
                    xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), xb - eps), xb + eps)
                    xa = xa.clamp(0, 1)
                xb = xa.detach()
                model.train()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append((time.perf_counter() - t0) / -(-len(x) // batch))

    return run


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    xs: Tensor,
    ys: Tensor,
    suite: str,
    threat: rl.ThreatModel,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for steps in (20, 100):
        res = rl.evaluate(
            model, x, y, threat, attacks=[("pgd", {"steps": steps})], batch_size=500, progress=False
        )
        out["clean"] = res.clean_accuracy
        out[f"pgd{steps}"] = res.robust_accuracy
    if suite != "none":
        t0 = time.perf_counter()
        res = rl.evaluate(model, xs, ys, threat, suite=suite, batch_size=500, progress=False)
        out |= {
            "suite": res.robust_accuracy,
            "suite_clean": res.clean_accuracy,
            "suite_s": time.perf_counter() - t0,
            "flags": sorted({f["name"] for f in res.record.get("flags", [])}),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    names = args.objectives.split(",") if args.objectives else rl.training.objectives()
    names = ["natural"] + [n for n in names if n != "natural"]
    x, y = rl.data.load("fashion-mnist", split="train", n=args.train_n)
    xt, yt = rl.data.load("fashion-mnist", split="test")
    teachers: dict[str, Path] = {}
    teacher_rows: dict[str, dict[str, Any]] = {}
    for name in sorted({TEACHERS[n] for n in names if n in TEACHERS}):
        recipe = prepare(name, args, teachers)
        model, hist, seconds = train(name, recipe, (x, y), log)
        path = CACHE_DIR / "training" / f"{name}.safetensors"
        rl.models.save(model, path)
        teachers[name] = path
        teacher_rows[name] = {"train_s": seconds, "n_train": recipe.n_train or len(x)}
    recipes = {n: prepare(n, args, teachers) for n in names}
    for name in names:  # train (or load) everything before timing, so timing runs alone
        train(name, recipes[name], (x, y), log)
    if args.train_only:
        return {}
    threat = rl.ThreatModel("linf", 0.1)
    log(f"timing {len(names)} objectives, {args.timing_batches} batches x {args.repeats} rounds")
    step_s = time_steps(names, recipes, (x, y), args, log)
    batches = -(-len(x) // recipes["natural"].train.batch_size)
    rows = []
    for name in names:
        model, hist, seconds = train(name, recipes[name], (x, y), log)
        t0 = time.perf_counter()
        ev = evaluate(
            model,
            xt[: args.test_n],
            yt[: args.test_n],
            xt[: args.suite_n],
            yt[: args.suite_n],
            args.suite,
            threat,
        )
        log(
            f"{name}: clean {ev['clean']:.4f} pgd20 {ev['pgd20']:.4f} pgd100 {ev['pgd100']:.4f}"
            f" suite {ev.get('suite', float('nan')):.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        rows.append(
            {
                "objective": name,
                "options": recipes[name].train.objective_options,
                "schedule": recipes[name].train.schedule,
                "passes": len(hist),
                "overfit": [r["epoch"] for r in hist if "overfit" in r],
                "step_s": step_s[name],
                "epoch_s": step_s[name] * batches,
                "x_natural": step_s[name] / step_s["natural"],
                "train_s": seconds,
                **ev,
            }
        )
    raw = {
        n[4:]: {"step_s": t, "epoch_s": t * batches, "x_natural": t / step_s["natural"]}
        for n, t in step_s.items()
        if n.startswith("raw ")
    }
    record = {
        "machine": machine_record(),
        "settings": vars(args),
        "threat": threat.to_dict(),
        "teachers": teacher_rows,
        "rows": rows,
        "raw": raw,
    }
    md, js = write_results(args.stem, render(record), record)
    print(render(record))
    log(f"results: {md.relative_to(ROOT)}, {js.relative_to(ROOT)}")
    return record


def render(rec: dict[str, Any]) -> str:
    s, m = rec["settings"], rec["machine"]
    lines = [
        "# Adversarial training: every objective on one budget",
        "",
        f"Fashion-MNIST, smallcnn, linf eps 0.1; {s['epochs']} epochs of budget on the first "
        f"{s['train_n']} training images; PGD-20 / PGD-100 (1 restart, step 2.5 eps / K) on the "
        f"first {s['test_n']} test images; suite `{s['suite']}` on the first {s['suite_n']}.",
        f"Epoch time: median of {s['repeats']} interleaved rounds of {s['timing_batches']} "
        "minibatches each, scaled to one natural pass; `x natural` is the ratio to natural "
        "training's step. `train s`: the whole run's training loop as measured (no validation).",
        "",
        f"Machine: {m.get('nproc')} cores, {m.get('cpu')}, torch {m.get('torch')}, "
        f"{s['threads']} threads; robustlab {m.get('robustlab_commit')}; {m.get('date')}.",
        f"Command: `{m.get('command')}`",
        "",
        "| objective | passes | clean | PGD-20 | PGD-100 | suite | flags | epoch s | x natural "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        suite = f"{100 * r['suite']:.1f}%" if "suite" in r else "-"
        flags = ", ".join(r.get("flags", [])) or "-"
        if r["overfit"]:
            flags += f" (overfit probe fired after pass {r['overfit']})"
        lines.append(
            f"| {r['objective']} | {r['passes']} | {100 * r['clean']:.1f}% | "
            f"{100 * r['pgd20']:.1f}% | {100 * r['pgd100']:.1f}% | {suite} | {flags} | "
            f"{r['epoch_s']:.1f} | {r['x_natural']:.2f} | {r['train_s']:.0f} |"
        )
    for name, t in rec.get("raw", {}).items():
        lines.append(
            f"| {name} PyTorch loop (timing only) | | | | | | | {t['epoch_s']:.1f} | "
            f"{t['x_natural']:.2f} | |"
        )
    for name, t in rec["teachers"].items():
        lines.append(
            f"\nTeacher `{name}`: natural training on {t['n_train']} images, "
            f"{t['train_s']:.0f} s (not included in its student's row)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
