"""The obfuscated-gradients table on Fashion-MNIST (Athalye, Carlini, Wagner 2018, Table 1 in
spirit): does each input-transformation and gradient-masking defense survive the audit?

Settings that differ from the defenses' defaults, because the defaults were chosen for other
inputs: crop-rescale keeps 75% of the side (the 90/299 crops of Athalye et al.'s ImageNet
reimplementation leave 8x8 pixels of a 28x28 image); mixup inference mixes with lam 0.6 (the
paper's setting for interpolated AT; 0.5 assumes a mixup-trained model) over 10 partners (30
in the paper: the cost of each forward); bit-depth reduces to 1 bit (Xu et al.'s MNIST
squeezer).

For each defense, applied to a naturally trained smallcnn (or, where the defense needs its own
model, trained the same way: thermometer encoding on the encoding, k-WTA with k-WTA
activations, defensive distillation at T = 100 from a T = 100 teacher; saturated-softmax
returns ``softmax(100 * logits)`` of the natural smallcnn, which it keeps under a name the
audit does not take for a surrogate), and for a PGD-AT smallcnn, at linf eps 0.1 on the first
``--n`` test points:

- clean accuracy (each point predicted ``repeats`` times on a randomised defense);
- accuracy under plain PGD-20 on the cross-entropy (no BPDA, no EOT: the naive evaluation);
- the audit's robust accuracy (``robustlab.audit``: per-sample worst case over plain PGD,
  APGD-CE and MM with BPDA/EOT as the model needs, Square, NAttack, transfer from the
  undefended model, and a convergence run);
- the checks the audit flagged.

The transfer attack crafts PGD-20 on the defense's undefended base model, or, for the models
that are defenses in themselves (k-WTA, distillation, PGD-AT), on the natural smallcnn; the
thermometer model's base takes the encoding, so it has no surrogate.

The models are the cached ones of ``benchmarks/attack_speed.py`` (natural, PGD-AT) plus three
trained here (cached in ``benchmarks/.cache``). Run from the repository root:
``.venv/bin/python benchmarks/audit.py`` (``--defenses`` picks rows; the record says which
settings were used).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import BENCH_DIR, CACHE_DIR, _recipe_key, machine_record, trained_model, write_results
from attack_speed import _TRAINING, RECIPES
from torch import nn

import robustlab as rl

DATASET = "fashion-mnist"
EPS = 0.1
LEVELS = 16  # thermometer levels (Buckman et al.'s CIFAR setting)

# per-row audit settings that differ from the command line's: mixup inference already
# averages its own partners in every forward, so 4 EOT draws of 10 partners each (40 mixes per
# gradient) stand in for the default 20 draws (200 mixes: 5x the time)
AUDIT_OVERRIDES: dict[str, dict[str, Any]] = {"mixup-inference": {"eot": 4}}

# (row name, defense name or None, defense options, which model it wraps)
ROWS: list[tuple[str, str | None, dict[str, Any], str]] = [
    ("undefended", None, {}, "natural"),
    ("jpeg", "jpeg", {"quality": 75}, "natural"),
    ("bit-depth", "bit-depth", {"bits": 1}, "natural"),
    ("median", "median", {"window": 2}, "natural"),
    ("feature-squeezing", "feature-squeezing", {}, "natural"),
    ("thermometer", "thermometer", {"levels": LEVELS}, "thermometer"),
    ("tv-min", "tv-min", {}, "natural"),
    ("crop-rescale", "crop-rescale", {"ratio": 0.75}, "natural"),
    ("random-resize-pad", "random-resize-pad", {}, "natural"),
    ("mixup-inference", "mixup-inference", {"lam": 0.6, "samples": 10}, "natural"),
    ("k-wta", None, {}, "kwta"),
    ("distillation", None, {}, "distillation"),
    ("saturated-softmax", None, {}, "natural"),
    ("pgd-at", None, {}, "pgd-at"),
]


class SaturatedSoftmax(nn.Module):
    """``softmax(100 * net(x))``: probabilities one-hot to float32 precision on most points,
    so the CE loss of the probabilities and its gradient vanish (issue 26)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net  # not ``base``: no transfer surrogate for the audit to find

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(100 * self.net(x), dim=1)


