"""The Fashion-MNIST leaderboard (issue 24): every training recipe at one stated budget per row,
evaluated the same way, resumable row by row; and the pretrained zoo exported from it.

Each row (``--list`` prints them) is a recipe of ``configs/`` plus overrides, smallcnn unless
the row says otherwise, trained on the first ``train_n`` Fashion-MNIST training images (all
60,000 by default) minus a fixed hold-out of ``val_split`` of them (the trainer's
``val_split``: a permutation seeded with 0, the same for every row and seed), validated after
every pass with the recipe's ``[val_attack]`` (PGD-20 in most recipes, PGD-10 in natural's;
the board's curve names it: the validation curve; ``keep_best`` keeps ``model_best``). A row
evaluates its final weights, or the best hold-out epoch's where it says ``checkpoint best``
(rows that differ only in that share one training run). Every row is evaluated the same way
at linf eps 0.1: clean and ``standard``-suite robust accuracy on the first ``--standard-n``
test images (1000), ``fast``-suite robust accuracy on the first ``--fast-n`` (10,000), with
the suites' flags and the wall times. Smoothing and noise-injection rows are evaluated as
their smoothed (majority-vote) classifier with the suite meant for it (``smoothed`` / ``rand``)
and have no ``fast`` column; IBP rows add their IBP-verified accuracy.

Budgets (``--budget``): ``converged`` = each row's stated epochs (long enough, we expect, for
the validation curve to flatten: the table shows the curve, check it); ``short`` = 2 passes over
the data per row (a first look, not converged); ``smoke`` = 1 pass on 512 images, inner attacks
capped at 2 steps, a few test points (for tests). A preset's epochs (and ``--epochs``) count
passes over the data: a row whose objective replays each minibatch m times (free-at) trains m
times as many of the trainer's epochs, which are passes' worth of optimiser steps
(:class:`~robustlab.training.TrainConfig`). ``--epochs``, ``--train-n``, ``--standard-n`` and
``--fast-n`` override the preset and are recorded. ``--seeds 2`` trains a second seed of the
five best rows (by ``standard`` robust accuracy) and reports the spread; ``--seed 1`` runs the
rows of ``--rows`` at seed 1 (one row's second seed at a time).

Resumable: each training run lives in ``<cache>/runs/<recipe>-<key>/`` (the key hashes
everything that defines the run), a killed run resumes from its last checkpoint, a killed
evaluation from its state, and a finished row (``<cache>/rows/<row>-s<seed>-<budget key>.json``)
is never redone. The cache is not in the repository: a fresh clone (or another machine) takes
the finished rows of this budget back from the board records in ``benchmarks/results/`` and
renders the HTML board from the archived copies of the rows' run folders (their report inputs,
no weights) in ``benchmarks/results/leaderboard_runs/``. A run too long for one machine's
session is carried to the next with ``--park`` (the ``--rows``' unfinished runs, checkpoints
and evaluation states included, copied to ``benchmarks/results/leaderboard_parked/``): once
committed, a machine without the cache resumes them from there, and a finished row drops its
parked copy. Each training pass records its thread count and CPU, and the board's ``where``
cell names them where they differ from the evaluation's. Nothing is committed. Results:
``benchmarks/results/<stem>.{md,json}`` and ``<stem>.html`` (``robustlab report`` on the rows'
run folders); the Markdown holds the table of every finished row of this budget and the seeds'
claims beside our figures.

    .venv/bin/python benchmarks/leaderboard.py --budget converged --threads 2   # all rows
    .venv/bin/python benchmarks/leaderboard.py --rows natural,pgd-at --budget short \\
        --fast-n 2000 --threads 1 --export-zoo
    .venv/bin/python benchmarks/leaderboard.py --rows mart --budget converged --park  # then commit
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import robustlab as rl
from robustlab import cli_inputs
from robustlab._provenance import versions
from robustlab.cli import main as rl_main
from robustlab.config import Recipe, load_recipe
from robustlab.defenses.verify import check_below_empirical, verify
from robustlab.training import TrainConfig, Trainer
from robustlab.training.objectives import get as get_objective
from robustlab.training.trainer import BEST_FILE, MODEL_FILE, STATE_FILE, TB_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import CACHE_DIR, RESULTS_DIR, machine_record, seeded_model, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ZOO_DIR = ROOT / "src" / "robustlab" / "zoo"
FULL_TRAIN = 60000
THREAT = rl.ThreatModel("linf", 0.1)
DATASET = "fashion-mnist"
PREFIX_N = 100  # the card's robust accuracy on the first points, for the zoo's re-evaluation test
TOP_SEEDED = 5  # rows that get a second seed with --seeds 2
THREADS_FILE = "threads.jsonl"  # each training pass's torch thread count, in its run folder
CPU = versions()["cpu"]  # this machine's, in the where cell and each pass's line
ARCHIVE = "leaderboard_runs"  # <results>/leaderboard_runs/<run>/: the rows' report inputs
PARKED = "leaderboard_parked"  # <results>/leaderboard_parked/<run>/: unfinished runs (--park)
DONE_FILE = "done.json"  # a trained run's record (history, seconds), in its run folder
REPORT_FILES = {"model.json", "recipe.json", "train_log.jsonl", "results.json",
                "examples.safetensors"}  # fmt: skip
Log = Callable[[str], None]


@dataclass(frozen=True)
class Row:
    """One leaderboard row: ``configs/<config>.toml`` with overrides, trained ``epochs`` (the
    converged budget, in the trainer's epochs: free-at's replays count), evaluated as said."""

    name: str
    config: str
    epochs: int
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    objective: dict[str, Any] = field(default_factory=dict)  # objective options
    model: dict[str, Any] = field(default_factory=dict)  # models.create options (arch, ...)
    n_train: int | None = None  # labelled images of FULL_TRAIN (None: the recipe's)
    checkpoint: str = "final"  # or "best": model_best.safetensors of the same run
    smoothing: float | None = None  # evaluate defenses.create("smoothing", sigma=...)
    suites: tuple[str, str | None] = ("standard", "fast")
    verify: str | None = None  # bound-propagation method for a verified-accuracy column
    teacher: str | None = None  # a run of configs/<teacher>.toml trained first
    init_from: str | None = None  # fine-tune the final weights of this row's run
    note: str = ""


SEMI: dict[str, Any] = {"teacher": "rst_teacher"}
ROWS = [
    Row("natural", "natural", 20, note="the reference"),
    Row("fgsm-at", "fgsm_at", 20, note="overfitting probe on (auto: stop)"),
    Row("fast-at", "fast_at", 20),
    Row("free-at", "free_at", 40, note="m = 8 (the slides'); converged: 5 passes"),
    Row("pgd-at", "pgd_at", 30),
    Row("trades-b1", "trades", 30, objective={"beta": 1.0}),
    Row("trades-b6", "trades", 30, objective={"beta": 6.0}),
    Row("mart", "mart", 30),
    Row("alp", "alp", 30),
    Row("dynamic-at", "dynamic_at", 30),
    Row("curriculum", "curriculum", 30),
    Row("mma", "mma", 30),
    Row("yopo", "yopo", 30),
    Row("rst", "rst", 30, **SEMI, note="30,000 labelled + 30,000 pseudo-labelled"),
    Row("uat", "uat", 30, **SEMI, note="30,000 labelled + a pool of 30,000"),
    Row("mart-semi", "mart_semi", 30, **SEMI, note="30,000 labelled + a pool of 30,000"),
    Row(
        "mart-semi-full",
        "mart_semi",
        30,
        **SEMI,
        objective={"term": "full"},
        note="the whole MART loss on the pool, at the pseudo-labels (RST's way)",
    ),
    Row("noisy-student", "noisy_student", 30, **SEMI),
    Row("trades-b6-30k", "trades", 30, n_train=30000, note="rst's labelled part only"),
    Row("pgd-at-30k", "pgd_at", 30, n_train=30000, note="uat's labelled part only"),
    Row("pgd-at-best", "pgd_at", 30, checkpoint="best", note="best hold-out epoch"),
    Row("pgd-at-ema", "pgd_at", 30, train={"average": "ema"}),
    Row("pgd-at-awp", "pgd_at", 30, train={"awp": True, "awp_gamma": 0.01, "awp_warmup": 0}),
    Row("trades-best", "trades", 30, objective={"beta": 6.0}, checkpoint="best"),
    Row("trades-ema", "trades", 30, objective={"beta": 6.0}, train={"average": "ema"}),
    Row(
        "trades-awp",
        "trades",
        30,
        objective={"beta": 6.0},
        train={"awp": True, "awp_warmup": 0},
        note="TRADES-AWP's gamma 5e-3; no warm-up (the reference's is 10 of 200 epochs)",
    ),
    Row("pgd-at-softplus", "pgd_at", 30, model={"activation": "softplus"}),
    Row("pgd-at-silu", "pgd_at", 30, model={"activation": "silu"}),
    Row("pgd-at-resnet20", "pgd_at", 30, model={"arch": "resnet20"}),
    Row("pgd-at-preact-resnet18", "pgd_at", 30, model={"arch": "preact-resnet18"}),
    Row("ibp", "ibp", 60, verify="ibp", note="ibp-small"),
    Row("crown-ibp", "crown_ibp", 60, verify="crown-ibp", note="ibp-small"),
    Row("gaussian-aug", "gaussian_aug", 20, smoothing=0.25, suites=("smoothed", None)),
    Row("smoothadv", "smoothadv", 20, smoothing=0.25, suites=("smoothed", None)),
    Row("pni", "pni", 30, suites=("rand", None), note="its own weight noise, majority of 10"),
    Row("cni", "cni", 10, init_from="pgd-at", smoothing=0.15, suites=("smoothed", None)),
]
ROW = {r.name: r for r in ROWS}
PRESETS: dict[str, dict[str, Any]] = {
    "converged": {"epochs": None, "train_n": FULL_TRAIN, "val_split": 1000, "max_steps": None,
                  "standard_n": 1000, "fast_n": 10000},
    "short": {"epochs": 2, "train_n": FULL_TRAIN, "val_split": 1000, "max_steps": None,
              "standard_n": 1000, "fast_n": 10000},
    "smoke": {"epochs": 1, "train_n": 512, "val_split": 128, "max_steps": 2,
              "standard_n": 16, "fast_n": 32},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all; --list)")
    p.add_argument("--budget", choices=sorted(PRESETS), default="converged")
    p.add_argument("--epochs", type=int, default=None, help="every row's epochs (overrides)")
    p.add_argument("--train-n", type=int, default=None, help="first n training images")
    p.add_argument("--standard-n", type=int, default=None, help="standard suite on the first n")
    p.add_argument("--fast-n", type=int, default=None, help="fast suite on the first n")
    p.add_argument("--seeds", type=int, choices=(1, 2), default=1,
                   help="2: also seed 1 of the five best rows, with the spread")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the seed of the --rows runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=CACHE_DIR / "leaderboard")
    p.add_argument("--stem", default="leaderboard", help="results/<stem>.{md,json,html}")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--export-zoo", action="store_true", help="write the rows' models to the zoo")
    p.add_argument("--zoo-dir", type=Path, default=ZOO_DIR)
    p.add_argument("--list", action="store_true", help="print the rows and their budgets")
    p.add_argument("--park", action="store_true",
                   help="copy the --rows' unfinished runs to results/leaderboard_parked/ "
                        "(commit them to resume on another machine) and stop")  # fmt: skip
    return p.parse_args(argv)


def budget_of(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with the command line's overrides, as recorded."""
    b = dict(PRESETS[args.budget], preset=args.budget)
    for k in ("epochs", "train_n", "standard_n", "fast_n"):
        if getattr(args, k) is not None:
            b[k] = getattr(args, k)
    return b


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def budget_key(b: dict[str, Any]) -> str:
    return _key({k: b[k] for k in ("epochs", "train_n", "val_split", "max_steps")},
                b["standard_n"], b["fast_n"])  # fmt: skip


