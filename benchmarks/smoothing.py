"""Smoothed inference and certification on Fashion-MNIST: does smoothing raise clean and
adversarial accuracy, which vote is best, which attack number is the honest one, what do the
certificates say, and what does it cost.

Five parts (``--parts``), one record (``benchmarks/results/<stem>.md/.json``) and plots
(``<stem>_*.png``):

1. ``grid``: a PGD-AT smallcnn (linf eps 0.1) and a CNI-I+W model (CNI weight noise, fine-tuned
   from it with the ``noise-at`` objective) smoothed with Gaussian noise sigma over ``--sigmas``
   and n over ``--ns`` draws, each voting rule; accuracy on clean inputs, under PGD on the base
   model and under EPGD (both linf 0.1 and l2 ``--l2-eps``), mean and std over ``--seeds``
   seeds (a seed fixes the attack's and the smoothing's randomness). All n and votes of one
   (model, sigma, input set) come from the same max(n) draws: a smaller n uses the first n.
2. ``attacks``: one smoothed classifier per model (``--attack-sigma``, prediction vote,
   ``--attack-n`` draws) against attacks that ignore the smoothing and attacks that target it;
   the honest figure is the per-sample worst case over the adaptive ones.
3. ``certify``: Cohen et al.'s CERTIFY on Gaussian-augmented models at ``--cert-sigmas``:
   certified accuracy vs l2 radius and the average certified radius.
4. ``throughput``: images/s of the smoothed model against the limit (the base model's best
   images/s over ``--batch-sizes``, divided by n).
5. ``denoised``: denoised smoothing (Salman et al. 2020): a naturally trained classifier
   certified alone, behind an MSE-trained denoiser and behind an MSE-then-Stab denoiser,
   against a Gaussian-augmented model at the same sigma.

Run from the repository root: ``.bench-venv/bin/python benchmarks/smoothing.py`` (the defaults
are the issue's full budget: hours on a 2-core CPU; the flags shrink it, and the record says
which were used).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE_DIR,
    RESULTS_DIR,
    _recipe_key,
    interleaved,
    machine_record,
    median,
    trained_model,
    write_results,
)
from torch import Tensor, nn

import robustlab as rl
from robustlab.defenses import Smoothing
from robustlab.defenses.denoise import Denoised
from robustlab.evaluation.certification import run_certification
from robustlab.evaluation.smoothing_curves import draw_logits, vote_decisions
from robustlab.models.dncnn import Denoiser, load_denoiser
from robustlab.noise import sample
from robustlab.training.denoiser import train_denoiser

VOTES = ("prediction", "soft", "weighted")
DATASET = "fashion-mnist"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


# --- models ------------------------------------------------------------------------------------
def recipes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    base = {
        "arch": "smallcnn",
        "dataset": DATASET,
        "train_n": args.train_n,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "seed": 0,
    }
    pgd = base | {
        "objective": "pgd-at",
        "eps": 0.1,
        "epochs": args.epochs,
        "objective_options": {"steps": 10, "step_size": 0.025},
    }
    pgd_path = CACHE_DIR / f"pgd-at-{_recipe_key(pgd)}.safetensors"
    cni = base | {
        "objective": "noise-at",
        "eps": 0.1,
        "epochs": args.cni_epochs,
        "lr": 0.01,
        "grad_clip": 1.0,
        "model": {"noise": "cni-w", "noise_options": {"init": 0.1, "factor_init": 1e-3}},
        "init": str(pgd_path.relative_to(Path.cwd())),
        "objective_options": {
            "sigma": args.cni_sigma,
            "attack": "pgd",
            "steps": 7,
            "step_size": 0.025,
        },
    }
    out = {
        "pgd-at": pgd,
        "cni": cni,
        "natural": base | {"objective": "natural", "epochs": args.epochs},
    }
    for s in args.cert_sigmas:
        out[f"gauss-{s:g}"] = base | {
            "objective": "gaussian-aug",
            "epochs": args.epochs,
            "objective_options": {"sigma": s},
        }
    return out


def is_random(model: nn.Module, x: Tensor) -> bool:
    with torch.no_grad():
        return not torch.equal(model(x[:8]), model(x[:8]))


# --- part 1: the grid --------------------------------------------------------------------------
def grid(
    models: dict[str, nn.Module], x: Tensor, y: Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    threats = {"linf": rl.ThreatModel("linf", 0.1), "l2": rl.ThreatModel("l2", args.l2_eps)}
    for name, model in models.items():
        random_model = is_random(model, x)
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(seed)
            adv = {}
            for norm, threat in threats.items():
                pgd = rl.attacks.create("pgd", threat, steps=args.steps)
                adv[f"pgd-{norm}"] = pgd(model, x, y, generator=gen).x_adv
            for sigma in args.sigmas:
                sets = {"clean": x, **adv}
                for norm, threat in threats.items():
                    if sigma == 0 and not random_model:
                        sets[f"epgd-{norm}"] = adv[f"pgd-{norm}"]  # no noise: EPGD is PGD
                        continue
                    epgd = rl.attacks.create(
                        "epgd",
                        threat,
                        sigma=sigma,
                        samples=args.epgd_m,
                        steps=args.steps,
                        step_size=2.5 * threat.eps / args.steps,
                    )
                    sets[f"epgd-{norm}"] = epgd(model, x, y, generator=gen).x_adv
                draws = 1 if sigma == 0 and not random_model else max(args.ns)
                correct: dict[tuple[str, int, str], Tensor] = {}
                for set_name, xs in sets.items():
                    logits = draw_logits(model, xs, sigma, draws, gen, batch_size=4096)
                    for n in args.ns:
                        for vote, pred in vote_decisions(logits, min(n, draws)).items():
                            correct[set_name, n, vote] = pred == y
                for (set_name, n, vote), ok in list(correct.items()):
                    rows.append(
                        {
                            "model": name,
                            "seed": seed,
                            "sigma": sigma,
                            "set": set_name,
                            "n": n,
                            "vote": vote,
                            "accuracy": ok.float().mean().item(),
                        }
                    )
                    if set_name.startswith("epgd"):  # worst case of PGD and EPGD per sample
                        both = ok & correct[set_name.replace("epgd", "pgd"), n, vote]
                        rows.append(
                            {
                                "model": name,
                                "seed": seed,
                                "sigma": sigma,
                                "set": set_name.replace("epgd", "worst"),
                                "n": n,
                                "vote": vote,
                                "accuracy": both.float().mean().item(),
                            }
                        )
            log(f"grid {name} seed {seed}: {time.perf_counter() - t0:.0f} s")
    return rows


def summarise_grid(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[r["model"], r["sigma"], r["set"], r["n"], r["vote"]].append(r["accuracy"])
    return [
        {
            "model": m,
            "sigma": s,
            "set": st,
            "n": n,
            "vote": v,
            "mean": statistics.fmean(a),
            "std": statistics.stdev(a) if len(a) > 1 else 0.0,
            "seeds": len(a),
        }
        for (m, s, st, n, v), a in groups.items()
    ]


# --- part 2: attacks that know the smoothing against those that do not --------------------------
class NoisyInput(nn.Module):
    """The base model with one fresh input-noise draw per forward (a single-draw view)."""

    def __init__(self, model: nn.Module, sigma: float, gen: torch.Generator) -> None:
        super().__init__()
        self.model, self.sigma, self.gen = model, sigma, gen

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + sample(x, "gaussian", self.sigma, self.gen))


def attacks_part(
    models: dict[str, nn.Module], x: Tensor, y: Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    threat = rl.ThreatModel("linf", 0.1)
    sigma, n, steps = args.attack_sigma, args.attack_n, args.steps
    step = 2.5 * threat.eps / steps
    for name, model in models.items():
        gen = torch.Generator().manual_seed(0)
        smooth = Smoothing(model, sigma=sigma, samples=n, vote="prediction", batch_size=4096)
        crafted = {
            "none (clean)": x,
            "PGD on the base model": rl.attacks.create("pgd", threat, steps=steps)(
                model, x, y, generator=gen
            ).x_adv,
            "PGD, one noise draw per step": rl.attacks.create("pgd", threat, steps=steps)(
                NoisyInput(model, sigma, gen), x, y, generator=gen
            ).x_adv,
            f"EPGD (m={args.epgd_m})": rl.attacks.create(
                "epgd", threat, samples=args.epgd_m, steps=steps, step_size=step
            )(smooth, x, y, generator=gen).x_adv,
            f"SmoothAdv (m={args.epgd_m})": rl.attacks.create(
                "smoothadv", threat, samples=args.epgd_m, steps=steps, step_size=step
            )(smooth, x, y, generator=gen).x_adv,
        }
        correct = {}
        for attack, xs in crafted.items():
            accs, oks = [], []
            for rep in range(args.repeats):
                with torch.no_grad():
                    pred = smooth.eval()(xs, torch.Generator().manual_seed(1000 + rep)).argmax(1)
                oks.append(pred == y)
                accs.append(oks[-1].float().mean().item())
            correct[attack] = torch.stack(oks).float().mean(0) > 0.5  # robust in most repeats
            rows.append(
                {
                    "model": name,
                    "attack": attack,
                    "accuracy": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "adaptive": attack.startswith(("EPGD", "SmoothAdv")),
                }
            )
        worst = torch.stack([ok for a, ok in correct.items() if a != "none (clean)"]).all(0)
        rows.append(
            {
                "model": name,
                "attack": "worst case of the four (per sample)",
                "accuracy": worst.float().mean().item(),
                "std": 0.0,
                "adaptive": True,
            }
        )
        # EOT through the evaluation suite: APGD-CE on the smoothed module itself (its backward
        # is the soft smoothed classifier's), gradients averaged over draws, repeated predictions
        eot_model = Smoothing(
            model, sigma=sigma, samples=args.eot_n, vote="prediction", batch_size=4096
        )
        res = rl.evaluate(
            eot_model,
            x,
            y,
            threat,
            attacks=[("apgd-ce", {"steps": steps, "eot": args.eot})],
            seed=0,
            repeats=args.repeats,
        )
        rows.append(
            {
                "model": name,
                "attack": f"EOT APGD-CE via rl.evaluate (n={args.eot_n}, eot={args.eot})",
                "accuracy": res.robust_accuracy,
                "std": 0.0,
                "adaptive": True,
                "flags": [f["name"] for f in res.flags],
            }
        )
        log(f"attacks {name}: done")
    return rows


# --- part 3: certification ---------------------------------------------------------------------
def certify_part(
    models: dict[str, nn.Module], x: Tensor, y: Tensor, idx: Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    out = []
    for sigma in args.cert_sigmas:
        model = models[f"gauss-{sigma:g}"]
        t0 = time.perf_counter()
        summary = run_certification(
            model,
            x,
            y,
            sigma=sigma,
            n0=100,
            n=args.cert_n,
            alpha=0.001,
            seed=0,
            batch_size=args.cert_batch,
            indices=idx.tolist(),
            resume=True,
            out=CACHE_DIR / "smoothing" / f"certify-{sigma:g}-{args.cert_n}-{len(x)}",
        )
        summary = {k: v for k, v in summary.items() if k not in ("versions",)}
        out.append({"sigma": sigma, **summary})
        log(
            f"certify sigma {sigma:g}: ACR {summary['average_certified_radius']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


# --- part 5: denoised smoothing ----------------------------------------------------------------
def denoised_part(
    x: Tensor, y: Tensor, idx: Tensor, args: argparse.Namespace, recs: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Certify a naturally trained classifier alone, behind an MSE denoiser and behind an
    MSE-then-Stab denoiser (Salman et al. 2020), against a Gaussian-augmented model."""
    sigma = args.den_sigma
    natural = trained_model("natural", recs["natural"], log=log)
    x_train, _ = rl.data.load(DATASET, split="train", n=args.train_n)
    root = CACHE_DIR / "smoothing" / f"denoiser-{sigma:g}-{args.train_n}"
    t0 = time.perf_counter()
    train_denoiser(Denoiser(), x_train, sigma=sigma, epochs=args.den_epochs, out=root / "mse")
    mse = load_denoiser(root / "mse" / "denoiser.safetensors")
    stab = load_denoiser(root / "mse" / "denoiser.safetensors")
    train_denoiser(
        stab,
        x_train,
        sigma=sigma,
        epochs=args.den_stab_epochs,
        objective="stab",
        classifier=natural,
        out=root / "stab",
    )
    stab = load_denoiser(root / "stab" / "denoiser.safetensors")
    log(f"denoisers: {time.perf_counter() - t0:.0f} s")
    candidates = {
        "natural classifier, no denoiser": natural,
        "natural classifier + MSE denoiser": Denoised(natural, mse),
        "natural classifier + MSE, then Stab denoiser": Denoised(natural, stab),
        f"gaussian-aug sigma {sigma:g} (trained for noise)": trained_model(
            f"gauss-{sigma:g}", recs[f"gauss-{sigma:g}"], log=log
        ),
    }
    rows = []
    for name, model in candidates.items():
        tag = name.split(",")[0].split(" (")[0].replace(" ", "_")
        summary = run_certification(
            model.eval(),
            x,
            y,
            sigma=sigma,
            n0=100,
            n=args.den_cert_n,
            alpha=0.001,
            seed=0,
            batch_size=args.cert_batch,
            indices=idx.tolist(),
            resume=True,
            out=root / f"certify-{tag}-{args.den_cert_n}-{len(x)}",
        )
        rows.append(
            {"model": name, "sigma": sigma, **{k: v for k, v in summary.items() if k != "versions"}}
        )
        log(f"denoised {name}: ACR {summary['average_certified_radius']:.3f}")
    return rows