WRAPPERS: dict[str, type[nn.Module]] = {"saturated-softmax": SaturatedSoftmax}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def thermometer_base(recipe: dict[str, Any]) -> nn.Module:
    """A smallcnn with ``LEVELS`` input channels trained on the thermometer encoding (through
    the defense module, so the encoding is the model's input in training as in testing)."""
    path = CACHE_DIR / f"thermometer-{_recipe_key(recipe)}.safetensors"
    if path.exists():
        log(f"model thermometer: cached {path.name}")
        return rl.models.load(path)
    x, y = rl.data.load(DATASET, split="train")
    base = rl.models.create("smallcnn", in_channels=LEVELS)
    fit = {k: v for k, v in recipe.items() if k not in ("arch", "dataset", "levels")}
    t0 = time.perf_counter()
    rl.training.fit(
        rl.defenses.create("thermometer", base, levels=LEVELS), (x, y), dataset=DATASET, **fit
    )
    seconds = time.perf_counter() - t0
    log(f"model thermometer: trained in {seconds:.0f} s")
    rl.models.save(
        base, path, meta={"recipe": recipe, "train_seconds": seconds, "dataset": DATASET}
    )
    return base


def models(needed: set[str]) -> dict[str, nn.Module]:
    """The ``needed`` base models (trained here unless cached)."""
    natural = RECIPES["natural"]
    build = {
        "natural": lambda: trained_model("smallcnn-natural", natural, log=log),
        "pgd-at": lambda: trained_model("smallcnn-pgd-at", RECIPES["pgd-at"], log=log),
        "kwta": lambda: trained_model(
            "smallcnn-kwta", natural | {"model": {"activation": "kwta"}}, log=log
        ),
        "distillation": _distilled,
        "thermometer": lambda: thermometer_base(natural | {"levels": LEVELS}),
    }
    return {name: build[name]() for name in sorted(needed)}


def _distilled() -> nn.Module:
    teacher_recipe = _TRAINING | {
        "objective": "distillation",
        "epochs": 2,
        "objective_options": {"temperature": 100.0},
    }
    teacher = trained_model("distill-teacher", teacher_recipe, log=log)
    teacher_path = (
        CACHE_DIR / f"distill-teacher-{_recipe_key(teacher_recipe)}.safetensors"
    ).relative_to(BENCH_DIR.parent)  # run from the repository root
    del teacher
    student_recipe = _TRAINING | {
        "objective": "distillation",
        "epochs": 2,
        "objective_options": {"temperature": 100.0, "teacher": str(teacher_path)},
    }
    return trained_model("distill-student", student_recipe, log=log)