# --- training ---------------------------------------------------------------------------------
def _cap_steps(opts: dict[str, Any], cap: int) -> None:
    for k in ("steps", "max_steps", "outer"):
        if isinstance(opts.get(k), int):
            opts[k] = min(opts[k], cap)
    if isinstance(opts.get("base_options"), dict):
        _cap_steps(opts["base_options"], cap)


def _inner_steps(opts: dict[str, Any]) -> dict[str, Any]:
    """The objective's inner-attack lengths, its base objective's among them (rst's TRADES)."""
    steps = {k: v for k, v in opts.items() if k in ("steps", "max_steps", "outer", "inner",
                                                    "replays")}  # fmt: skip
    if isinstance(opts.get("base_options"), dict):
        steps |= {f"base {k}": v for k, v in _inner_steps(opts["base_options"]).items()}
    return steps


def prepare(row: Row, b: dict[str, Any], seed: int, deps: dict[str, Path]) -> Recipe:
    """The recipe of ``row`` at budget ``b`` and ``seed``; ``deps``: the files of the runs it
    needs (its teacher, the run it fine-tunes)."""
    recipe = load_recipe(CONFIGS / f"{row.config}.toml")
    cfg = recipe.train
    for k, v in row.train.items():
        setattr(cfg, k, v)
    cfg.objective_options.update(row.objective)
    cfg.epochs = b["epochs"] * replays(cfg) if b["epochs"] else row.epochs
    if b["max_steps"]:
        _cap_steps(cfg.objective_options, b["max_steps"])
    cfg.val_split, cfg.val_every, cfg.keep_best, cfg.seed = b["val_split"], 1, True, seed
    recipe.model.update(row.model)
    scale = b["train_n"] / FULL_TRAIN
    n_train = row.n_train or recipe.n_train
    recipe.n_train = None if n_train is None else round(n_train * scale)
    if recipe.unlabeled_n is not None:
        recipe.unlabeled_n = round(recipe.unlabeled_n * scale)
    if row.teacher:
        cfg.objective_options["teacher"] = str(deps[row.teacher])
    if row.init_from:
        cfg.init = str(deps[row.init_from])
    if "labeled" in cfg.objective_options:
        cfg.objective_options["labeled"] = round(cfg.objective_options["labeled"] * scale)
    cfg.validate(recipe.threat)
    return recipe


