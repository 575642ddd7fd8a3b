"""Attack speed: robustlab's PGD against a raw PyTorch loop, torchattacks, ART and foolbox.

PGD-10 and PGD-40 (linf eps 0.1, step 2.5 * eps / K, one random start, batches of 250) on the
first 1000 Fashion-MNIST test images, against two smallcnn models: one trained naturally and
one adversarially (PGD-AT), both trained here once and cached in ``benchmarks/.cache/``. Every
mode attacks the same weights and the same inputs:

- ``raw``: a hand-written PyTorch loop, K forward+backward passes and nothing else: the
  reference. Parameters frozen (``requires_grad=False``), and also trainable (PGD-10).
- ``robustlab fixed work``: ``keep_best=False``, no early stop: the same work as ``raw`` (it
  draws the same random start, so its ``x_adv`` must equal the raw loop's).
- ``robustlab eval path``: the defaults of evaluation, ``early_stop=True, keep_best=True``:
  a point stops being attacked once it is misclassified, keeping that iterate.
- ``robustlab compiled``: fixed work on ``torch.compile(model)`` (PGD-10; compilation is
  paid in the warm-up and reported apart).
- ``torchattacks`` ``PGD``, ``ART`` ``ProjectedGradientDescent`` on a ``PyTorchClassifier``,
  ``foolbox`` ``LinfPGD`` on a ``PyTorchModel``: parameters trainable, as users pass them, and
  frozen too (PGD-10).

robustlab and the peers get the model with trainable parameters unless the row says frozen.
The benchmark recomputes every mode's robust accuracy itself (one forward pass on the returned
``x_adv``, eval mode) and checks every ``x_adv`` lies in the eps ball and in [0, 1].

Timing: ``torch.set_num_threads(2)``; each mode warms up once on one batch; then ``--repeats``
rounds, each running every (model, K, mode) once in a round-robin order rotated from round to
round, so a slow phase of the shared machine hits every mode alike; the median is reported.
``x raw`` = raw seconds / mode seconds: throughput relative to the raw loop, higher is better.

Run from the repository root::

    make bench-env                                        # once: .bench-venv/ with the peers
    .bench-venv/bin/python benchmarks/attack_speed.py     # the full run (about 20 minutes)
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
from collections.abc import Callable, Iterator
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
PEERS = {"torchattacks": "torchattacks", "art": "adversarial-robustness-toolbox",
         "foolbox": "foolbox"}
_TRAINING = {"arch": "smallcnn", "dataset": DATASET, "batch_size": 128, "optimizer": "adam",
             "lr": 1e-3, "schedule": "cosine", "seed": 0}
RECIPES: dict[str, dict[str, Any]] = {
    "natural": _TRAINING | {"objective": "natural", "epochs": 2},
    "pgd-at": _TRAINING | {"objective": "pgd-at", "epochs": 3, "eps": EPS,
                           "objective_options": {"steps": 5, "step_size": 0.05}},
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


# An attack built for one model and setting: x (N, C, H, W), y (N,) -> x_adv (N, C, H, W).
AttackFn = Callable[[Tensor, Tensor], Tensor]


def _batches(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    for b, i in enumerate(range(0, len(x), size)):
        yield b, x[i:i + size], y[i:i + size]


def _generator(s: Setting, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed + batch)


# --- the modes --------------------------------------------------------------------------------
def raw_pgd(model: nn.Module, s: Setting) -> AttackFn:
    """K forward+backward passes per batch and nothing else; the random start and the steps use
    the same arithmetic (and seeds) as robustlab's, so the two return the same points."""

    def attack(x: Tensor, y: Tensor) -> Tensor:
        out = []
        for b, xb, yb in _batches(x, y, s.batch):
            u = torch.rand(len(xb), xb[0].numel(), generator=_generator(s, b)).reshape(xb.shape)
            xa = (xb + (2 * u - 1) * s.eps).clamp(0, 1)
            for _ in range(s.steps):
                xa.requires_grad_(True)
                loss = F.cross_entropy(model(xa), yb, reduction="none").sum()
                (grad,) = torch.autograd.grad(loss, xa)
                delta = (xa.detach() + s.step_size * grad.sign() - xb).clamp(-s.eps, s.eps)
                xa = (xb + delta).clamp(0, 1)
            out.append(xa)
        return torch.cat(out)

    return attack