def defended(
    row: tuple[str, str | None, dict[str, Any], str],
    bases: dict[str, nn.Module],
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
) -> nn.Module:
    name, defense, options, base = row
    model = bases[base].eval()
    if name in WRAPPERS:
        return WRAPPERS[name](model).eval()
    if defense is None:
        return model
    wrapped = rl.defenses.create(defense, model, **options)
    if callable(getattr(wrapped, "fit", None)):
        wrapped.fit(fit_x, fit_y)
    return wrapped.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test points per row")
    p.add_argument("--steps", type=int, default=50, help="adaptive APGD-CE steps")
    p.add_argument("--queries", type=int, default=1000, help="Square / NAttack query budget")
    p.add_argument("--binarization", type=int, default=10, help="binarization-test points")
    p.add_argument(
        "--check-points",
        type=int,
        default=100,
        help="points of the eps sweep and the unbounded attack",
    )
    p.add_argument(
        "--defenses", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS]
    )
    p.add_argument("--stem", default="audit")
    args = p.parse_args()
    torch.manual_seed(0)
    bases = models(
        {r[3] for r in ROWS if r[0] in args.defenses}
        | ({"natural"} if set(args.defenses) - {"thermometer"} else set())
    )
    x, y = rl.data.load(DATASET, split="test", n=args.n)
    fit_x, fit_y = rl.data.load(DATASET, split="train", n=1000)  # detector threshold, MI pool
    threat = rl.ThreatModel("linf", EPS)
    rows, record_rows = [], {}
    out_dir = CACHE_DIR / "audit"
    for row in ROWS:
        if row[0] not in args.defenses:
            continue
        model = defended(row, bases, fit_x, fit_y)
        log(f"{row[0]}: auditing")
        t0 = time.perf_counter()
        # the transfer surrogate: a defense's own base model; for a bare model the natural one
        surrogate = None if row[1] is not None or row[3] == "natural" else bases["natural"]
        res = rl.audit(
            model,
            x,
            y,
            threat,
            surrogate=surrogate,
            steps=args.steps,
            queries=args.queries,
            binarization_points=args.binarization,
            check_points=args.check_points,
            out=out_dir / row[0],
            config={"row": row[0]},
            **AUDIT_OVERRIDES.get(row[0], {}),
        )
        seconds = time.perf_counter() - t0
        aud = res.record["audit"]
        flagged = [c["name"] for c in res.checks if c["status"] == "FLAG"]
        log(
            f"{row[0]}: clean {res.clean_accuracy:.3f} naive {aud['naive_robust_accuracy']:.3f} "
            f"audit {res.robust_accuracy:.3f} flags {flagged} ({seconds:.0f} s)"
        )
        rows.append(
            (
                row[0],
                res.clean_accuracy,
                aud["naive_robust_accuracy"],
                res.robust_accuracy,
                flagged,
                aud["adaptive"],
                seconds,
            )
        )
        record_rows[row[0]] = {
            "defense": row[1],
            "options": row[2],
            "model": row[3],
            "clean_accuracy": res.clean_accuracy,
            "naive_pgd_accuracy": aud["naive_robust_accuracy"],
            "audit_robust_accuracy": res.robust_accuracy,
            "checks": res.checks,
            "adaptive": aud["adaptive"],
            "per_attack": res.record["per_attack"],
            "seconds": seconds,
        }
        stem_rec = {"machine": machine_record(), "settings": vars(args), "rows": record_rows}
        write_results(args.stem, markdown(rows, args), stem_rec)
    log(f"done: {Path('benchmarks/results') / (args.stem + '.md')}")
    print(markdown(rows, args))


def markdown(rows: list[tuple], args: argparse.Namespace) -> str:
    m = machine_record()
    lines = [
        "# Audit of input-transformation and gradient-masking defenses (Fashion-MNIST, linf 0.1)",
        "",
        f"`{m['command']}` · {m['date']} · torch {m['torch']} · {m['cpu']} "
        f"({m['nproc']} cores) · robustlab {m['robustlab_commit']}",
        "",
        f"{args.n} test points; audit: adaptive APGD-CE {args.steps} steps, MM-9 20 steps, "
        f"Square and NAttack with {args.queries} queries, transfer from the undefended model, "
        f"convergence run with 2x steps and 3 restarts; eps sweep and unbounded attack on "
        f"{args.check_points} points, binarization test on {args.binarization}.",
        "",
        "| defense | clean | plain PGD-20 | audit (worst case) | BPDA / EOT | flagged checks "
        "| time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, clean, naive, final, flagged, ad, sec in rows:
        adapt = (
            ", ".join(
                filter(
                    None,
                    [
                        "BPDA" if ad["bpda"] else "",
                        f"EOT {ad['eot']}" if ad["eot"] > 1 else "",
                        "log outputs" if ad.get("log_outputs") else "",
                        f"T {ad['temperature']:.3g}" if ad.get("temperature", 1.0) != 1.0 else "",
                    ],
                )
            )
            or "-"
        )
        lines.append(
            f"| {name} | {100 * clean:.1f}% | {100 * naive:.1f}% | {100 * final:.1f}% "
            f"| {adapt} | {', '.join(flagged) or 'none'} | {sec:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
