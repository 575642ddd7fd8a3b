"""Attack speed: robustlab's PGD against a raw PyTorch loop, torchattacks, ART and foolbox.

PGD-10 and PGD-40 (linf eps 0.1, step 2.5 * eps / K, one random start, CE loss, batches of 250)
on the first 1000 Fashion-MNIST test images, against two smallcnn models, one trained naturally
and one with PGD-AT (trained by robustlab once, on the first run, and cached in
``benchmarks/.cache/``; the recipes are in ``RECIPES``). Every mode attacks the same weights
and the same inputs:

- ``raw``: a hand-written PyTorch loop, K forward+backward passes and nothing else: the
  reference, on frozen parameters (``requires_grad=False``); also on trainable ones.
- ``robustlab, fixed work``: ``keep_best=False``, no early stop: the raw loop's work, plus the
  attack contract's own checks (one no-grad forward to recompute success). It draws the raw
  loop's random start, so its ``x_adv`` must equal the raw loop's.
- ``robustlab, eval path``: ``early_stop=True, keep_best=True``, as the evaluation runs it: a
  point stops being attacked once it is misclassified, keeping that iterate. The model is
  wrapped in a pass counter to report forward+backward passes per point.
- ``torch.compile`` / ``channels_last weights``: robustlab on ``torch.compile(model)``
  (compilation paid in the warm-up, reported apart) or on a copy of the model with its weights
  in ``torch.channels_last`` layout: what each does to the cost of a step on this CPU.
- ``torchattacks.PGD``, ART ``ProjectedGradientDescent`` on a ``PyTorchClassifier``, foolbox
  ``LinfPGD`` on a ``PyTorchModel``: parameters trainable, as users pass them, and frozen.

robustlab and the peers get trainable parameters unless a row says frozen. Not every mode
runs everywhere (``Mode.scope``): fixed work costs the same whatever the weights, so the peers
run at PGD-40 on the PGD-AT model only, and the per-step probes (frozen vs trainable, compile,
channels_last fixed work) at PGD-10 on the PGD-AT model only; ``--everywhere`` runs all.

Every mode's robust accuracy is recomputed here (one forward pass on its ``x_adv``, eval mode)
and every ``x_adv`` checked inside the eps ball (+1e-6) and [0, 1].

Timing: ``torch.set_num_threads(2)``; each mode warms up once on one batch; then ``--repeats``
rounds. A round runs the first batch of every (model, K, mode), then the second batch of each,
and so on, the order rotated from round to round, so a slow phase of the shared machine hits
every mode alike. ``x raw`` = median over rounds of (raw seconds / mode seconds in the same
round): throughput relative to the raw loop, higher is better; seconds are medians too.

Run from the repository root::

    make bench-env                                        # once: .bench-venv/ with the peers
    .bench-venv/bin/python benchmarks/attack_speed.py     # 5 rounds: ~15 min on 2 idle cores
    .bench-venv/bin/python benchmarks/attack_speed.py --quick   # 250 points, 2 rounds

A peer that is not installed is skipped and named in the output (``PYTHONPATH=src
.venv/bin/python benchmarks/attack_speed.py`` runs robustlab and the raw loop only). Results go
to ``benchmarks/results/attack_speed.{md,json}`` (``attack_speed_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab as rl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import (  # noqa: E402
    interleaved,
    machine_record,
    median,
    package_version,
    trained_model,
    write_results,
)

EPS = 0.1
DATASET = "fashion-mnist"
PEERS = {
    "torchattacks": "torchattacks",
    "art": "adversarial-robustness-toolbox",
    "foolbox": "foolbox",
}
_TRAINING = {
    "arch": "smallcnn",
    "dataset": DATASET,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 1e-3,
    "schedule": "cosine",
    "seed": 0,
}
RECIPES: dict[str, dict[str, Any]] = {
    "natural": _TRAINING | {"objective": "natural", "epochs": 2},
    "pgd-at": _TRAINING
    | {
        "objective": "pgd-at",
        "epochs": 3,
        "eps": EPS,
        "objective_options": {"steps": 5, "step_size": 0.05},
    },
}
ACC_TOLERANCE = 0.5  # robust-accuracy points within which two modes give "the same answer"


@dataclass(frozen=True)
class Setting:
    """One PGD configuration: ``steps`` steps of ``step_size`` in the linf ball of ``eps``."""

    eps: float
    steps: int
    step_size: float
    batch: int
    seed: int = 0


# An attack built for one model and setting, run on one batch: (x (B, C, H, W), y (B,), the
# batch's index, which seeds its random start) -> x_adv (B, C, H, W).
AttackFn = Callable[[Tensor, Tensor, int], Tensor]


def _generator(s: Setting, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed + batch)


# --- the modes --------------------------------------------------------------------------------
def raw_pgd(model: nn.Module, s: Setting) -> AttackFn:
    """K forward+backward passes and nothing else; the random start and the steps use the same
    arithmetic (and seeds) as robustlab's, so the two must return the same points."""

    def attack(x: Tensor, y: Tensor, b: int) -> Tensor:
        u = torch.rand(len(x), x[0].numel(), generator=_generator(s, b)).reshape(x.shape)
        xa = (x + (2 * u - 1) * s.eps).clamp(0, 1)
        for _ in range(s.steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(xa), y, reduction="none").sum()
            (grad,) = torch.autograd.grad(loss, xa)
            delta = (xa.detach() + s.step_size * grad.sign() - x).clamp(-s.eps, s.eps)
            xa = (x + delta).clamp(0, 1)
        return xa

    return attack


