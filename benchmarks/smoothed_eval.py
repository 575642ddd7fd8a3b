"""Evaluating smoothed classifiers honestly and affordably: the seed paper's remaining
measurements (Nemcovsky et al., "Smoothed Inference for Adversarially-Trained Models") and the
check of ``rl.evaluate``'s default on smoothed models.

Four parts (``--parts``), each row cached in ``benchmarks/.cache/smoothed_eval/`` as it
finishes (a killed run resumes where it stopped; ``--fresh`` starts over), one record
(``benchmarks/results/<stem>.md/.json``):

1. ``honest``: the table "Which attack number is honest" on the smoothed PGD-AT and CNI models
   (linf 0.1, ``--sigma``, prediction vote, ``--n`` draws): PGD on the base model, PGD with one
   noise draw per step, EPGD and SmoothAdv (m = ``--m``, ``--steps`` steps), their per-sample
   worst case, the EOT path of the ``rand`` suite (APGD-CE on the module with EOT ``--eot``,
   at n = ``--eot-n``), and ``rl.evaluate``'s default (the ``smoothed`` suite). Every attack's
   output is judged as the default judges: a strict majority of ``--repeats`` predictions of
   the smoothed classifier at n. Times: CPU seconds of this process (all threads; not
   inflated by other work on a shared machine) for crafting plus judging, each row alone;
   ``--seeds`` seeds (attack draws and judging draws) give the run-to-run spread.
2. ``blackbox``: transfer from an independently trained model (the naturally trained smallcnn,
   PGD-20 on it) and NAttack (``--nattack-pop`` x ``--nattack-iters`` queries of the smoothed
   classifier at ``--nattack-n`` draws per query) against both smoothed models.
3. ``sweep``: ``rl.evaluate``'s default against eps, ``--eps-factors`` x 0.1.
4. ``cost``: attack strength against cost: accuracy of the smoothed classifier after PGD
   (base model, k steps), EPGD and SmoothAdv (k steps x m draws) over ``--ks`` and ``--ms``.

Run from the repository root: ``.venv/bin/python benchmarks/smoothed_eval.py`` (see
BENCHMARKS.md for the budget used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import CACHE_DIR, machine_record, trained_model, write_results
from smoothing import NoisyInput, floats, ints, log, recipes
from torch import Tensor, nn

import robustlab as rl
from robustlab.defenses import Smoothing
from robustlab.evaluation.cascade import correct
from robustlab.evaluation.suites import get_suite

ROWS = CACHE_DIR / "smoothed_eval"
THREAT = rl.ThreatModel("linf", 0.1)


def cached(
    key: str, fresh: bool, compute: Callable[[], dict[str, Any]], rows: Path = ROWS
) -> dict[str, Any]:
    """The row ``key`` from the cache folder ``rows``, or computed now and cached there
    (resumability)."""
    path = rows / f"{key}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    row = compute()
    rows.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def smoothed(model: nn.Module, args: argparse.Namespace, n: int | None = None) -> Smoothing:
    return Smoothing(
        model, sigma=args.sigma, samples=n or args.n, vote="prediction", batch_size=args.rows
    ).eval()


def judge(smooth: Smoothing, xs: Tensor, y: Tensor, repeats: int, seed: int) -> Tensor:
    """Per point: correct in a strict majority of ``repeats`` predictions (the cascade's
    judgement), the draws from a generator seeded by ``seed``."""
    smooth.generator = torch.Generator().manual_seed(10_000 + seed)
    ok, _ = correct(smooth, xs, y, 500, torch.device("cpu"), repeats)
    smooth.generator = None
    return ok


def cpu_seconds(run: Callable[[], Any]) -> tuple[Any, float]:
    """``run()``'s result and the CPU seconds this process spent on it (all threads): unlike
    wall-clock time, not inflated by other processes on a shared machine, so the ratios of
    two rows hold even when the machine was busy during one of them."""
    t0 = time.process_time()
    out = run()
    return out, time.process_time() - t0


def timed(
    craft: Callable[[], Tensor], smooth: Smoothing, y: Tensor, args: argparse.Namespace, seed: int
) -> tuple[Tensor, float]:
    """Robust mask after ``craft()``'s inputs, and the CPU seconds of crafting plus judging."""
    return cpu_seconds(lambda: judge(smooth, craft(), y, args.repeats, seed))