def replays(cfg: TrainConfig) -> int:
    """Optimiser steps per minibatch of ``cfg``'s objective (free-at's m; 1 for the others)."""
    default = inspect.signature(get_objective(cfg.objective)).parameters.get("replays")
    return int(cfg.objective_options.get("replays", 1 if default is None else default.default))


def run_dir(cache: Path, row: Row, recipe: Recipe, b: dict[str, Any]) -> Path:
    """The run folder: the recipe's file name and a hash of everything that defines the run."""
    cfg = dataclasses.asdict(recipe.train)
    key = _key(row.config, cfg, recipe.model, recipe.n_train, recipe.unlabeled_n, b["train_n"])
    return cache / "runs" / f"{row.config}-{key}"


def train(
    name: str, recipe: Recipe, out: Path, data: tuple[Tensor, Tensor], log: Log
) -> dict[str, Any]:
    """Train (or resume, or find finished) the run in ``out``; its done record (history,
    seconds of the training loop)."""
    done = out / DONE_FILE
    if done.exists():
        log(f"{name}: trained, in {out}")
        return json.loads(done.read_text())
    x, y = data
    if recipe.n_train is not None:
        x, y = x[: recipe.n_train], y[: recipe.n_train]
    cfg = recipe.train
    if recipe.unlabeled is not None:
        cfg.objective_options["unlabeled"] = cli_inputs.unlabeled_pool(
            recipe.unlabeled, recipe.unlabeled_n, recipe.dataset, recipe.n_train
        )
    model = seeded_model(recipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.source, indent=2, default=str) + "\n")
    resume = (out / STATE_FILE).exists()
    log(f"{name}: {'resuming' if resume else 'training'} {len(x)} images -> {out}")
    threads = out / THREADS_FILE

    def line(r: dict[str, Any]) -> None:
        with threads.open("a") as f:  # a resumed run's passes may run on other threads
            pass_ = {"epoch": r["epoch"], "threads": torch.get_num_threads(), "cpu": CPU}
            f.write(json.dumps(pass_) + "\n")
        held = r.get("holdout_robust_acc", r.get("holdout_clean_acc"))
        log(
            f"{name}: pass {r['epoch']} loss {r['train_loss']:.4f} hold-out "
            f"{'-' if held is None else f'{100 * held:.1f}%'} ({r['train_time_s']:.0f} s)"
        )

    trainer = Trainer(model, (x, y), cfg, threat=recipe.threat, out=out, callback=line)
    history = trainer.run(resume=resume)
    cfg.objective_options.pop("unlabeled", None)
    held = trainer.features.holdout
    holdout_n = 0 if held is None else len(held[0])
    ran_on: dict[int, dict[str, Any]] = {}  # a pass's last line wins: the history kept that one
    if threads.exists():
        lines = filter(None, threads.read_text().splitlines())
        ran_on = {r["epoch"]: r for r in map(json.loads, lines)}
    rec = {
        "history": history,
        "threads": [ran_on.get(r["epoch"], {}).get("threads") for r in history],
        "cpus": [ran_on.get(r["epoch"], {}).get("cpu") for r in history],
        "seconds": sum(r["train_time_s"] for r in history),
        "n_train": len(x) - holdout_n,
        "holdout_n": holdout_n,
    }
    done.write_text(json.dumps(rec) + "\n")
    return rec


# --- evaluation -------------------------------------------------------------------------------
def _per_sample(folder: Path) -> list[bool]:
    rows = [json.loads(s) for s in (folder / "per_sample.jsonl").read_text().splitlines() if s]
    return [bool(r["robust"]) for r in rows]


def randomness(record: dict[str, Any]) -> dict[str, Any]:
    """Of an evaluation's ``results.json`` on a randomised model (predictions judged by a
    majority of ``repeats`` > 1): ``repeats`` and the standard errors of its accuracies over
    the model's randomness; nothing for a deterministic model."""
    if (record.get("repeats") or 1) <= 1:
        return {}
    keys = ("repeats", "clean_accuracy_se", "robust_accuracy_se")
    return {k: record[k] for k in keys if k in record}