def robustlab_pgd(**options: Any) -> Callable[[nn.Module, Setting], AttackFn]:
    def build(model: nn.Module, s: Setting) -> AttackFn:
        atk = rl.attacks.create(
            "pgd",
            rl.ThreatModel("linf", s.eps),
            steps=s.steps,
            step_size=s.step_size,
            random_start=True,
            restarts=1,
            **options,
        )
        return lambda x, y, b: atk(model, x, y, generator=_generator(s, b)).x_adv

    return build


@functools.cache
def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def robustlab_compiled(model: nn.Module, s: Setting) -> AttackFn:
    return robustlab_pgd(keep_best=False)(_compiled(model), s)


def _channels_last(model: nn.Module) -> nn.Module:
    """A copy of the model with its weights in channels_last layout: the convolutions then run
    in NHWC, which oneDNN does faster on CPU; same weights, same answer up to float rounding."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def robustlab_channels_last(model: nn.Module, s: Setting) -> AttackFn:
    return robustlab_pgd(keep_best=False)(_channels_last(model), s)


class PassCounter(nn.Module):
    """The model, counting the rows it sees with autograd on, i.e. forward+backward passes
    (the attacks' no-grad checks are not counted). Costs one Python call per forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.rows += len(x)
        return self.model(x)


def robustlab_eval(model: nn.Module, s: Setting, *, channels_last: bool = False) -> AttackFn:
    """The evaluation path (early stop, keep best) on the model in a :class:`PassCounter`; the
    returned function's ``passes`` maps each batch index to the passes its last run made."""
    counter = PassCounter(_channels_last(model) if channels_last else model)
    attack = robustlab_pgd(keep_best=True, early_stop=True)(counter, s)
    passes: dict[int, int] = {}

    def counted(x: Tensor, y: Tensor, b: int) -> Tensor:
        counter.rows = 0
        x_adv = attack(x, y, b)
        passes[b] = counter.rows
        return x_adv

    counted.passes = passes  # type: ignore[attr-defined]
    return counted


def robustlab_evaluate(model: nn.Module, s: Setting) -> AttackFn:
    """The library's evaluation entry point, ``rl.evaluate`` with one PGD attack: early stop,
    clean-misclassified points not attacked, and (on CPU) a channels_last copy of the model,
    all decided by the library; its worst-case ``x_adv`` is what the benchmark scores."""
    threat = rl.ThreatModel("linf", s.eps)
    spec = [("pgd", {"steps": s.steps, "step_size": s.step_size, "random_start": True})]

    def attack(x: Tensor, y: Tensor, b: int) -> Tensor:
        return rl.evaluate(
            model, x, y, threat, attacks=spec, batch_size=len(x), seed=s.seed + b
        ).x_adv

    return attack


def torchattacks_pgd(model: nn.Module, s: Setting) -> AttackFn:
    import torchattacks

    atk = torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True)

    def attack(x: Tensor, y: Tensor, b: int) -> Tensor:
        torch.manual_seed(s.seed + b)  # its random start draws from torch's global RNG
        return atk(x, y)

    return attack