# --- part 1 ---------------------------------------------------------------------------------
def honest_rows(
    name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    smooth = smoothed(model, args)
    gen = torch.Generator().manual_seed(seed)
    step = 2.5 * THREAT.eps / args.steps
    attacks: dict[str, Callable[[], Tensor]] = {
        "PGD on the base model": lambda: (
            rl.attacks.create("pgd", THREAT, steps=args.steps)(model, x, y, generator=gen).x_adv
        ),
        "PGD, one noise draw per step": lambda: (
            rl.attacks.create("pgd", THREAT, steps=args.steps)(
                NoisyInput(model, args.sigma, gen), x, y, generator=gen
            ).x_adv
        ),
        f"EPGD (m = {args.m})": lambda: (
            rl.attacks.create("epgd", THREAT, samples=args.m, steps=args.steps, step_size=step)(
                smooth, x, y, generator=gen
            ).x_adv
        ),
        f"SmoothAdv (m = {args.m})": lambda: (
            rl.attacks.create(
                "smoothadv", THREAT, samples=args.m, steps=args.steps, step_size=step
            )(smooth, x, y, generator=gen).x_adv
        ),
    }
    clean, sec = cpu_seconds(lambda: judge(smooth, x, y, args.repeats, seed))
    rows = [{"attack": "none (clean)", "accuracy": clean.float().mean().item(), "seconds": sec}]
    masks = []
    for label, craft in attacks.items():
        ok, sec = timed(craft, smooth, y, args, seed)
        masks.append(ok & clean)
        rows.append(
            {
                "attack": label,
                "accuracy": masks[-1].float().mean().item(),
                "seconds": sec,
                "single": True,
            }
        )
        log(f"honest {name} seed {seed}: {label} {rows[-1]['accuracy']:.3f} ({sec:.0f} s)")
    worst = torch.stack(masks).all(0)
    rows.append(
        {
            "attack": "worst case of the four (per sample)",
            "accuracy": worst.float().mean().item(),
            "seconds": None,
        }
    )
    if seed == 0 and name in args.eot_models:  # the costliest row, not in the worst case: once
        eot_model = smoothed(model, args, n=args.eot_n)
        res, sec = cpu_seconds(
            lambda: rl.evaluate(
                eot_model,
                x,
                y,
                THREAT,
                seed=seed,
                repeats=args.repeats,
                attacks=[("apgd-ce", {"steps": args.steps, "eot": args.eot})],
            )
        )
        rows.append(
            {
                "attack": f"APGD-CE, EOT {args.eot} on the module (n = {args.eot_n}; the "
                "rand suite's path; seed 0 only)",
                "accuracy": res.robust_accuracy,
                "seconds": sec,
                "single": True,
            }
        )
    log(f"honest {name} seed {seed}: worst {worst.float().mean():.3f}")
    return {"model": name, "seed": seed, "rows": rows}


DEFAULT = "rl.evaluate default (smoothed suite)"


def default_row(
    name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """``rl.evaluate``'s default on the smoothed model (cached apart from the attack rows,
    under a digest of the suite, so a changed suite reruns only this row)."""
    res, sec = cpu_seconds(lambda: rl.evaluate(smoothed(model, args), x, y, THREAT, seed=seed))
    log(f"honest {name} seed {seed}: default {res.robust_accuracy:.3f}")
    return {
        "attack": DEFAULT,
        "accuracy": res.robust_accuracy,
        "seconds": sec,
        "se": res.record.get("robust_accuracy_se"),
        "suite": [a["config"] for a in res.per_attack],
        "stages": [
            {"attack": a["attack"], "broken": a.get("broken"), "time_s": a.get("time_s")}
            for a in res.per_attack
        ],
    }


def suite_digest() -> str:
    """A short digest of the smoothed suite's attacks (the default row's cache key)."""
    spec = json.dumps(get_suite("smoothed").for_norm("linf"), sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def honest_run(
    name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, seed: int, tag: str
) -> dict[str, Any]:
    """The attack rows of one (model, seed) and the default's row, each from the cache or
    computed now (an older cache file's own default row is replaced by the current one)."""
    key = f"{name}-{tag}-{len(x)}-seed{seed}"
    run = cached(f"honest-{key}", args.fresh, lambda: honest_rows(name, model, x, y, args, seed))
    default = cached(
        f"default-{key}-{suite_digest()}",
        args.fresh,
        lambda: default_row(name, model, x, y, args, seed),
    )
    return run | {"rows": [r for r in run["rows"] if r["attack"] != DEFAULT] + [default]}


# --- part 2 ---------------------------------------------------------------------------------
def blackbox_rows(
    name: str, model: nn.Module, source: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    smooth = smoothed(model, args)
    gen = torch.Generator().manual_seed(0)
    clean = judge(smooth, x, y, args.repeats, 0)
    rows = []
    transfer = rl.attacks.create(
        "transfer", THREAT, surrogate=source, attack="pgd", attack_options={"steps": 20}
    )
    ok, sec = timed(lambda: transfer(smooth, x, y, generator=gen).x_adv, smooth, y, args, 0)
    rows.append(
        {
            "attack": "transfer: PGD-20 on a naturally trained smallcnn",
            "accuracy": (ok & clean).float().mean().item(),
            "seconds": sec,
        }
    )
    query = smoothed(model, args, n=args.nattack_n)
    nattack = rl.attacks.create(
        "nattack",
        THREAT,
        population=args.nattack_pop,
        max_iters=args.nattack_iters,
        batch_size=args.rows,
    )
    xb, yb = x[: args.nattack_images], y[: args.nattack_images]
    ok, sec = timed(lambda: nattack(query, xb, yb, generator=gen).x_adv, smooth, yb, args, 0)
    rows.append(
        {
            "attack": f"NAttack ({args.nattack_pop} x {args.nattack_iters} queries at n = "
            f"{args.nattack_n}; first {len(xb)} images)",
            "accuracy": (ok & clean[: len(xb)]).float().mean().item(),
            "seconds": sec,
            "clean_same_images": clean[: len(xb)].float().mean().item(),
        }
    )
    log(f"blackbox {name}: {rows}")
    return {"model": name, "rows": rows, "clean": clean.float().mean().item()}


# --- part 3 and 4 ---------------------------------------------------------------------------
def sweep_row(
    model: nn.Module, x: Tensor, y: Tensor, factor: float, args: argparse.Namespace
) -> dict[str, Any]:
    threat = rl.ThreatModel("linf", factor * THREAT.eps)
    res, sec = cpu_seconds(lambda: rl.evaluate(smoothed(model, args), x, y, threat, seed=0))
    return {
        "eps": threat.eps,
        "accuracy": res.robust_accuracy,
        "clean": res.clean_accuracy,
        "se": res.record.get("robust_accuracy_se"),
        "seconds": sec,
    }


def cost_row(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean: Tensor,
    attack: str,
    k: int,
    m: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Accuracy of the smoothed classifier after one attack with k steps and m draws (PGD on
    the base model: m unused), on the points ``clean`` (correct without attack)."""
    smooth = smoothed(model, args)
    gen = torch.Generator().manual_seed(0)
    opts = {"steps": k, "step_size": 2.5 * THREAT.eps / k}
    if attack == "pgd":
        atk, target = rl.attacks.create("pgd", THREAT, **opts), model
    else:
        atk, target = rl.attacks.create(attack, THREAT, samples=m, **opts), smooth
    x_adv, craft = cpu_seconds(lambda: atk(target, x, y, generator=gen).x_adv)
    ok = judge(smooth, x_adv, y, args.repeats, 0) & clean
    return {
        "attack": attack,
        "k": k,
        "m": m,
        "accuracy": ok.float().mean().item(),
        "craft_seconds": craft,
    }


# --- record -----------------------------------------------------------------------------------
def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summarise_honest(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and attack: mean and std of accuracy and seconds over the seeds, and the
    default's cost over the most expensive single attack, per seed (ratio in one run)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        for label in [row["attack"] for row in mine[0]["rows"]]:
            rows = [x for r in mine for x in r["rows"] if x["attack"] == label]
            acc = [row["accuracy"] for row in rows]
            secs = [row["seconds"] for row in rows if row["seconds"] is not None]
            out.append(
                {
                    "model": model,
                    "attack": label,
                    "mean": statistics.fmean(acc),
                    "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "seconds": statistics.fmean(secs) if secs else None,
                }
            )
        ratios, ratios_four = [], []
        for r in mine:
            default = r["rows"][-1]["seconds"]
            singles = [x["seconds"] for x in r["rows"] if x.get("single")]
            four = [x["seconds"] for x in r["rows"][1:5]]
            ratios.append(default / max(singles))
            ratios_four.append(default / max(four))
        out.append(
            {
                "model": model,
                "attack": "cost: default / most expensive single attack",
                "ratio": statistics.fmean(ratios),
                "ratio_four": statistics.fmean(ratios_four),
            }
        )
    return out


def markdown(record: dict[str, Any]) -> str:
    a, m = record["args"], record["machine"]
    lines = [
        "# Evaluating smoothed classifiers",
        "",
        f"`{m['command']}` · {m['date']} · commit {m['robustlab_commit']} · torch "
        f"{m['torch']} · {m['nproc']} cores ({m['cpu']})",
        "",
    ]
    if "honest" in record:
        lines += [
            f"## Which attack number is honest (linf 0.1, sigma {a['sigma']}, prediction "
            f"vote, n = {a['n']}, {a['images']} images, {a['seeds']} seeds; judged by "
            f"{a['repeats']} predictions)",
            "",
            "| model | attack | robust accuracy (mean ± std over seeds) | CPU seconds |",
            "|---|---|---|---|",
        ]
        for r in record["honest"]:
            if "ratio" in r:
                lines.append(
                    f"| {r['model']} | {r['attack']} | {r['ratio']:.2f}x (of EPGD / "
                    f"SmoothAdv / PGD rows: {r['ratio_four']:.2f}x) | |"
                )
                continue
            sec = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
            lines.append(
                f"| {r['model']} | {r['attack']} | {pct(r['mean'])} ± {pct(r['std'])} | {sec} |"
            )
        lines.append("")
    if "blackbox" in record:
        lines += [
            "## Black-box attacks on the smoothed models",
            "",
            "| model | attack | robust accuracy | clean (same images) | CPU seconds |",
            "|---|---|---|---|---|",
        ]
        for r in record["blackbox"]:
            for row in r["rows"]:
                lines.append(
                    f"| {r['model']} | {row['attack']} | {pct(row['accuracy'])} | "
                    f"{pct(row.get('clean_same_images', r['clean']))} | "
                    f"{row['seconds']:.0f} |"
                )
        lines.append("")
    if "sweep" in record:
        lines += [
            "## Robust accuracy of the smoothed models against eps (rl.evaluate default)",
            "",
            "| model | eps | robust accuracy | ± SE | clean | CPU seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in record["sweep"]:
            lines.append(
                f"| {r['model']} | {r['eps']:.3g} | {pct(r['accuracy'])} | "
                f"{pct(r['se'])} | {pct(r['clean'])} | {r['seconds']:.0f} |"
            )
        lines.append("")
    if "cost" in record:
        lines += [
            "## Attack strength against cost (k steps x m draws)",
            "",
            "| model | attack | k | m | robust accuracy | craft CPU seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in record["cost"]:
            lines.append(
                f"| {r['model']} | {r['attack']} | {r['k']} | {r['m']} | "
                f"{pct(r['accuracy'])} | {r['craft_seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="honest,blackbox,sweep,cost")
    p.add_argument("--models", default="pgd-at,cni")
    p.add_argument("--train-n", type=int, default=15000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cni-epochs", type=int, default=2)
    p.add_argument("--cni-sigma", type=float, default=0.1)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--eot-n", type=int, default=16)
    p.add_argument(
        "--eot-models",
        default="pgd-at",
        help="models that get the EOT row (seed 0 only; it costs the most)",
    )
    p.add_argument("--seed-from", type=int, default=0, help="first seed of the honest part")
    p.add_argument(
        "--rows",
        type=int,
        default=64,
        help="rows per forward of the smoothed model's base model (64: the fastest "
        "on the 2-core CPU, BENCHMARKS.md)",
    )
    p.add_argument("--nattack-pop", type=int, default=50)
    p.add_argument("--nattack-iters", type=int, default=20)
    p.add_argument("--nattack-n", type=int, default=16)
    p.add_argument("--nattack-images", type=int, default=50)
    p.add_argument("--sweep-images", type=int, default=100)
    p.add_argument("--eps-factors", type=floats, default=[0.5, 1.0, 2.0])
    p.add_argument("--cost-images", type=int, default=100)
    p.add_argument(
        "--cost-models",
        default="cni",
        help="models of the cost part (the one where the smoothing's draws matter)",
    )
    p.add_argument("--ks", type=ints, default=[5, 10, 20])
    p.add_argument("--ms", type=ints, default=[1, 4, 16])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 for timings on a shared machine",
    )
    p.add_argument("--fresh", action="store_true", help="recompute cached rows")
    p.add_argument("--stem", default="smoothed_eval")
    args = p.parse_args()
    parts = args.parts.split(",")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # CNI weight noise draws from the global generator
    recs = recipes(
        argparse.Namespace(
            train_n=args.train_n,
            epochs=args.epochs,
            cni_epochs=args.cni_epochs,
            cni_sigma=args.cni_sigma,
            cert_sigmas=[],
        )
    )
    models = {name: trained_model(name, recs[name], log=log) for name in args.models.split(",")}
    x_test, y_test = rl.data.load("fashion-mnist", split="test")
    step = len(x_test) // args.images
    x, y = x_test[::step][: args.images], y_test[::step][: args.images]
    tag = f"s{args.sigma:g}-n{args.n}-m{args.m}-k{args.steps}-r{args.repeats}"
    record: dict[str, Any] = {"machine": machine_record(), "args": vars(args), "recipes": recs}
    if "honest" in parts:
        runs = [
            honest_run(name, models[name], x, y, args, s, tag)
            for name in models
            for s in range(args.seed_from, args.seed_from + args.seeds)
        ]
        record["honest_runs"], record["honest"] = runs, summarise_honest(runs)
    if "blackbox" in parts:
        source = trained_model("natural", recs["natural"], log=log)
        record["blackbox"] = [
            cached(
                f"blackbox-{name}-{tag}-{args.images}-{args.nattack_pop}x{args.nattack_iters}"
                f"-n{args.nattack_n}-{args.nattack_images}",
                args.fresh,
                lambda name=name: blackbox_rows(name, models[name], source, x, y, args),
            )
            for name in models
        ]
    if "sweep" in parts:
        xs, ys = x[: args.sweep_images], y[: args.sweep_images]
        record["sweep"] = [
            {"model": name}
            | cached(
                f"sweep-{name}-{tag}-{len(xs)}-{f:g}",
                args.fresh,
                lambda name=name, f=f: sweep_row(models[name], xs, ys, f, args),
            )
            for name in models
            for f in args.eps_factors
        ]
    if "cost" in parts:
        xs, ys = x[: args.cost_images], y[: args.cost_images]
        grid = [("pgd", k, 1) for k in args.ks] + [
            (a, k, m) for a in ("epgd", "smoothadv") for k in args.ks for m in args.ms
        ]
        record["cost"] = []
        for name in args.cost_models.split(","):
            model = models[name]
            clean = judge(smoothed(model, args), xs, ys, args.repeats, 0)
            record["cost"] += [
                {"model": name}
                | cached(
                    f"cost-{name}-{tag}-{len(xs)}-{a}-k{k}-m{m}",
                    args.fresh,
                    lambda model=model, clean=clean, a=a, k=k, m=m: cost_row(
                        model, xs, ys, clean, a, k, m, args
                    ),
                )
                for a, k, m in grid
            ]
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