def evaluate_suite(
    model: nn.Module, suite: str, n: int, folder: Path, config: dict[str, Any], log: Log
) -> dict[str, Any]:
    """``suite`` on the first ``n`` test images, saved in ``folder`` (resumed from its state;
    read back if finished); the summary the row records."""
    xt, yt = rl.data.load(DATASET, split="test", n=n)
    wall = None  # read back: the run's wall time was not kept
    if (folder / "results.json").exists():
        record = json.loads((folder / "results.json").read_text())
        robust = _per_sample(folder)
    else:
        log(f"{config['name']}: {suite} suite on {len(xt)} test images -> {folder}")
        t0 = time.perf_counter()
        res = rl.evaluate(
            model, xt, yt, THREAT, suite=suite, batch_size=500, seed=0, out=folder, config=config
        )
        wall = time.perf_counter() - t0
        record, robust = res.record, [bool(v) for v in res.robust.tolist()]
    k = min(PREFIX_N, len(robust))
    keep = ("clean_accuracy", "robust_accuracy", "threat", "n", "suite", "per_attack", "flags")
    return {
        "suite": suite,
        "n": record["n"],
        "clean_accuracy": record["clean_accuracy"],
        "robust_accuracy": record["robust_accuracy"],
        **randomness(record),
        "flags": sorted({f["name"] for f in record.get("flags", [])}),
        "seconds": sum(a.get("time_s", a.get("seconds", 0.0)) or 0.0 for a in record["per_attack"]),
        "prefix": {
            "n": k,
            "robust_accuracy": sum(robust[:k]) / max(k, 1),
            "robust": [int(v) for v in robust[:k]],
        },
        "folder": str(folder),
        "record": {key: record[key] for key in keep if key in record},
        "wall_s": wall,
    }


def same_weights(a: Path, b: Path) -> bool:
    """Whether the safetensors checkpoints ``a`` and ``b`` hold the same tensors (their
    metadata may differ)."""
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def evaluate_row(row: Row, run: Path, seed: int, b: dict[str, Any], log: Log) -> dict[str, Any]:
    """Evaluate ``row``'s checkpoint of ``run``. A ``checkpoint best`` row whose best epoch is
    the last one holds the final weights: it takes the final weights' evaluation folders (read
    back where the row evaluating them finished) instead of attacking the same model again."""
    ckpt = run / (BEST_FILE if row.checkpoint == "best" else MODEL_FILE)
    shared = row.checkpoint == "best" and same_weights(ckpt, run / MODEL_FILE)
    model = rl.models.load(ckpt)
    arch = model.robustlab_arch["name"]
    evaluated: nn.Module = model
    if row.smoothing is not None:
        evaluated = rl.defenses.create("smoothing", model, sigma=row.smoothing)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "epoch": model.robustlab_meta.get("epoch")}
    out["architecture"] = model.robustlab_arch
    if row.checkpoint == "best":
        out["same_as_final"] = shared
    folders: dict[str, Path] = {}
    for column, suite, n in (("standard", row.suites[0], b["standard_n"]),
                             ("fast", row.suites[1], b["fast_n"])):  # fmt: skip
        if suite is None:
            continue
        which = "final" if shared else row.checkpoint
        tag = f"eval-{which}{'' if row.smoothing is None else f'-smooth{row.smoothing}'}"
        config = {"name": f"{row.name} (seed {seed})", "checkpoint": str(ckpt),
                  "dataset": DATASET, "architecture": arch, "defense": (
                      None if row.smoothing is None else {"name": "smoothing",
                                                          "sigma": row.smoothing})}  # fmt: skip
        folders[column] = run / f"{tag}-{suite}-n{n}"
        out[column] = evaluate_suite(evaluated, suite, n, folders[column], config, log)
    if row.verify:
        x, y = rl.data.load(DATASET, split="test", n=b["standard_n"])
        ver = verify(model, x, y, THREAT, row.verify)
        check_below_empirical(ver, torch.tensor(_per_sample(folders["standard"])))
        certified = ver.certified
        k = min(PREFIX_N, len(x))
        out["verified"] = {
            "method": row.verify,
            "n": len(x),
            "accuracy": float(certified.float().mean()),
            "prefix": {"n": k, "certified": certified[:k].int().tolist()},
        }
    return out


# --- rows -------------------------------------------------------------------------------------
def runs_of(row: Row, seed: int, b: dict[str, Any], cache: Path) -> list[tuple[str, Recipe, Path]]:
    """The training runs of ``row`` at ``seed``, in the order they train: its teacher's or
    base run (seed 0, shared by the rows that name it), then its own; each with its recipe
    and run folder."""
    runs, deps = [], {}
    for dep in filter(None, (row.teacher, row.init_from)):
        base = ROW.get(dep) or Row(dep, dep, 20)  # a teacher: its recipe, natural, 20 epochs
        recipe = prepare(base, b, 0, {})
        folder = run_dir(cache, base, recipe, b)
        runs.append((dep, recipe, folder))
        deps[dep] = folder / MODEL_FILE
    recipe = prepare(row, b, seed, deps)
    return [*runs, (row.name, recipe, run_dir(cache, row, recipe, b))]


def run_row(
    row: Row,
    seed: int,
    b: dict[str, Any],
    cache: Path,
    data: tuple[Tensor, Tensor],
    log: Log,
    parked: Path | None = None,
) -> dict[str, Any]:
    """Train (with its teacher or base run first) and evaluate ``row`` at ``seed``; the row's
    record, also kept in ``<cache>/rows/`` so that it is never redone. Once it is written, the
    parked copies of the row's runs in ``parked`` (:func:`park`) are dropped."""
    done = row_file(cache, row.name, seed, b)
    if done.exists():
        return json.loads(done.read_text())
    runs = runs_of(row, seed, b, cache)
    *deps, (_, recipe, folder) = runs
    for dep, dep_recipe, dep_folder in deps:
        train(dep, dep_recipe, dep_folder, data, log)
    trained = train(row.name, recipe, folder, data, log)
    cfg = recipe.train
    rec = {
        "row": row.name,
        "seed": seed,
        "config": f"configs/{row.config}.toml",
        "overrides": {"train": row.train, "objective": row.objective, "model": row.model},
        "note": row.note,
        "run": str(folder),
        "where": where(torch.get_num_threads(), trained.get("threads", []), trained.get("cpus")),
        "budget": {
            "epochs": cfg.epochs,
            "passes": len(trained["history"]),
            "inner_steps": _inner_steps(cfg.objective_options),
            "n_train": trained["n_train"],
            "holdout_n": trained["holdout_n"],
            "preset": b["preset"],
        },  # fmt: skip
        "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "train_threat": None if recipe.threat is None else recipe.threat.to_dict(),
        "train_s": trained["seconds"],
        "curve": [
            {
                k: r.get(k)
                for k in (
                    "epoch",
                    "train_loss",
                    "holdout_clean_acc",
                    "holdout_robust_acc",
                    "best_epoch",
                    "overfit",
                )
            }
            | ({"lesson": r["lesson"]} if "lesson" in r else {})  # curriculum's
            for r in trained["history"]
        ],  # fmt: skip
        **evaluate_row(row, folder, seed, b, log),
    }
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(rec, indent=1) + "\n")
    for *_, run in runs:
        if parked is not None and (parked / run.name).is_dir():
            shutil.rmtree(parked / run.name)
            log(f"{row.name} (seed {seed}): finished; its parked run {run.name} is dropped")
    return rec