def robustlab_pgd(**options: Any) -> Callable[[nn.Module, Setting], AttackFn]:
    def build(model: nn.Module, s: Setting) -> AttackFn:
        atk = rl.attacks.create("pgd", rl.ThreatModel("linf", s.eps), steps=s.steps,
                                step_size=s.step_size, random_start=True, restarts=1, **options)

        def attack(x: Tensor, y: Tensor) -> Tensor:
            return torch.cat([atk(model, xb, yb, generator=_generator(s, b)).x_adv
                              for b, xb, yb in _batches(x, y, s.batch)])

        return attack

    return build


@functools.cache
def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def robustlab_compiled(model: nn.Module, s: Setting) -> AttackFn:
    return robustlab_pgd(keep_best=False, early_stop=False)(_compiled(model), s)


def torchattacks_pgd(model: nn.Module, s: Setting) -> AttackFn:
    import torchattacks

    atk = torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True)

    def attack(x: Tensor, y: Tensor) -> Tensor:
        torch.manual_seed(s.seed)  # its random start draws from torch's global RNG
        return torch.cat([atk(xb, yb) for _, xb, yb in _batches(x, y, s.batch)])

    return attack


def art_pgd(model: nn.Module, s: Setting) -> AttackFn:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    atk = ProjectedGradientDescent(classifier, norm=np.inf, eps=s.eps, eps_step=s.step_size,
                                   max_iter=s.steps, num_random_init=1, batch_size=s.batch,
                                   verbose=False)

    def attack(x: Tensor, y: Tensor) -> Tensor:
        np.random.seed(s.seed)  # its random start draws from numpy's global RNG
        return torch.from_numpy(atk.generate(x.numpy(), y.numpy()))

    return attack


def foolbox_pgd(model: nn.Module, s: Setting) -> AttackFn:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    atk = foolbox.attacks.LinfPGD(abs_stepsize=s.step_size, steps=s.steps, random_start=True)

    def attack(x: Tensor, y: Tensor) -> Tensor:
        torch.manual_seed(s.seed)
        return torch.cat([atk(fmodel, xb, yb, epsilons=s.eps)[1]
                          for _, xb, yb in _batches(x, y, s.batch)])

    return attack