def art_pgd(model: nn.Module, s: Setting) -> AttackFn:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    info = rl.data.info(DATASET)
    classifier = PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=info.shape,
        nb_classes=info.num_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    atk = ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=s.eps,
        eps_step=s.step_size,
        max_iter=s.steps,
        num_random_init=1,
        batch_size=s.batch,
        verbose=False,
    )

    def attack(x: Tensor, y: Tensor, b: int) -> Tensor:
        np.random.seed(s.seed + b)  # its random start draws from numpy's global RNG
        return torch.from_numpy(atk.generate(x.numpy(), y.numpy()))

    return attack


def foolbox_pgd(model: nn.Module, s: Setting) -> AttackFn:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    atk = foolbox.attacks.LinfPGD(abs_stepsize=s.step_size, steps=s.steps, random_start=True)

    def attack(x: Tensor, y: Tensor, b: int) -> Tensor:
        torch.manual_seed(s.seed + b)  # its random start draws from torch's global RNG
        return atk(fmodel, x, y, epsilons=s.eps)[1]  # (raw, clipped, success): the clipped

    return attack


# Where a mode runs (k_min: the smallest of --steps):
#   "all":   every model and every K.
#   "peer":  every K on the adversarially trained model; the smallest K on the natural one
#            (fixed work costs the same whatever the weights, and all of it at K=40 there would
#            double the run for the same ratios).
#   "probe": the smallest K on the adversarially trained model: a per-step effect (trainable vs
#            frozen parameters, compilation, layout) that neither K nor the weights change.
SCOPES = ("all", "peer", "probe")


@dataclass(frozen=True)
class Mode:
    """One row of the table: how to build the attack, on which copy of the model, where."""

    key: str
    label: str
    build: Callable[[nn.Module, Setting], AttackFn]
    trainable: bool = True  # the parameters' requires_grad during the attack
    peer: str | None = None  # key of PEERS, None for the raw loop and robustlab
    scope: str = "all"  # one of SCOPES

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def params(self) -> str:
        return "trainable" if self.trainable else "frozen"

    def runs(self, model: str, k: int, k_min: int, everywhere: bool) -> bool:
        if everywhere or self.scope == "all":
            return True
        if self.scope == "peer":
            return model == "pgd-at" or k == k_min
        return model == "pgd-at" and k == k_min


MODES = [
    Mode("raw", "raw PyTorch loop (reference)", raw_pgd, trainable=False),
    Mode("raw-trainable", "raw PyTorch loop", raw_pgd, scope="probe"),
    Mode("robustlab-fixed", "robustlab, fixed work", robustlab_pgd(keep_best=False)),
    Mode(
        "robustlab-compiled",
        "robustlab, fixed work, torch.compile",
        robustlab_compiled,
        scope="probe",
    ),
    Mode(
        "robustlab-channels-last",
        "robustlab, fixed work, channels_last weights",
        robustlab_channels_last,
        scope="probe",
    ),
    Mode("robustlab-eval", "robustlab, eval path (early stop)", robustlab_eval),
    Mode(
        "robustlab-eval-channels-last",
        "robustlab, eval path, channels_last weights",
        functools.partial(robustlab_eval, channels_last=True),
    ),
    Mode(
        "robustlab-evaluate",
        "robustlab evaluate() (early stop + channels_last copy)",
        robustlab_evaluate,
    ),
    Mode("torchattacks", "torchattacks PGD", torchattacks_pgd, peer="torchattacks", scope="peer"),
    Mode(
        "torchattacks-frozen",
        "torchattacks PGD",
        torchattacks_pgd,
        trainable=False,
        peer="torchattacks",
        scope="probe",
    ),
    Mode("art", "ART ProjectedGradientDescent", art_pgd, peer="art", scope="peer"),
    Mode(
        "art-frozen",
        "ART ProjectedGradientDescent",
        art_pgd,
        trainable=False,
        peer="art",
        scope="probe",
    ),
    Mode("foolbox", "foolbox LinfPGD", foolbox_pgd, peer="foolbox", scope="peer"),
    Mode(
        "foolbox-frozen",
        "foolbox LinfPGD",
        foolbox_pgd,
        trainable=False,
        peer="foolbox",
        scope="probe",
    ),
]


# --- measurement ------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Percentage of points classified correctly (eval mode, no grad): the robust accuracy
    when ``x`` holds an attack's ``x_adv``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = sum(
                int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
                for i in range(0, len(x), batch)
            )
    finally:
        model.train(was_training)
    return 100.0 * correct / len(y)