def where(threads: int, passes: list[int | None], cpus: list[str | None] | None = None) -> str:
    """The board's ``where`` cell: the CPU and the evaluation's ``threads``, and the training
    passes' thread counts (``passes``) and CPUs (``cpus``; None where unrecorded) where they
    differ from it, as when a killed run resumed on another thread count or another machine."""
    cell = f"cpu, {threads} threads, {CPU}"
    ran = list(zip(passes, cpus or [None] * len(passes), strict=True))
    if all(t in (None, threads) and c in (None, CPU) for t, c in ran):
        return cell
    elsewhere = any(c not in (None, CPU) for _, c in ran)
    said, first = [], 1
    for (t, c), run in itertools.groupby(ran):
        last = first + len(list(run)) - 1
        on = f"{t or '?'}" + (f" threads of {c or '?'}" if elsewhere else "")
        said.append(f"{first if first == last else f'{first}-{last}'} on {on}")
        first = last + 1
    return f"{cell} (training passes {', '.join(said)}{'' if elsewhere else ' threads'})"


def row_file(cache: Path, name: str, seed: int, b: dict[str, Any]) -> Path:
    """Where the finished record of row ``name`` at ``seed`` and budget ``b`` is kept."""
    return cache / "rows" / f"{name}-s{seed}-{budget_key(b)}.json"


def restore_rows(results: Path, cache: Path, b: dict[str, Any], log: Log) -> None:
    """Write back to ``<cache>/rows/`` the rows of budget ``b`` that a board record in
    ``results`` (``<stem>.json``, which the repository keeps) holds and the cache lacks, as on
    a fresh clone or another machine: such a row is never redone and stays on the board."""
    key = budget_key(b)
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        if not (isinstance(doc, dict) and isinstance(doc.get("rows"), list)):
            continue
        budget = doc.get("budget")
        if not isinstance(budget, dict) or not set(PRESETS["smoke"]) <= set(budget):  # not a board
            continue
        if budget_key(budget) != key:
            continue
        for rec in doc["rows"]:
            done = row_file(cache, rec["row"], rec["seed"], b)
            if not done.exists():
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(rec, indent=1) + "\n")
                log(f"{rec['row']} (seed {rec['seed']}): finished, restored from {path}")


def archive_run(run: Path, results: Path) -> Path:
    """Copy the report's inputs of the run folder ``run`` (its sidecar, recipe, training log,
    the evaluations' ``results.json`` and saved examples; no weights, no per-sample outcomes)
    to ``<results>/leaderboard_runs/<run name>/``, which the repository keeps, so that the
    HTML board can be rendered again where the cache is gone. The copy's folder."""
    dest = results / ARCHIVE / run.name
    for src in sorted(run.rglob("*")):
        if src.is_file() and src.name in REPORT_FILES:
            target = dest / src.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def park(
    names: list[str], seed: int, b: dict[str, Any], cache: Path, parked: Path, log: Log
) -> list[Path]:
    """Copy the unfinished runs of rows ``names`` at ``seed`` from the cache to ``parked``
    (``<results>/leaderboard_parked/``, which the repository keeps): a row's own run until its
    record is written (training or evaluation unfinished), its teacher's or base run until that
    is trained. A session whose cache will be gone commits them; the next machine resumes them
    from the checkpoints they hold (:func:`unpark`). TensorBoard's event files stay behind. The
    copies."""
    copies = []
    for name in names:
        if row_file(cache, name, seed, b).exists():
            continue
        for dep, _, run in runs_of(ROW[name], seed, b, cache):
            if not run.is_dir() or (dep != name and (run / DONE_FILE).exists()):
                continue
            dest = parked / run.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(run, dest, ignore=shutil.ignore_patterns(TB_DIR))
            copies.append(dest)
            log(f"{name} (seed {seed}): parked {dep}'s run in {dest}")
    return copies


def unpark(parked: Path, cache: Path, log: Log) -> None:
    """Copy each parked run (:func:`park`) that the cache lacks into it, as on a fresh clone or
    another machine: the run resumes from the checkpoint it was parked with. A run the cache
    holds is left as it is (it is the one that was parked, or further on)."""
    for src in sorted(parked.iterdir()) if parked.is_dir() else ():
        dest = cache / "runs" / src.name
        if src.is_dir() and not dest.exists():
            shutil.copytree(src, dest)
            log(f"{src.name}: resumed from its parked copy in {src}")


def report_runs(
    recs: list[dict[str, Any]], results: Path, log: Log
) -> tuple[list[Path], list[str]]:
    """The folders the HTML board is rendered from (each row's archived copy, refreshed from
    its run folder where that is here) and the rows left out of it: those whose run is
    neither here nor archived (rows finished before the archive was kept), or whose folder
    holds another training run (:func:`same_run`)."""
    folders: dict[Path, None] = {}
    absent = []
    for rec in recs:
        run = Path(rec["run"])
        here = run.is_dir() and same_run(rec, run)
        copy = archive_run(run, results) if here else results / ARCHIVE / run.name
        if here or (copy.is_dir() and same_run(rec, copy)):
            folders[copy] = None
        else:
            absent.append(f"{rec['row']} (seed {rec['seed']})")
    if absent:
        log(f"the HTML board leaves out {', '.join(absent)}: their run folders are not here")
    return list(folders), absent


