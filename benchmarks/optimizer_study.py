"""The optimiser-susceptibility study (issue 20, item 6): PGD's inner maximisation solved with
different step rules (``robustlab.attacks.optimizers``) under one threat model and budget, on the
Fashion-MNIST ``natural`` and ``pgd-at`` smallcnn models of the benchmarks.

Threat linf, eps 0.1; ``--images`` test points (every ``10000 / images``-th); cross-entropy loss;
one random start per point, the same for every rule (a generator seeded by ``--seed`` at each
call); no early stop, no best-iterate keeping: the curves are those of the optimiser's own
iterate. PGD has no per-step callback, so each checkpoint k of ``--checkpoints`` is a run of its
own with ``steps=k`` (the plain loop is deterministic, so the k-step run's iterate is the k-th
iterate of the longest run). Per checkpoint: the mean CE loss and the attack success rate
(misclassified) of that iterate.

Rules: ``sign`` (Madry et al.'s PGD, the reference) and ``adam`` take the steepest (sign) step of
their direction; ``sgd``, ``rmsprop``, ``adagrad`` and ``ftrl`` take their own update with
``step_size`` as the learning rate. Each rule runs at every step size of its grid (:data:`GRIDS`,
spread around the scale where its steps move a pixel by about 0.01 on these models); the table
shows the best (highest success rate at the last checkpoint, then highest loss).

Per (model, rule, step size), one row, cached in ``benchmarks/.cache/optimizer_study/`` as it
finishes (``--fresh`` recomputes). Outputs ``benchmarks/results/<stem>.md/.json/.png``. Times are
CPU seconds of this process (``time.process_time``) for the longest run; ``--threads`` defaults
to 1. Run from the repository root: ``.venv/bin/python benchmarks/optimizer_study.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import CACHE_DIR, RESULTS_DIR, machine_record, trained_model, write_results
from smoothed_eval import cached, cpu_seconds, pct
from smoothing import log, recipes
from torch import Tensor, nn

import robustlab as rl

ROWS = CACHE_DIR / "optimizer_study"
THREAT = rl.ThreatModel("linf", 0.1)
#: step sizes per rule: lp step length for the steepest rules, learning rate for the others
GRIDS: dict[str, tuple[float, ...]] = {
    "sign": (0.0025, 0.01, 0.025),
    "adam": (0.0025, 0.01, 0.025),
    "sgd": (10.0, 100.0, 1000.0, 10000.0),
    "rmsprop": (0.001, 0.0025, 0.01, 0.025),
    "adagrad": (0.01, 0.025, 0.1, 0.25),
    "ftrl": (1.0, 10.0, 100.0, 1000.0),
}
CLAIM = (
    "The practical-robustness tutorial: Adam and RMSProp fall prey more easily (reach a "
    "high loss fast); SGD, Adagrad and FTRL do not."
)
FAST, SLOW = ("adam", "rmsprop"), ("sgd", "adagrad", "ftrl")


def check_update_rules(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Refuse to run where PGD takes the sign step of an update rule's direction (a robustlab
    without the update-rule step): sgd would then be sign-PGD under another name."""
    opts = {"steps": 1, "step_size": 1e-3, "random_start": False, "keep_best": False}
    sgd = rl.attacks.create("pgd", THREAT, optimizer="sgd", **opts)(model, x, y).x_adv
    sign = rl.attacks.create("pgd", THREAT, **opts)(model, x, y).x_adv
    if torch.equal(sgd, sign):
        raise RuntimeError(
            "PGD took the sign step for optimizer='sgd': this robustlab's "
            "attacks/pgd.py does not apply the update rules' own step "
            "(StepRule.steepest False); update it before running the study"
        )