def check_ball(x_adv: Tensor, x: Tensor, eps: float) -> tuple[float, bool]:
    """Largest linf distance, and whether every point is within ``eps + 1e-6`` and [0, 1]."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        return float("nan"), False
    dist = float((x_adv - x).abs().amax())
    return dist, dist <= eps + 1e-6 and float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def available_peers() -> dict[str, str | None]:
    """Installed version of each peer (None: missing), and of eagerpy (foolbox's backend)."""
    versions = {key: package_version(dist) for key, dist in PEERS.items()}
    versions["eagerpy"] = package_version("eagerpy")
    return versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=1000, help="test images attacked (default 1000)")
    p.add_argument("--batch", type=int, default=250, help="attack batch size (default 250)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="PGD steps K")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median; default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(RECIPES),
        default=list(RECIPES),
        help="models attacked (default both)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=[m.key for m in MODES],
        default=[m.key for m in MODES],
        help="modes to run (default all)",
    )
    p.add_argument(
        "--everywhere",
        action="store_true",
        help="run every mode on every model and K (about twice as long)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="development run: 250 points, 2 rounds, results in attack_speed_quick.*",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats = min(args.n, 250), min(args.repeats, 2)
    if min(args.n, args.batch, args.repeats, args.threads, *args.steps) < 1:
        p.error("--n, --batch, --repeats, --threads and --steps must be >= 1")
    if "raw" not in args.modes:
        p.error("the raw loop is the reference of every ratio: keep 'raw' in --modes")
    return args


def load_models(
    names: list[str], x: Tensor, y: Tensor, batch: int
) -> tuple[dict[str, dict[bool, nn.Module]], dict[str, dict[str, Any]]]:
    """Each model twice, same weights: {True: parameters trainable, False: frozen}; and its
    recipe, training time and clean accuracy."""
    models, info = {}, {}
    for name in names:
        trainable = trained_model(f"smallcnn-{name}", RECIPES[name]).eval().requires_grad_(True)
        models[name] = {True: trainable, False: copy.deepcopy(trainable).requires_grad_(False)}
        info[name] = {
            "recipe": RECIPES[name],
            "clean_acc": accuracy(trainable, x, y, batch),
            "train_seconds": trainable.robustlab_meta["train_seconds"],
        }
        print(
            f"model {name}: clean accuracy {info[name]['clean_acc']:.1f}% on {len(x)} test images",
            flush=True,
        )
    return models, info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = available_peers()
    missing = [key for key in PEERS if peers[key] is None]
    modes = [m for m in MODES if m.key in args.modes and (m.peer is None or peers[m.peer])]
    found = ", ".join(f"{k} {v}" for k, v in peers.items() if v) or "none"
    print(
        f"torch {torch.__version__}, {args.threads} threads; peers: {found}"
        + (f"; missing (skipped): {', '.join(missing)}" if missing else ""),
        flush=True,
    )
    x, y = rl.data.load(DATASET, split="test", n=args.n)
    models, model_info = load_models(args.models, x, y, args.batch)

    settings = {k: Setting(EPS, k, 2.5 * EPS / k, args.batch) for k in sorted(args.steps)}
    k_min = min(settings)
    attacks: dict[str, AttackFn] = {}
    rows: dict[str, tuple[str, int, Mode]] = {}
    for name, copies in models.items():
        for k, s in settings.items():
            for mode in modes:
                if mode.runs(name, k, k_min, args.everywhere):
                    key = f"{name} PGD-{k} {mode.key}"
                    attacks[key] = mode.build(copies[mode.trainable], s)
                    rows[key] = (name, k, mode)

    # The unit of interleaving is one batch of one mode, so a slow phase of the shared machine
    # is spread over many modes: round r runs batch 0 of every mode, then batch 1, ...
    starts = range(0, args.n, args.batch)
    units = {
        (key, b): functools.partial(attacks[key], x[i : i + args.batch], y[i : i + args.batch], b)
        for b, i in enumerate(starts)
        for key in attacks
    }
    warmups = {(key, 0): units[(key, 0)] for key, (_, k, _) in rows.items() if k == k_min}

    def progress(r: int, unit: tuple[str, int], seconds: float) -> None:
        what = "warm-up" if r < 0 else f"round {r + 1}/{args.repeats}"
        print(f"  {what:>11}  {unit[0]:<40} batch {unit[1]}  {seconds:7.2f} s", flush=True)

    print(
        f"{len(attacks)} (model, K, mode) tasks of {len(starts)} batches, warm-up and "
        f"{args.repeats} rounds",
        flush=True,
    )
    t0 = time.perf_counter()
    warm_times, _ = interleaved(warmups, 1, on_done=lambda _, unit, t: progress(-1, unit, t))
    unit_times, x_batches = interleaved(units, args.repeats, on_done=progress)
    wall = time.perf_counter() - t0
    times = {
        key: [sum(unit_times[(key, b)][r] for b in range(len(starts))) for r in range(args.repeats)]
        for key in attacks
    }
    x_advs = {key: torch.cat([x_batches[(key, b)] for b in range(len(starts))]) for key in attacks}

    results = []
    for key, (name, k, mode) in rows.items():
        raw_key = f"{name} PGD-{k} raw"
        dist, valid = check_ball(x_advs[key], x, EPS)
        passes = getattr(attacks[key], "passes", None)
        results.append(
            {
                "model": name,
                "steps": k,
                "step_size": settings[k].step_size,
                "mode": mode.key,
                "label": mode.label,
                "params": mode.params,
                "peer": mode.peer,
                "times_s": times[key],
                "median_s": median(times[key]),
                "ratio": median([a / b for a, b in zip(times[raw_key], times[key], strict=True)]),
                "robust_acc": accuracy(models[name][True], x_advs[key], y, args.batch),
                "max_linf": dist,
                "valid": valid,
                "max_abs_diff_vs_raw": float((x_advs[key] - x_advs[raw_key]).abs().max()),
                "passes_per_point": sum(passes.values()) / args.n if passes else k,
            }
        )
    record = {
        "benchmark": "attack_speed",
        "machine": machine_record(peers),
        "missing_peers": missing,
        "threads": args.threads,
        "n": args.n,
        "batch": args.batch,
        "repeats": args.repeats,
        "eps": EPS,
        "norm": "linf",
        "dataset": DATASET,
        "step_size_rule": "2.5 * eps / K",
        "models": model_info,
        "warmup_s": {key: t[0] for (key, _), t in warm_times.items()},
        "wall_s": wall,
        "results": results,
    }
    record["targets"] = check_targets(results)
    markdown = render(record)
    print("\n" + markdown)
    md, js = write_results("attack_speed_quick" if args.quick else "attack_speed", markdown, record)
    print(f"wrote {md} and {js}")
    return record


# --- reading the results ----------------------------------------------------------------------
def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    for name, k in sorted({(r["model"], r["steps"]) for r in results}):
        rows = {r["mode"]: r for r in results if (r["model"], r["steps"]) == (name, k)}
        raw, where = rows["raw"], f"{name} PGD-{k}"
        if "robustlab-fixed" in rows:
            ours = rows["robustlab-fixed"]
            out.append(
                {
                    "target": f"{where}: robustlab fixed work >= 0.95x raw",
                    "measured": f"{ours['ratio']:.2f}x",
                    "met": ours["ratio"] >= 0.95,
                }
            )
            peers = [r for r in rows.values() if r["peer"]]
            if peers:
                best = max(peers, key=lambda r: r["ratio"])
                out.append(
                    {
                        "target": f"{where}: robustlab fixed work >= every peer",
                        "measured": f"{ours['ratio']:.2f}x vs fastest peer {best['label']} "
                        f"({best['params']}) {best['ratio']:.2f}x",
                        "met": ours["ratio"] >= best["ratio"],
                    }
                )
        goal = 1.5 if name == "pgd-at" else 5.0
        for mode in ("robustlab-eval", "robustlab-eval-channels-last", "robustlab-evaluate"):
            if mode in rows:
                ours = rows[mode]
                out.append(
                    {
                        "target": f"{where}: {ours['label']} >= {goal}x raw",
                        "measured": f"{ours['ratio']:.2f}x",
                        "met": ours["ratio"] >= goal,
                    }
                )
        others = [r for r in rows.values() if r["mode"] != "raw"]
        if others:
            worst = max(others, key=lambda r: abs(r["robust_acc"] - raw["robust_acc"]))
            delta = worst["robust_acc"] - raw["robust_acc"]
            out.append(
                {
                    "target": f"{where}: every mode's robust accuracy within {ACC_TOLERANCE} "
                    f"points of raw ({raw['robust_acc']:.1f}%), every x_adv valid",
                    "measured": f"largest gap {delta:+.1f} ({worst['label']}, {worst['params']})",
                    "met": abs(delta) <= ACC_TOLERANCE and all(r["valid"] for r in rows.values()),
                }
            )
    return out


def model_table(record: dict[str, Any], name: str, info: dict[str, Any]) -> list[str]:
    """One model's section: how it was trained, a row per mode, a column group per K."""
    results = [r for r in record["results"] if r["model"] == name]
    steps = sorted({r["steps"] for r in results})
    cell = {(r["mode"], r["steps"]): r for r in results}
    recipe = {k: v for k, v in info["recipe"].items() if k not in ("arch", "dataset")}
    lines = [
        f"### smallcnn, {name} (clean accuracy {info['clean_acc']:.1f}%)",
        "",
        f"Trained by `robustlab.training.fit` with `{json.dumps(recipe)}` in "
        f"{info['train_seconds']:.0f} s.",
        "",
        "| mode | params |"
        + "".join(f" PGD-{k} x raw | PGD-{k} s | PGD-{k} rob. acc % |" for k in steps),
        "|---|---|" + "---:|---:|---:|" * len(steps),
    ]
    for mode in MODES:
        if not any((mode.key, k) in cell for k in steps):
            continue
        cells = [mode.label, mode.params]
        for k in steps:
            r = cell.get((mode.key, k))
            if r is None:
                cells += ["–", "–", "–"]
                continue
            ratio = f"{r['ratio']:.2f}" if r["peer"] else f"**{r['ratio']:.2f}**"
            acc = f"{r['robust_acc']:.1f}" + ("" if r["valid"] else " (INVALID)")
            cells += [ratio, f"{r['median_s']:.1f}", acc]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for k in steps:
        fixed, ev = cell.get(("robustlab-fixed", k)), cell.get(("robustlab-eval", k))
        if fixed is not None:
            same = (
                "identical to"
                if fixed["max_abs_diff_vs_raw"] == 0
                else (f"max |diff| {fixed['max_abs_diff_vs_raw']:.2g} from")
            )
            notes.append(f"PGD-{k}: robustlab's fixed-work x_adv {same} the raw loop's")
        if ev is not None:
            p = ev["passes_per_point"]
            notes.append(
                f"PGD-{k}: the eval path ran {p:.2f} forward+backward passes per point "
                f"instead of {k} ({k / p:.2f}x less work)"
            )
    lines += ["", "– : not run (see the scopes in the script). " + "; ".join(notes) + "."]
    return lines


def render(record: dict[str, Any]) -> str:
    """The Markdown report: settings, machine, one table per model, the targets."""
    m = record["machine"]
    peers = ", ".join(f"{k} {v}" for k, v in m["peers"].items() if v) or "none"
    lines = [
        "# Attack speed: PGD against the raw PyTorch loop and the peers",
        "",
        f"- Command: `{m['command']}`",
        f"- Date: {m['date']}; robustlab {m['robustlab']} at commit {m['robustlab_commit']} "
        + (
            "(src/ state unknown)"
            if m["src_changes"] is None
            else "(src/ as committed)"
            if not m["src_changes"]
            else f"(uncommitted changes in {', '.join(m['src_changes'])})"
        ),
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), shared with other jobs during the run; "
        f"`torch.set_num_threads({record['threads']})`; torch {m['torch']}, python "
        f"{m['python']}",
        f"- Peers: {peers}"
        + (f"; missing: {', '.join(record['missing_peers'])}" if record["missing_peers"] else ""),
        f"- Attack: PGD, linf eps {record['eps']}, step {record['step_size_rule']}, one random "
        f"start, CE loss, batch {record['batch']}, first {record['n']} {record['dataset']} "
        "test images",
        f"- Timing: warm-up once, then {record['repeats']} interleaved rounds (round robin, "
        "order rotated each round), median seconds; `x raw` = median over rounds of "
        "(raw loop time / mode time in that round): throughput relative to the raw loop, "
        "higher is faster",
        "- Robust accuracy recomputed by the benchmark on each mode's x_adv (one forward pass, "
        "eval mode); every x_adv checked inside the eps ball (+1e-6) and [0, 1]",
    ]
    compiled = [t for key, t in record["warmup_s"].items() if key.endswith("-compiled")]
    if compiled:
        secs = ", ".join(f"{t:.0f} s" for t in compiled)
        lines.append(
            f"- torch.compile: compilation paid in the warm-up (one batch: {secs}), not timed"
        )
    for name, info in record["models"].items():
        lines += ["", *model_table(record, name, info)]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
        for t in record["targets"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