def finished(cache: Path, b: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finished row of budget ``b`` in ``cache``, in the order of :data:`ROWS`."""
    order = {r.name: i for i, r in enumerate(ROWS)}
    recs = [json.loads(p.read_text())
            for p in sorted((cache / "rows").glob(f"*-{budget_key(b)}.json"))]  # fmt: skip
    return sorted(recs, key=lambda r: (order.get(r["row"], 99), r["seed"]))


def _robust(rec: dict[str, Any]) -> float:
    return rec.get("standard", {}).get("robust_accuracy", -1.0)


def top_rows(recs: list[dict[str, Any]], k: int) -> list[str]:
    """The ``k`` rows with the best ``standard`` robust accuracy at seed 0. Rows evaluated by
    another suite in that column (``smoothed``, ``rand``: a smoothed or randomised model) do
    not rank: their figures come from other attacks. Nor does a best-checkpoint row whose best
    epoch was the last: it is its final row's model, which ranks already."""
    first = [
        r
        for r in recs
        if r["seed"] == 0
        and r["row"] != "natural"
        and r["standard"]["suite"] == "standard"
        and not r.get("same_as_final")
    ]
    return [r["row"] for r in sorted(first, key=_robust, reverse=True)[:k]]


# --- the board --------------------------------------------------------------------------------
#: the seeds' training claims (issue 24): (what, the seed's claim, where it is stated, rows)
CLAIMS = [
    ("Free-AT vs PGD-AT, accuracy and cost",
     "Free-8 reaches about PGD-AT's robust accuracy at about the cost of natural training "
     "(the slides' table; Shafahi et al.: Free-8 46.2% PGD-100 vs PGD-7 on CIFAR-10, "
     "METHODS.md)", ("free-at", "pgd-at", "natural")),
    ("TRADES beta 1 vs 6 vs PGD-AT",
     "a larger beta trades clean for robust accuracy; TRADES beta 6 is more robust than "
     "PGD-AT (the lecture's TRADES table)", ("trades-b1", "trades-b6", "pgd-at")),
    ("MART vs PGD-AT", "MART is more robust than PGD-AT (Wang et al. 2020)", ("mart", "pgd-at")),
    ("Madry vs curriculum vs dynamic AT",
     "curriculum and dynamic AT keep PGD-AT's robustness with better clean accuracy (the DART "
     "table)", ("pgd-at", "curriculum", "dynamic-at")),
    ("Model capacity", "capacity is crucial: larger networks are more robust (the tutorial)",
     ("pgd-at", "pgd-at-resnet20", "pgd-at-preact-resnet18")),
    ("Smooth activations",
     "smooth activations (softplus, SiLU) improve adversarial training over ReLU (the "
     "tutorial's smooth adversarial training)", ("pgd-at", "pgd-at-softplus", "pgd-at-silu")),
    ("Robust overfitting and best-checkpoint selection",
     "robust test accuracy peaks and then falls; the best hold-out checkpoint recovers it "
     "(Rice et al. 2020)", ("pgd-at", "pgd-at-best", "trades-b6", "trades-best")),
    ("Extra unlabeled data",
     "data, data, data: pseudo-labelled extra data improves robustness (the lecture; Carmon "
     "et al. 2019)", ("trades-b6-30k", "rst", "pgd-at-30k", "uat", "mart-semi", "mart-semi-full")),
]  # fmt: skip


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _by_row(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        out.setdefault(r["row"], []).append(r)
    return out


def _seeds(recs: list[dict[str, Any]]) -> str:
    vals = [_robust(r) for r in recs if "standard" in r]
    if len(vals) < 2:
        return "1"
    spread = 100 * (max(vals) - min(vals))
    return f"{len(vals)}: mean {_pct(sum(vals) / len(vals))}, spread {spread:.1f} pts"


def _verified(r: dict[str, Any]) -> str:
    ver = r.get("verified")
    return "-" if not ver else f"{_pct(ver['accuracy'])} ({ver['method']}, n={ver['n']})"


def _column(rec: dict[str, Any], col: str) -> str:
    e = rec.get(col)
    if not isinstance(e, dict):
        return "n/a"
    suite = "" if e["suite"] == col else f" {e['suite']}"
    return f"{_pct(e['robust_accuracy'])}{suite} (n={e['n']})"


def _curve(rec: dict[str, Any]) -> str:
    """The hold-out's robust accuracy (%) after each pass, under the attack named first (the
    recipe's ``val_attack``: rows differ) and at the recipe's threat where it is not the
    board's (smoothadv's l2); clean accuracy where a row has no robust check; the lesson of
    each pass where the objective logs one (curriculum). Records without ``train_threat``
    predate it and trained at the board's threat."""
    vals = [c.get("holdout_robust_acc") for c in rec["curve"]]
    attack = rec["train_config"].get("val_attack") or {}
    name = f"{attack.get('name', '?').upper()}-{attack.get('steps', '?')}"
    threat = rec.get("train_threat")
    if threat and (threat["norm"], threat["eps"]) != (THREAT.norm, THREAT.eps):
        name += f" at {threat['norm']} {threat['eps']:g}"
    if all(v is None for v in vals):  # no robust check on the hold-out (gaussian-aug)
        vals, name = [c.get("holdout_clean_acc") for c in rec["curve"]], "clean"
    cell = f"{name}: " + " ".join("-" if v is None else f"{100 * v:.0f}" for v in vals)
    if any("lesson" in c for c in rec["curve"]):
        cell += " (lessons " + " ".join(str(c.get("lesson", "-")) for c in rec["curve"]) + ")"
    return cell


def _flags(rec: dict[str, Any]) -> str:
    flags = sorted({f for c in ("standard", "fast") for f in rec.get(c, {}).get("flags", [])})
    if over := [c["epoch"] for c in rec["curve"] if c.get("overfit")]:
        flags.append(f"overfit probe after pass {over}")
    return ", ".join(flags) or "none"


def board_markdown(
    recs: list[dict[str, Any]], b: dict[str, Any], m: dict[str, Any], absent: list[str]
) -> str:
    """The board: the table of ``recs``, the rows not run, which rows the HTML board leaves
    out (``absent``) and the seeds' claims beside our figures."""
    rows = _by_row(recs)
    length = f"{b['epochs']} passes over the data per row" if b["epochs"] else "epochs as stated"
    lines = [
        "# Fashion-MNIST leaderboard (linf eps 0.1)",
        "",
        f"Budget `{b['preset']}`: {length}, first {b['train_n']} training images minus a "
        f"fixed hold-out of {b['val_split']} (seed 0), "
        f"inner steps capped at {b['max_steps'] or 'the recipe'}; clean and standard-suite "
        f"robust accuracy on the first {b['standard_n']} test images, fast suite on the first "
        f"{b['fast_n']}. The validation curve: hold-out robust accuracy (%) after each pass, "
        "under the recipe's validation attack (named in the cell). Rows ran on the CPU "
        "unless `where` says otherwise; `train s` is the training loop (validation excluded). "
        "`where` names the CPU a row ran on for rows recorded since 2026-12-06; the machine "
        "below built this board, not necessarily its rows.",
        "",
        f"Built on: {m.get('nproc')} cores, {m.get('cpu')}, torch {m.get('torch')}; robustlab "
        f"{m.get('robustlab_commit')}; {m.get('date')}. Command: `{m.get('command')}`",
        "",
        "| row | recipe | epochs (passes), inner steps | checkpoint | clean | standard | fast "
        "| verified | seeds | train s | flags | validation curve | where |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        r = rs[0]
        over = {k: v for k, v in r["overrides"].items() if v}
        bud = r["budget"]
        lines.append(
            f"| {name} | {r['config']}{' ' + json.dumps(over) if over else ''} | "
            f"{bud['epochs']} ({bud['passes']}), {json.dumps(bud['inner_steps'])} | "
            f"{Path(r['checkpoint']).stem} (epoch {r['epoch']}"
            f"{', = final' if r.get('same_as_final') else ''}) | "
            f"{_pct(r.get('standard', {}).get('clean_accuracy'))} | {_column(r, 'standard')} | "
            f"{_column(r, 'fast')} | {_verified(r)} | {_seeds(rs)} | "
            f"{r['train_s']:.0f} | {_flags(r)} | {_curve(r)} | {r['where']} |"
        )
    missing = [r.name for r in ROWS if r.name not in rows]
    lines += ["", f"Not run yet at this budget: {', '.join(missing) or 'none'}.", ""]
    if absent:
        lines += [f"The HTML board (`robustlab report` on the rows' run folders, archived in "
                  f"`{ARCHIVE}/`) leaves out {', '.join(absent)}: their run folders are neither "
                  "on the machine that built it nor archived (they finished before the archive "
                  "was kept). Their figures above come from the board's JSON record.",
                  ""]  # fmt: skip
    lines += ["## The seeds' training claims at this budget", ""]
    for what, claim, names in CLAIMS:
        ours = "; ".join(
            f"{n}: clean {_pct(rows[n][0].get('standard', {}).get('clean_accuracy'))}, "
            f"standard {_pct(_robust(rows[n][0]))}, {rows[n][0]['train_s']:.0f} s "
            f"({rows[n][0]['where']})"
            if n in rows
            else f"{n}: not run yet"
            for n in names
        )
        lines += [f"- **{what}.** Seed: {claim}. Ours: {ours}."]
    return "\n".join(lines) + "\n"


# --- the zoo ----------------------------------------------------------------------------------
ROBUST_SIGMAS = 3.0
RANDOMISED_RULE = (
    "; on a randomised model (clean.repeats: each point judged by a strict majority of that "
    "many predictions) clean accuracy may differ by robust_sigmas standard errors of the "
    "difference of two such figures more, sqrt(2) max(clean.clean_accuracy_se, 1 / n)"
)


def robust_tolerance(robust: list[int]) -> float:
    """The re-evaluation tolerance of a robust accuracy on the points ``robust`` (per-point
    outcomes): ROBUST_SIGMAS binomial standard errors of that many points (variance floored
    at 0.25 / k, so a figure of 0 or 1 still allows one point to move)."""
    k = max(len(robust), 1)
    p = sum(robust) / k
    return ROBUST_SIGMAS * math.sqrt(max(p * (1 - p), 0.25 / k) / k)


def clean_tolerance(summary: dict[str, Any]) -> float:
    """The re-evaluation tolerance of the clean accuracy of an evaluation ``summary``
    (:func:`evaluate_suite`): one point in n, and on a randomised model (a majority of
    ``repeats`` predictions per point) ROBUST_SIGMAS standard errors of the difference of two
    such figures (sqrt 2 times the recorded one, floored at one point in n) more."""
    one = 1.0 / summary["n"]
    if summary.get("repeats", 1) <= 1:
        return one
    return one + ROBUST_SIGMAS * math.sqrt(2) * max(summary.get("clean_accuracy_se", 0.0), one)


def zoo_name(rec: dict[str, Any]) -> str:
    return f"fmnist-{rec['row']}-{rec['architecture']['name']}"


def _shipped_card(zoo: Path, name: str) -> dict[str, Any] | None:
    """The card of the zoo's ``name`` without its ``sha256``; None if not shipped."""
    if name not in rl.models.zoo.zoo_names(zoo):
        return None
    card = rl.models.zoo.card(name, zoo)
    card.pop("sha256", None)
    return card


def _kept(zoo: Path, name: str, why: str, log: Log) -> Path:
    """Log that the zoo's model ``name`` stays as shipped, and why; its weights file."""
    log(f"zoo: {name} kept as shipped ({why})")
    return zoo / f"{name}.safetensors"


def same_run(rec: dict[str, Any], folder: Path) -> bool:
    """Whether ``folder`` (the row record ``rec``'s run folder, or its archived copy) holds the
    training run the record was made from: the same training losses, pass by pass, in its
    training log. A folder is keyed by its recipe, so a row that shares it (pgd-at-best) may
    train it again on a machine where the record's run is not, and that run's weights and
    evaluations are not the ones the record's figures belong to."""
    log = folder / "train_log.jsonl"
    if not log.exists():
        return False
    losses = [json.loads(s)["train_loss"] for s in log.read_text().splitlines() if s.strip()]
    return losses == [c["train_loss"] for c in rec["curve"]]


def export_zoo(recs: list[dict[str, Any]], b: dict[str, Any], zoo: Path, log: Log) -> list[Path]:
    """Each finished seed-0 row's evaluated checkpoint to ``zoo/<name>.safetensors`` with its
    card in the sidecar ``<name>.json`` (:mod:`robustlab.models.zoo`). A model already shipped
    with the same card is left as it is (a rewrite would only change its commit and date), and
    so is one trained at the ``converged`` budget when ``b`` is not converged. A row evaluated
    as a defense around its model (smoothing) is not exported: its figures are the defense's,
    and the zoo ships models that are evaluated as they are loaded. Nor is a best-checkpoint
    row whose best epoch was the last (the same weights as its final-checkpoint row)."""
    written = []
    for rec in (r for r in recs if r["seed"] == 0):
        name = zoo_name(rec)
        if ROW[rec["row"]].smoothing is not None:
            log(f"zoo: {name} not exported: its figures are those of its smoothed classifier")
            continue
        if rec.get("same_as_final"):
            log(
                f"zoo: {name} not exported: its best epoch is its last, so it ships as the row "
                "that evaluates those final weights"
            )
            continue
        gone = None
        if not Path(rec["checkpoint"]).exists():
            gone = f"its checkpoint {rec['checkpoint']} is not here"
        elif not same_run(rec, Path(rec["run"])):
            gone = (
                f"its run folder {Path(rec['run']).name} here was trained again (another row "
                "or machine): its weights are not those the row's figures belong to"
            )
        if gone:
            if name in rl.models.zoo.zoo_names(zoo):
                written.append(_kept(zoo, name, gone, log))
            else:
                log(f"zoo: {name} not exported: {gone}")
            continue
        model = rl.models.load(rec["checkpoint"])
        meta = model.robustlab_meta
        n, std = rec["standard"]["n"], rec["standard"]
        prefix = {c: rec[c]["prefix"] for c in ("standard", "fast") if isinstance(rec.get(c), dict)}
        tolerance = {
            "clean_abs": clean_tolerance(std),
            "robust_sigmas": ROBUST_SIGMAS,
            "robust_prefix_abs": {c: robust_tolerance(p["robust"]) for c, p in prefix.items()},
            "rule": "clean accuracy on the same n points: equal up to 1 point in n (floating "
            "point across machines); a suite re-run on the first k <= prefix.n points (other "
            "batches, so other random starts): its robust accuracy within robust_sigmas "
            "binomial standard errors of k points, sqrt(max(p (1 - p), 0.25 / k) / k), of "
            "the card's figure on the same k points (p: that figure; prefix.robust holds "
            "the per-point outcomes); robust_prefix_abs: that bound at k = prefix.n"
            + (RANDOMISED_RULE if "repeats" in std else ""),
        }
        bud = rec["budget"]
        card = {
            "name": None,
            "row": rec["row"],
            "recipe": rec["config"],
            "overrides": rec["overrides"],
            "config": rec["train_config"],
            "commit": meta.get("git_commit"),
            "dataset": DATASET,
            "threat": THREAT.to_dict(),
            "objective": meta.get("objective"),
            "architecture": rec["architecture"],
            "budget": bud
            | {
                "converged": b["preset"] == "converged",
                "summary": f"{bud['epochs']} epochs ({bud['passes']} passes) on {bud['n_train']} "
                f"images, inner steps {json.dumps(bud['inner_steps'])}, preset {b['preset']}"
                + ("" if b["preset"] == "converged" else ": NOT converged"),
            },
            "checkpoint": {"which": Path(rec["checkpoint"]).stem, "epoch": rec["epoch"]},
            "evaluation": {
                "clean": {"accuracy": std["clean_accuracy"], "n": n}
                | {k: std[k] for k in ("repeats", "clean_accuracy_se") if k in std},
                **{
                    c: rec[c] | {"folder": None}
                    for c in ("standard", "fast")
                    if isinstance(rec.get(c), dict)
                },
                **({"verified": rec["verified"]} if "verified" in rec else {}),
                "tolerance": tolerance,
                "seed": 0,
                "batch_size": 500,
            },
            "flags": sorted(
                {f for c in ("standard", "fast") for f in rec.get(c, {}).get("flags", [])}
            ),
            "train_s": rec["train_s"],
            "curve": rec["curve"],
            "date": meta.get("created"),
        }
        card["name"] = name
        shipped = _shipped_card(zoo, name)
        keep = shipped == json.loads(json.dumps(card)) or (
            shipped is not None and shipped["budget"]["converged"] > card["budget"]["converged"]
        )
        if keep:
            written.append(_kept(zoo, name, "unchanged, or trained at the converged budget", log))
            continue
        path = rl.models.save(model, zoo / f"{name}.safetensors", meta={
            k: meta[k] for k in ("dataset", "threat", "objective", "epoch", "seed") if k in meta
        } | {"card": card})  # fmt: skip
        side = path.with_suffix(".json")
        doc = json.loads(side.read_text())
        doc["card"]["sha256"] = doc["sha256"]
        side.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"zoo: {path} ({path.stat().st_size / 1e6:.2f} MB)")
        written.append(path)
    return written


# --- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    b = budget_of(args)
    if args.list:
        for r in ROWS:
            length = f"{b['epochs']} passes" if b["epochs"] else f"{r.epochs} epochs"
            print(f"{r.name}: configs/{r.config}.toml, {length}, checkpoint {r.checkpoint}, "
                  f"suites {r.suites} {r.note}")  # fmt: skip
        return {}
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    if unknown := [n for n in names if n not in ROW]:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROW)}")
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    parked = args.results_dir / PARKED
    restore_rows(args.results_dir, args.cache, b, log)
    if args.park:
        copies = park(names, args.seed, b, args.cache, parked, log)
        print(f"parked {len(copies)} runs in {parked}: commit them to resume on another machine")
        return {"parked": [str(p) for p in copies]}
    unpark(parked, args.cache, log)
    data = rl.data.load(DATASET, split="train", n=b["train_n"])
    for name in names:
        run_row(ROW[name], args.seed, b, args.cache, data, log, parked)
    if args.seeds == 2:
        for name in top_rows(finished(args.cache, b), TOP_SEEDED):
            run_row(ROW[name], 1, b, args.cache, data, log, parked)
    recs = finished(args.cache, b)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {
        "machine": machine_record(),
        "budget": b,
        "settings": settings,
        "threat": THREAT.to_dict(),
        "rows": recs,
    }
    runs, absent = report_runs(recs, args.results_dir, log)
    md = board_markdown(recs, b, record["machine"], absent)
    if args.results_dir == RESULTS_DIR:
        write_results(args.stem, md, record)
    else:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{args.stem}.md").write_text(md)
        (args.results_dir / f"{args.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    html = args.results_dir / f"{args.stem}.html"
    if runs:
        rl_main(
            ["report", *map(str, runs), "-o", str(html), "--title", "Fashion-MNIST leaderboard"]
        )
    if args.export_zoo:
        export_zoo(recs, b, args.zoo_dir, log)
    print(md)
    return record


if __name__ == "__main__":
    main()
