"""Helpers shared by the scripts of ``benchmarks/``: what machine and versions a result came
from, interleaved timing with medians, and a cache of the models the benchmarks attack.

Nothing here is part of robustlab's API; benchmarks import it as ``from _common import ...``
(the scripts run from the repository root as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

import robustlab as rl
from robustlab._provenance import git_commit, versions
from robustlab.config import Recipe

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"

K = TypeVar("K")
T = TypeVar("T")


# --- where a result came from -------------------------------------------------------------
def command_line() -> str:
    """The command that ran this process, as one could retype it from the repository root."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())  # .bench-venv/bin/python rather than an absolute path
    except ValueError:
        pass
    return shlex.join([str(exe), *sys.argv])


def src_changes() -> list[str] | None:
    """Files under ``src/`` that differ from the recorded commit (``git status --porcelain``),
    so a result says whether the library code it measured was the commit's; None without git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=BENCH_DIR.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None


def machine_record(peers: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Machine (nproc, CPU model, torch threads), versions (python, torch, numpy, robustlab, its
    git commit and uncommitted changes under src/, peers: None when missing), the command and
    the date (UTC)."""
    rec: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "robustlab_commit": git_commit(),
        "src_changes": src_changes(),
        **versions(),
    }
    rec["peers"] = dict(peers or {})
    return rec


def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None if it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --- timing -------------------------------------------------------------------------------
def interleaved(
    tasks: Mapping[K, Callable[[], T]],
    repeats: int,
    *,
    on_done: Callable[[int, K, float], None] | None = None,
) -> tuple[dict[K, list[float]], dict[K, T]]:
    """Time every task ``repeats`` times, round robin: round r runs each task once, in an order
    rotated by r / repeats of a turn, so the slow phases of a shared machine hit every task alike.

    Returns the wall-clock seconds of each run per task and each task's last result.
    ``on_done(round, name, seconds)`` is called after each run (for progress output).
    A warm-up is one round of its own: ``interleaved(warmup_tasks, 1)``.
    """
    names = list(tasks)
    results: dict[K, T] = {}
    times: dict[K, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r * len(names) // max(repeats, 1)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            results[name] = tasks[name]()
            times[name].append(time.perf_counter() - t0)
            if on_done is not None:
                on_done(r, name, times[name][-1])
    return times, results


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- trained models -----------------------------------------------------------------------
def _recipe_key(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def trained_model(
    name: str, recipe: Mapping[str, Any], *, log: Callable[[str], None] = print
) -> nn.Module:
    """A model trained by ``recipe``, from ``benchmarks/.cache/`` or trained now and cached.

    ``recipe`` holds ``arch`` (a ``robustlab.models.create`` name), ``dataset``, optionally
    ``eps`` (linf, for adversarial objectives), ``model`` (more keywords of
    ``robustlab.models.create``, e.g. ``noise``), ``train_n`` (train on the first n images
    only) and every keyword of ``robustlab.training.fit`` (``objective``, ``epochs``, ...).
    The cache file name carries a hash of the recipe, so a changed recipe trains a new model.
    Returns the model in eval mode, its parameters' ``requires_grad`` as training left them.
    """
    path = CACHE_DIR / f"{name}-{_recipe_key(recipe)}.safetensors"
    if path.exists():
        model = rl.models.load(path)
        log(
            f"model {name}: cached {path.relative_to(BENCH_DIR.parent)} "
            f"(trained in {model.robustlab_meta['train_seconds']:.0f} s)"
        )
        return model
    fit_kwargs = {
        k: v for k, v in recipe.items() if k not in ("arch", "dataset", "eps", "model", "train_n")
    }
    threat = rl.ThreatModel("linf", recipe["eps"]) if "eps" in recipe else None
    log(f"model {name}: training {json.dumps(recipe)} (cached afterwards in {path.name})")
    x, y = rl.data.load(recipe["dataset"], split="train", n=recipe.get("train_n"))
    model = seeded(  # the initial weights from the recipe's seed, as `train` does
        recipe.get("seed", 0), lambda: rl.models.create(recipe["arch"], **recipe.get("model", {}))
    )
    t0 = time.perf_counter()
    history = rl.training.fit(model, (x, y), threat=threat, dataset=recipe["dataset"], **fit_kwargs)
    seconds = time.perf_counter() - t0
    log(
        f"model {name}: trained in {seconds:.0f} s, final train loss "
        f"{history[-1]['train_loss']:.4f}"
    )
    rl.models.save(
        model,
        path,
        meta={"recipe": dict(recipe), "train_seconds": seconds, "threads": torch.get_num_threads()},
    )
    return rl.models.load(path)  # eval mode, with robustlab_meta like a cached one


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's generator seeded from ``seed`` (torch seeds it at random when a
    process starts), so its initial weights are the seed's; the caller's generator state is
    restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def seeded_model(recipe: Recipe) -> nn.Module:
    """The recipe's model with its initial weights drawn from ``train.seed``, as ``robustlab
    train`` builds it."""
    return seeded(recipe.train.seed, recipe.create_model)


def write_results(stem: str, markdown: str, record: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``benchmarks/results/<stem>.md`` and ``<stem>.json``; return both paths."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS_DIR / f"{stem}.md", RESULTS_DIR / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(record, indent=2) + "\n")
    return md, js