# --- part 4: throughput ------------------------------------------------------------------------
def throughput(model: nn.Module, x: Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Base images/s at its best batch size (of ``--batch-sizes``), then the smoothed model's
    images/s with that many noisy rows per forward, for every n; ratio to base / n."""

    def forward(batch: Tensor) -> Any:
        def run() -> None:
            with torch.no_grad():
                model(batch)

        return run

    sizes = args.batch_sizes
    base_tasks = {f"base b={b}": forward(x[:b]) for b in sizes}
    interleaved(base_tasks, 1)  # warm-up
    times, _ = interleaved(base_tasks, args.timing_repeats)
    rates = {b: b / median(times[f"base b={b}"]) for b in sizes}
    best = max(rates, key=rates.get)
    images = {n: max(1, min(len(x), best * 4 // n)) for n in args.ns}
    tasks = {"base": forward(x[:best])}
    for n in args.ns:
        smooth = Smoothing(model, sigma=0.25, samples=n, batch_size=best)

        def run(smooth=smooth, xs=x[: images[n]]) -> None:
            with torch.no_grad():
                smooth(xs)

        tasks[f"n={n}"] = run
    interleaved(tasks, 1)  # warm-up
    times, _ = interleaved(tasks, args.timing_repeats)
    base_rate = best / median(times["base"])
    rows = [
        {"n": 0, "batch": b, "images_per_s": r, "limit": r, "ratio": r / base_rate}
        for b, r in rates.items()
    ]
    rows.append(
        {"n": 0, "batch": best, "images_per_s": base_rate, "limit": base_rate, "ratio": 1.0}
    )
    for n in args.ns:
        rate = images[n] / median(times[f"n={n}"])
        rows.append(
            {
                "n": n,
                "batch": best,
                "images_per_s": rate,
                "limit": base_rate / n,
                "ratio": rate / (base_rate / n),
            }
        )
    return rows


# --- output ------------------------------------------------------------------------------------
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(record: dict[str, Any]) -> str:
    a = record["args"]
    m = record["machine"]
    lines = [
        "# Smoothed inference and certification (Fashion-MNIST)",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, robustlab commit "
        f"{m['robustlab_commit']} (src changes: {m['src_changes'] or 'none'})",
        "",
    ]
    if "grid" in record:
        lines += [
            f"## 1. Accuracy of the smoothed classifier vs n, sigma and vote "
            f"(mean ± std over {a['seeds']} seeds, {a['images']} test images)",
            "",
            f"Attacks: PGD-{a['steps']} on the base model and EPGD-{a['steps']} "
            f"(m = {a['epgd_m']}), linf 0.1 and l2 {a['l2_eps']}; `worst` = correct under "
            "both. The smoothed classifier then classifies the attacked inputs.",
            "",
        ]
        summary = record["grid"]
        for model in dict.fromkeys(r["model"] for r in summary):
            for set_name in (
                "clean",
                "pgd-linf",
                "epgd-linf",
                "worst-linf",
                "pgd-l2",
                "epgd-l2",
                "worst-l2",
            ):
                sub = [r for r in summary if r["model"] == model and r["set"] == set_name]
                if not sub:
                    continue
                lines += [
                    f"**{model}, {set_name}**",
                    "",
                    "| sigma | vote | " + " | ".join(f"n={n}" for n in a["ns"]) + " |",
                    "|---|---|" + "---|" * len(a["ns"]),
                ]
                for sigma in a["sigmas"]:
                    for vote in VOTES:
                        cells = []
                        for n in a["ns"]:
                            r = next(
                                r
                                for r in sub
                                if r["sigma"] == sigma and r["vote"] == vote and r["n"] == n
                            )
                            cells.append(f"{pct(r['mean'])} ± {pct(r['std'])}")
                        lines.append(f"| {sigma:g} | {vote} | " + " | ".join(cells) + " |")
                        if sigma == 0:
                            break  # without noise every vote and n is the base model
                lines.append("")
    if "attacks" in record:
        lines += [
            f"## 2. Which attack number is honest (linf 0.1, sigma {a['attack_sigma']}, "
            f"prediction vote, n = {a['attack_n']}, {a['images']} images)",
            "",
            f"Accuracy of the smoothed classifier on each attack's inputs, mean ± std "
            f"over {a['repeats']} repeated predictions.",
            "",
            "| model | attack | knows the smoothing | accuracy | flags |",
            "|---|---|---|---|---|",
        ]
        for r in record["attacks"]:
            lines.append(
                f"| {r['model']} | {r['attack']} | {'yes' if r['adaptive'] else 'no'} "
                f"| {pct(r['accuracy'])} ± {pct(r['std'])} | "
                f"{', '.join(r.get('flags', [])) or '-'} |"
            )
        lines.append("")
    if "certify" in record:
        lines += [
            f"## 3. Certified accuracy vs l2 radius (Gaussian augmentation, n0 = 100, "
            f"N = {a['cert_n']}, alpha = 0.001, {a['cert_images']} test images)",
            "",
        ]
        radii = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
        lines += [
            "| sigma | clean (smoothed) | abstain | "
            + " | ".join(f"r={r:g}" for r in radii)
            + " | ACR | s/image |",
            "|---|---|---|" + "---|" * len(radii) + "---|---|",
        ]
        for c in record["certify"]:
            curve = {round(p["radius"], 2): p["accuracy"] for p in c["certified_accuracy"]}
            cells = [pct(curve.get(r, 0.0)) for r in radii]
            lines.append(
                f"| {c['sigma']:g} | {pct(c['clean_accuracy'])} | "
                f"{pct(c['abstain_rate'])} | "
                + " | ".join(cells)
                + f" | {c['average_certified_radius']:.3f} | "
                f"{c['seconds'] / c['n']:.2f} |"
            )
        lines.append("")
    if "denoised" in record:
        lines += [
            f"## 5. Denoised smoothing: certifying a classifier not trained for noise "
            f"(sigma {a['den_sigma']}, N = {a['den_cert_n']}, {a['cert_images']} test "
            "images)",
            "",
            "| base model | clean (smoothed) | abstain | r=0.25 | r=0.5 | ACR |",
            "|---|---|---|---|---|---|",
        ]
        for c in record["denoised"]:
            curve = {round(p["radius"], 2): p["accuracy"] for p in c["certified_accuracy"]}
            lines.append(
                f"| {c['model']} | {pct(c['clean_accuracy'])} | "
                f"{pct(c['abstain_rate'])} | {pct(curve.get(0.25, 0.0))} | "
                f"{pct(curve.get(0.5, 0.0))} | {c['average_certified_radius']:.3f} |"
            )
        lines.append("")
    if "throughput" in record:
        lines += [
            "## 4. Cost: smoothed images/s vs the limit (base images/s / n)",
            "",
            "Base rows: the base model at each batch size (first round of timing); the "
            "limit is the best one, re-timed alongside the smoothed model, which puts "
            "that many noisy rows in each forward.",
            "",
            "| n | rows per forward | images/s | limit | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in record["throughput"]:
            lines.append(
                f"| {r['n'] or 'base'} | {r['batch']} | {r['images_per_s']:.1f} | "
                f"{r['limit']:.1f} | {r['ratio']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plots(record: dict[str, Any], stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, written = record["args"], []
    if "grid" in record:
        summary = record["grid"]
        models = list(dict.fromkeys(r["model"] for r in summary))
        sets = ["clean", "worst-linf", "worst-l2"]
        fig, axes = plt.subplots(
            len(models),
            len(sets),
            figsize=(4 * len(sets), 3.2 * len(models)),
            squeeze=False,
            sharex=True,
        )
        styles = {"prediction": "-", "soft": "--", "weighted": ":"}
        for i, model in enumerate(models):
            for j, set_name in enumerate(sets):
                ax = axes[i][j]
                for k, sigma in enumerate(a["sigmas"]):
                    for vote in VOTES if sigma else ("prediction",):
                        pts = sorted(
                            (r["n"], r["mean"], r["std"])
                            for r in summary
                            if r["model"] == model
                            and r["set"] == set_name
                            and r["sigma"] == sigma
                            and r["vote"] == vote
                        )
                        ax.errorbar(
                            [p[0] for p in pts],
                            [100 * p[1] for p in pts],
                            [100 * p[2] for p in pts],
                            color=f"C{k}",
                            ls=styles[vote],
                            label=f"sigma {sigma:g} {vote}" if sigma else "sigma 0 (base)",
                            capsize=2,
                        )
                ax.set_xscale("log", base=2)
                ax.set_title(f"{model}: {set_name}")
                ax.set_xlabel("n (draws)")
                ax.set_ylabel("accuracy (%)")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, f"{stem}_grid.png"))
    if "certify" in record:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for c in record["certify"]:
            pts = c["certified_accuracy"]
            ax.plot(
                [p["radius"] for p in pts],
                [100 * p["accuracy"] for p in pts],
                label=f"sigma {c['sigma']:g} (ACR {c['average_certified_radius']:.2f})",
            )
        ax.set_xlabel("l2 radius")
        ax.set_ylabel("certified accuracy (%)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, f"{stem}_certified.png"))
    if "throughput" in record:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        pts = [r for r in record["throughput"] if r["n"]]
        ax.plot([r["n"] for r in pts], [r["ratio"] for r in pts], "o-")
        ax.axhline(0.9, color="grey", ls="--", label="target 0.9")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (draws)")
        ax.set_ylabel("throughput / (base / n)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, f"{stem}_throughput.png"))
    return written


def _save(fig: Any, name: str) -> str:
    path = RESULTS_DIR / name
    fig.savefig(path, dpi=110)
    return str(path.relative_to(RESULTS_DIR.parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="grid,attacks,certify,denoised,throughput")
    p.add_argument(
        "--models",
        default="pgd-at,cni",
        help="models of the grid and attacks parts (pgd-at is always built for "
        "cni's init and for throughput)",
    )
    p.add_argument("--train-n", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--cni-epochs", type=int, default=5)
    p.add_argument("--cni-sigma", type=float, default=0.1)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sigmas", type=floats, default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--ns", type=ints, default=[1, 4, 16, 64, 256])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epgd-m", type=int, default=8)
    p.add_argument("--l2-eps", type=float, default=1.0)
    p.add_argument("--attack-sigma", type=float, default=0.1)
    p.add_argument("--attack-n", type=int, default=64)
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--eot-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cert-sigmas", type=floats, default=[0.12, 0.25, 0.5])
    p.add_argument("--cert-n", type=int, default=100_000)
    p.add_argument("--cert-images", type=int, default=500)
    p.add_argument("--cert-batch", type=int, default=2000)
    p.add_argument("--den-sigma", type=float, default=0.25)
    p.add_argument("--den-epochs", type=int, default=10, help="MSE epochs of the denoiser")
    p.add_argument("--den-stab-epochs", type=int, default=5, help="Stab fine-tuning epochs")
    p.add_argument("--den-cert-n", type=int, default=10_000)
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument(
        "--batch-sizes",
        type=ints,
        default=[64, 256, 1024, 4096],
        help="batch sizes tried for the base model's throughput",
    )
    p.add_argument("--stem", default="smoothing")
    args = p.parse_args()
    parts = args.parts.split(",")
    torch.manual_seed(0)  # PNI/CNI weight noise draws from the global generator
    record: dict[str, Any] = {
        "machine": machine_record(),
        "args": vars(args) | {"cert_images": args.cert_images},
    }
    recs = recipes(args)
    x_test, y_test = rl.data.load(DATASET, split="test")
    idx = torch.arange(0, len(x_test), len(x_test) // args.images)[: args.images]
    x, y = x_test[idx], y_test[idx]
    models = {}
    if {"grid", "attacks", "throughput"} & set(parts) and "pgd-at" in args.models:
        models["pgd-at"] = trained_model("pgd-at", recs["pgd-at"], log=log)
    if {"grid", "attacks"} & set(parts) and "cni" in args.models:
        models["cni"] = trained_model("cni", recs["cni"], log=log)
    record["recipes"] = recs
    if "grid" in parts:
        record["grid_rows"] = grid(models, x, y, args)
        record["grid"] = summarise_grid(record["grid_rows"])
    if "attacks" in parts:
        record["attacks"] = attacks_part(models, x, y, args)
    if "certify" in parts:
        cert_models = {
            f"gauss-{s:g}": trained_model(f"gauss-{s:g}", recs[f"gauss-{s:g}"], log=log)
            for s in args.cert_sigmas
        }
        cidx = torch.arange(0, len(x_test), len(x_test) // args.cert_images)[: args.cert_images]
        record["certify"] = certify_part(cert_models, x_test[cidx], y_test[cidx], cidx, args)
    if "denoised" in parts:
        cidx = torch.arange(0, len(x_test), len(x_test) // args.cert_images)[: args.cert_images]
        record["denoised"] = denoised_part(x_test[cidx], y_test[cidx], cidx, args, recs)
    if "throughput" in parts:
        base = models.get("pgd-at") or trained_model("pgd-at", recs["pgd-at"], log=log)
        record["throughput"] = throughput(base, x_test, args)
    record["plots"] = plots(record, args.stem)
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}, plots {', '.join(record['plots'])}")


if __name__ == "__main__":
    main()