class PassCounter(nn.Module):
    """The model, counting the rows it sees with autograd on: forward+backward passes per point
    (the attacks' no-grad checks are not counted). Costs one Python call per forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.rows += len(x)
        return self.model(x)


def robustlab_eval(model: nn.Module, s: Setting) -> AttackFn:
    """The evaluation path, on the model wrapped in a :class:`PassCounter`."""
    counter = PassCounter(model)
    attack = robustlab_pgd(keep_best=True, early_stop=True)(counter, s)

    def counted(x: Tensor, y: Tensor) -> Tensor:
        counter.rows = 0
        x_adv = attack(x, y)
        counted.passes_per_point = counter.rows / len(x)  # type: ignore[attr-defined]
        return x_adv

    return counted


# Where a mode runs (the smallest K is the first of --steps after sorting):
#   "all":   every model and every K.
#   "peer":  every K on the adversarially trained model; the smallest K on the natural one
#            (fixed work costs the same whatever the weights, and all of it at K=40 there would
#            double the run for the same ratios).
#   "probe": the smallest K on the adversarially trained model: a per-step effect (trainable vs
#            frozen parameters, compilation) that neither K nor the weights change.
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
    Mode("robustlab-compiled", "robustlab, fixed work, torch.compile", robustlab_compiled,
         scope="probe"),
    Mode("robustlab-eval", "robustlab, eval path (early stop)", robustlab_eval),
    Mode("torchattacks", "torchattacks PGD", torchattacks_pgd, peer="torchattacks",
         scope="peer"),
    Mode("torchattacks-frozen", "torchattacks PGD", torchattacks_pgd, trainable=False,
         peer="torchattacks", scope="probe"),
    Mode("art", "ART ProjectedGradientDescent", art_pgd, peer="art", scope="peer"),
    Mode("art-frozen", "ART ProjectedGradientDescent", art_pgd, trainable=False, peer="art",
         scope="probe"),
    Mode("foolbox", "foolbox LinfPGD", foolbox_pgd, peer="foolbox", scope="peer"),
    Mode("foolbox-frozen", "foolbox LinfPGD", foolbox_pgd, trainable=False, peer="foolbox",
         scope="probe"),
]


# --- measurement ------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Percentage of points classified correctly (eval mode, no grad): the robust accuracy
    when ``x`` holds an attack's ``x_adv``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = sum(int((model(xb).argmax(1) == yb).sum())
                          for _, xb, yb in _batches(x, y, batch))
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
    """Installed version of each peer (None: missing), and eagerpy's, foolbox's backend."""
    versions = {key: package_version(dist) for key, dist in PEERS.items()}
    versions["eagerpy"] = package_version("eagerpy")
    return versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="test images attacked (default 1000)")
    p.add_argument("--batch", type=int, default=250, help="attack batch size (default 250)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="PGD steps K")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median; default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="models attacked (default both)")
    p.add_argument("--modes", nargs="+", choices=[m.key for m in MODES],
                   default=[m.key for m in MODES], help="modes to run (default all)")
    p.add_argument("--everywhere", action="store_true",
                   help="run every mode on every model and K (about twice as long)")
    p.add_argument("--quick", action="store_true",
                   help="development run: 250 points, 2 rounds, results in attack_speed_quick.*")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats = min(args.n, 250), min(args.repeats, 2)
    if "raw" not in args.modes:
        p.error("the raw loop is the reference of every ratio: keep 'raw' in --modes")
    return args


def load_models(names: list[str], x: Tensor, y: Tensor, batch: int
                ) -> tuple[dict[str, dict[bool, nn.Module]], dict[str, dict[str, Any]]]:
    """Each model twice, same weights: {True: parameters trainable, False: frozen}; and its
    recipe, training time and clean accuracy."""
    models, info = {}, {}
    for name in names:
        trainable = trained_model(f"smallcnn-{name}", RECIPES[name]).eval().requires_grad_(True)
        models[name] = {True: trainable, False: copy.deepcopy(trainable).requires_grad_(False)}
        info[name] = {"recipe": RECIPES[name], "clean_acc": accuracy(trainable, x, y, batch),
                      "train_seconds": trainable.robustlab_meta["train_seconds"]}
        print(f"model {name}: clean accuracy {info[name]['clean_acc']:.1f}% on {len(x)} test "
              "images", flush=True)
    return models, info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = available_peers()
    missing = [key for key in PEERS if peers[key] is None]
    modes = [m for m in MODES if m.key in args.modes and (m.peer is None or peers[m.peer])]
    print(f"torch {torch.__version__}, {args.threads} threads; peers: "
          + ", ".join(f"{k} {v}" for k, v in peers.items() if v)
          + (f"; missing (skipped): {', '.join(missing)}" if missing else ""), flush=True)
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
    # warm-up: each mode once on each model, on one batch at the smallest K
    warmups = {key: functools.partial(attacks[key], x[:args.batch], y[:args.batch])
               for key, (_, k, _) in rows.items() if k == k_min}
    tasks = {key: functools.partial(attack, x, y) for key, attack in attacks.items()}

    def progress(r: int, key: str, seconds: float) -> None:
        what = "warm-up" if r < 0 else f"round {r + 1}/{args.repeats}"
        print(f"  {what:>11}  {key:<40} {seconds:7.2f} s", flush=True)

    print(f"{len(tasks)} timed tasks, {args.repeats} rounds", flush=True)
    warm_times, _ = interleaved(warmups, 1, on_done=lambda _, key, t: progress(-1, key, t))
    times, x_advs = interleaved(tasks, args.repeats, on_done=progress)

    results = []
    for key, (name, k, mode) in rows.items():
        raw_key = f"{name} PGD-{k} raw"
        dist, valid = check_ball(x_advs[key], x, EPS)
        results.append({
            "model": name, "steps": k, "step_size": settings[k].step_size, "mode": mode.key,
            "label": mode.label, "params": mode.params, "peer": mode.peer,
            "times_s": times[key], "median_s": median(times[key]),
            "ratio": median(times[raw_key]) / median(times[key]),
            "robust_acc": accuracy(models[name][True], x_advs[key], y, args.batch),
            "max_linf": dist, "valid": valid,
            "max_abs_diff_vs_raw": float((x_advs[key] - x_advs[raw_key]).abs().max()),
            "passes_per_point": getattr(attacks[key], "passes_per_point", k),
        })
    record = {
        "benchmark": "attack_speed", "machine": machine_record(peers),
        "missing_peers": missing, "threads": args.threads, "n": args.n, "batch": args.batch,
        "repeats": args.repeats, "eps": EPS, "norm": "linf", "dataset": DATASET,
        "step_size_rule": "2.5 * eps / K", "models": model_info,
        "warmup_s": {key: t[0] for key, t in warm_times.items()}, "results": results,
    }
    record["targets"] = check_targets(results)
    markdown = render(record)
    print("\n" + markdown)
    md, js = write_results("attack_speed_quick" if args.quick else "attack_speed", markdown,
                           record)
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
            out.append({"target": f"{where}: robustlab fixed work >= 0.95x raw",
                         "measured": f"{ours['ratio']:.2f}x", "met": ours["ratio"] >= 0.95})
            peers = [r for r in rows.values() if r["peer"]]
            if peers:
                best = min(peers, key=lambda r: r["median_s"])
                out.append({"target": f"{where}: robustlab fixed work >= every peer",
                            "measured": f"{ours['ratio']:.2f}x vs fastest peer {best['label']} "
                                        f"({best['params']}) {best['ratio']:.2f}x",
                            "met": ours["median_s"] <= best["median_s"]})
        if "robustlab-eval" in rows:
            goal = 1.5 if name == "pgd-at" else 5.0
            ours = rows["robustlab-eval"]
            out.append({"target": f"{where}: robustlab eval path >= {goal}x raw",
                        "measured": f"{ours['ratio']:.2f}x", "met": ours["ratio"] >= goal})
        others = [r for r in rows.values() if r["mode"] != "raw"]
        if others:
            worst = max(others, key=lambda r: abs(r["robust_acc"] - raw["robust_acc"]))
            delta = worst["robust_acc"] - raw["robust_acc"]
            out.append({
                "target": f"{where}: every mode's robust accuracy within {ACC_TOLERANCE} "
                          f"points of raw ({raw['robust_acc']:.1f}%), every x_adv valid",
                "measured": f"largest gap {delta:+.1f} ({worst['label']}, {worst['params']})",
                "met": abs(delta) <= ACC_TOLERANCE and all(r["valid"] for r in rows.values()),
            })
    return out


def model_table(record: dict[str, Any], name: str, info: dict[str, Any]) -> list[str]:
    """One model's section: how it was trained, a row per mode, a column group per K."""
    results = [r for r in record["results"] if r["model"] == name]
    steps = sorted({r["steps"] for r in results})
    cell = {(r["mode"], r["steps"]): r for r in results}
    recipe = {k: v for k, v in info["recipe"].items() if k not in ("arch", "dataset")}
    lines = [f"### smallcnn, {name} (clean accuracy {info['clean_acc']:.1f}%)", "",
             f"Trained by `robustlab.training.fit` with `{json.dumps(recipe)}` in "
             f"{info['train_seconds']:.0f} s.", "",
             "| mode | params |" + "".join(f" PGD-{k} x raw | PGD-{k} s | PGD-{k} rob. acc % |"
                                         for k in steps),
             "|---|---|" + "---:|---:|---:|" * len(steps)]
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
            same = "identical to" if fixed["max_abs_diff_vs_raw"] == 0 else (
                f"max |diff| {fixed['max_abs_diff_vs_raw']:.2g} from")
            notes.append(f"PGD-{k}: robustlab's fixed-work x_adv {same} the raw loop's")
        if ev is not None:
            p = ev["passes_per_point"]
            notes.append(f"PGD-{k}: the eval path ran {p:.2f} forward+backward passes per point "
                         f"(fixed work: {k}), so at most {k / p:.2f}x raw")
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
        f"- Date: {m['date']}; robustlab {m['robustlab']} at commit {m['robustlab_commit']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), shared with other jobs during the run; "
        f"`torch.set_num_threads({record['threads']})`; torch {m['torch']}, python "
        f"{m['python']}",
        f"- Peers: {peers}"
        + (f"; missing: {', '.join(record['missing_peers'])}" if record["missing_peers"] else ""),
        f"- Attack: PGD, linf eps {record['eps']}, step {record['step_size_rule']}, one random "
        f"start, CE loss, batch {record['batch']}, first {record['n']} {record['dataset']} "
        "test images",
        f"- Timing: warm-up once, then {record['repeats']} interleaved rounds (round robin, "
        "order rotated each round), median seconds; `x raw` = raw loop time / mode time "
        "(higher is faster)",
        "- Robust accuracy recomputed by the benchmark on each mode's x_adv (one forward pass, "
        "eval mode); every x_adv checked inside the eps ball (+1e-6) and [0, 1]",
    ]
    compiled = [t for key, t in record["warmup_s"].items() if key.endswith("-compiled")]
    if compiled:
        secs = ", ".join(f"{t:.0f} s" for t in compiled)
        lines.append(f"- torch.compile: compilation paid in the warm-up (one batch: {secs}), "
                     "not timed")
    for name, info in record["models"].items():
        lines += ["", *model_table(record, name, info)]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
              for t in record["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