def row(
    model: nn.Module, x: Tensor, y: Tensor, rule: str, lr: float, args: argparse.Namespace
) -> dict[str, Any]:
    curve = []
    for k in args.checkpoints:
        atk = rl.attacks.create(
            "pgd",
            THREAT,
            optimizer=rule,
            steps=k,
            step_size=lr,
            keep_best=False,
            early_stop=False,
            random_start=True,
        )
        gen = torch.Generator().manual_seed(args.seed)
        res, sec = cpu_seconds(lambda atk=atk, gen=gen: atk(model, x, y, generator=gen))
        curve.append(
            {
                "steps": k,
                "loss": float(res.loss.mean()),
                "success": float(res.success.float().mean()),
                "seconds": sec,
            }
        )
    log(f"{rule} lr {lr:g}: loss {curve[-1]['loss']:.3f}, success {pct(curve[-1]['success'])}")
    return {"optimizer": rule, "step_size": lr, "curve": curve}


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest success rate at the last checkpoint, then the highest loss."""
    return max(rows, key=lambda r: (r["curve"][-1]["success"], r["curve"][-1]["loss"]))


def at(r: dict[str, Any], k: int, what: str) -> float | None:
    return next((c[what] for c in r["curve"] if c["steps"] == k), None)


def fig(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def verdict(bests: dict[str, dict[str, dict[str, Any]]], k: int) -> dict[str, Any]:
    """Per model: reproduced if each of Adam and RMSProp has a higher mean loss after ``k``
    steps than each of SGD, Adagrad and FTRL (best step size each); refuted if each of those
    three is at least as high as each of the two; mixed otherwise. Overall: the per-model
    verdict if both agree, else mixed."""
    per = {}
    for m, b in bests.items():
        fast = [at(b[o], k, "loss") for o in FAST if o in b]
        slow = [at(b[o], k, "loss") for o in SLOW if o in b]
        if not fast or not slow or None in fast + slow:
            per[m] = "not run"
        elif min(fast) > max(slow):
            per[m] = "reproduced"
        elif min(slow) >= max(fast):
            per[m] = "refuted"
        else:
            per[m] = "mixed"
    verdicts = set(per.values())
    overall = verdicts.pop() if len(verdicts) == 1 else "mixed"
    return {
        "rule": " ".join(verdict.__doc__.split()),
        "steps": k,
        "per_model": per,
        "overall": overall,
    }


def plot(bests: dict[str, dict[str, dict[str, Any]]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(bests), figsize=(5 * len(bests), 7), squeeze=False)
    for j, (m, b) in enumerate(bests.items()):
        for r in b.values():
            ks = [c["steps"] for c in r["curve"]]
            label = f"{r['optimizer']} ({r['step_size']:g})"
            axes[0][j].plot(ks, [c["loss"] for c in r["curve"]], marker="o", label=label)
            axes[1][j].plot(ks, [100 * c["success"] for c in r["curve"]], marker="o", label=label)
        axes[0][j].set_title(f"{m}: mean CE loss")
        axes[1][j].set_title(f"{m}: attack success rate (%)")
        for ax in axes[:, j]:
            ax.set_xscale("log")
            ax.set_xlabel("PGD iterations")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.suptitle("linf eps 0.1, best step size per optimiser (in parentheses)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(record: dict[str, Any]) -> str:
    m, a, v = record["machine"], record["args"], record["verdict"]
    per = ", ".join(f"{k}: {x}" for k, x in v["per_model"].items())
    last, k10 = a["checkpoints"][-1], 10
    lines = [
        "# Optimiser susceptibility of PGD's inner maximisation (linf 0.1, Fashion-MNIST smallcnn)",
        "",
        f"`{m['command']}` · {m['date']} · commit {m['robustlab_commit']} · torch "
        f"{m['torch']} · {m['nproc']} cores ({m['cpu']}) · {a['threads']} thread(s)",
        "",
        f"{a['images']} test points, one random start per point (seed {a['seed']}), CE "
        f"loss, the optimiser's own iterate (no early stop, no best-iterate keeping). "
        "Best step size of each rule's grid (highest success rate after "
        f"{last} steps, then highest loss); success in %; CPU s of the {last}-step run.",
        "",
        f"| model | optimiser | best step size | grid | loss @{k10} | loss @{last} | "
        f"success @{k10} | success @{last} | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, b in record["best"].items():
        for r in b.values():
            c = r["curve"][-1]
            grid = ", ".join(f"{s:g}" for s in GRIDS[r["optimizer"]])
            lines.append(
                f"| {model} | {r['optimizer']} | {r['step_size']:g} | {grid} | "
                f"{fig(at(r, k10, 'loss'))} | {c['loss']:.3f} | "
                f"{pct(at(r, k10, 'success'))} | {pct(c['success'])} | "
                f"{c['seconds']:.1f} |"
            )
    lines += [
        "",
        f"**Claim.** {record['claim']}",
        "",
        f"**Verdict: {v['overall']}** ({per}). Rule: {v['rule']}",
        "",
        "## Notes",
        "",
    ]
    lines += [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="natural,pgd-at")
    p.add_argument("--optimizers", default=",".join(GRIDS))
    p.add_argument("--images", type=int, default=200)
    p.add_argument(
        "--checkpoints",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 2, 5, 10, 20, 50, 100],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-n", type=int, default=15000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="recompute cached rows")
    p.add_argument("--note", action="append", default=[], help="a line for the record")
    p.add_argument("--stem", default="optimizer_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recs = recipes(
        argparse.Namespace(
            train_n=args.train_n, epochs=args.epochs, cni_epochs=2, cni_sigma=0.1, cert_sigmas=[]
        )
    )
    x_test, y_test = rl.data.load("fashion-mnist", split="test")
    step = len(x_test) // args.images
    x, y = x_test[::step][: args.images], y_test[::step][: args.images]
    record: dict[str, Any] = {
        "machine": machine_record(),
        "args": vars(args),
        "threat": THREAT.to_dict(),
        "grids": GRIDS,
        "claim": CLAIM,
        "rows": [],
        "best": {},
        "notes": [
            "adam is PGD's existing rule: the sign step of Adam's direction, not Adam's "
            "own update (sgd, rmsprop, adagrad and ftrl take their own update)",
            "ftrl works on the perturbation delta = x_adv - x, TensorFlow's defaults "
            "(initial accumulator 0.1, l1 = l2 = 0); its accumulator's weight pulls "
            "towards the clean point",
            *args.note,
        ],
    }
    for mname in args.models.split(","):
        model = trained_model(mname, recs[mname], log=log)
        check_update_rules(model, x[:8], y[:8])
        rows = []
        for rule in args.optimizers.split(","):
            for lr in GRIDS[rule]:
                key = f"{mname}-{rule}-{lr:g}-{args.images}-s{args.seed}-" + "-".join(
                    map(str, args.checkpoints)
                )
                r = cached(
                    key,
                    args.fresh,
                    lambda model=model, rule=rule, lr=lr: row(model, x, y, rule, lr, args),
                    ROWS,
                )
                rows.append({"model": mname} | r)
        record["rows"] += rows
        record["best"][mname] = {
            o: best([r for r in rows if r["optimizer"] == o]) for o in args.optimizers.split(",")
        }
    record["verdict"] = verdict(record["best"], 10)
    png = RESULTS_DIR / f"{args.stem}.png"
    plot(record["best"], png)
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}, {png}")


if __name__ == "__main__":
    main()
