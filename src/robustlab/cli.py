"""The command line: ``robustlab train | evaluate | audit | certify | smooth | denoise | report |
compare | list``.

Progress bars and printing live here, never in the library. The CLI seeds torch once and
records the seed with every result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from robustlab.threat import NORMS, parse_eps


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _eps(s: str) -> float:
    try:
        v = parse_eps(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {s}")
    return v


def _checkpoint(args: argparse.Namespace,
                device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model in ``args.checkpoint`` on ``device``, and the data set to use: ``--dataset``,
    else the checkpoint's, else Fashion-MNIST."""
    from robustlab import models

    model = models.load(args.checkpoint, device=device)
    meta = getattr(model, "robustlab_meta", {})
    return model, args.dataset or meta.get("dataset") or "fashion-mnist"


def _classes(dataset: str) -> list[str] | None:
    """The data set's class names, recorded with the results so that reports can show them."""
    from robustlab import data

    try:
        return list(data.info(dataset).classes)
    except (ValueError, KeyError):
        return None


def _out(msg: str = "", quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


# --- train ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from robustlab import data, distributed, models
    from robustlab.config import load_recipe
    from robustlab.training import Trainer

    recipe = load_recipe(args.config)
    world = distributed.World()
    if distributed.launched():  # torchrun --nproc_per_node=N -m robustlab train ...
        world, device = distributed.init_from_env()
    else:
        device = _device(args.device)
    quiet = args.quiet or not world.main
    cfg = recipe.train
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seed is not None:
        cfg.seed = args.seed
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    info = data.info(recipe.dataset)
    x, y = data.load(recipe.dataset, split="train", n=recipe.n_train)
    val = None
    if recipe.val_n:  # the LAST val_n test images: disjoint from `evaluate --n`'s first ones
        xv, yv = data.load(recipe.dataset, split="test")
        val = (xv[-recipe.val_n:], yv[-recipe.val_n:])
    opts = {k: v for k, v in recipe.model.items() if k != "arch"}
    opts.setdefault("num_classes", info.num_classes)
    opts.setdefault("in_channels", info.shape[0])
    opts.setdefault("input_size", info.shape[1])
    model = models.create(recipe.model["arch"], **opts).to(device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.source, indent=2) + "\n")
    distributed.barrier(world)
    trainer = Trainer(model, (x, y), cfg, threat=recipe.threat, out=out, val=val,
                      progress=not quiet, callback=lambda rec: _report(rec, trainer, quiet),
                      tensorboard=args.tensorboard)
    ranks = f" on {world.size} processes" if world.size > 1 else ""
    _out(f"training {recipe.model['arch']} on {recipe.dataset} ({len(x)} images) with "
         f"{cfg.objective}, {recipe.threat or 'no threat model'}, {trainer.passes} passes over "
         f"the data, {device}{ranks} -> {out}", quiet)
    try:
        trainer.run(resume=args.resume)
    finally:
        distributed.shutdown(world)
    _out(f"checkpoint: {out / 'model.safetensors'}\ntraining log: {out / 'train_log.jsonl'}",
         quiet)
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def _report(rec: dict[str, Any], trainer: Any, quiet: bool) -> None:
    parts = [f"epoch {rec['epoch']:>3}/{trainer.passes}", f"loss {rec['train_loss']:.4f}",
             f"lr {rec['lr']:.3g}", f"{rec['train_time_s']:.0f}s"]
    if "val_clean_acc" in rec:
        parts.append(f"val clean {100 * rec['val_clean_acc']:.1f}%")
    if "val_robust_acc" in rec:
        parts.append(f"val robust {100 * rec['val_robust_acc']:.1f}%")
    if "probe_robust_acc" in rec:
        parts.append(f"probe PGD-5 {100 * rec['probe_robust_acc']:.1f}%")
    if "overfit" in rec:
        parts.append(f"catastrophic overfitting: {rec['overfit']}")
    _out(" | ".join(parts), quiet)


# --- evaluate ---------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from robustlab import data, distributed, models
    from robustlab.evaluation import evaluate_sharded
    from robustlab.threat import ThreatModel

    world, device = distributed.World(), torch.device("cpu")
    if distributed.launched():  # torchrun: the points are split over the ranks and merged
        world, device = distributed.init_from_env()
    quiet = args.quiet or not world.main
    torch.manual_seed(args.seed)
    model, dataset = _checkpoint(args, device)
    x, y = data.load(dataset, split=args.split, n=args.n)
    threat = ThreatModel(args.norm, args.eps)
    model, defense = _defended(args, model, dataset, quiet)
    attacks = None
    if args.attack:
        opts: dict[str, Any] = {}
        if args.loss is not None:
            opts["loss"] = args.loss
        if args.steps is not None:
            opts["steps"] = args.steps
        if args.restarts is not None:
            opts["restarts"] = args.restarts
        if args.step_size is not None:
            opts["step_size"] = args.step_size
        attacks = [(a, opts) for a in args.attack]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    surrogate = models.load(args.surrogate, device=device) if args.surrogate else None
    try:
        result = evaluate_sharded(
            model, x, y, threat, suite=args.suite, attacks=attacks, batch_size=args.batch_size,
            seed=args.seed, out=str(out), progress=not quiet, resume=not args.restart,
            repeats=args.repeats, surrogate=surrogate, bpda=args.bpda, eot=args.eot,
            config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                    "classes": _classes(dataset), "split": args.split,
                    "defense": defense, "command": " ".join(sys.argv)},
        )
    finally:
        distributed.shutdown(world)
    from robustlab.report.summary import markdown

    _out(markdown(result.record), quiet)
    _out(f"results: {out / 'results.json'}\nper-sample: {out / 'per_sample.jsonl'}\n"
         f"summary: {out / 'summary.md'}", quiet)
    return 0


def _defended(args: argparse.Namespace, model: torch.nn.Module, dataset: str,
              quiet: bool) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """``model`` inside ``--defense`` (with ``--defense-option``s), and the defense's record.
    A defense that needs clean data (a detector's threshold, mixup inference's pool) is
    fitted on the first ``--fit-n`` points of the training split, never on the test points."""
    if not args.defense:
        return model, None
    from robustlab import data, defenses

    options = _options(args.defense_option)
    model = defenses.create(args.defense, model, **options)
    record: dict[str, Any] = {"name": args.defense, **options}
    fitted = (getattr(model, "threshold", None) is not None  # a detector given its threshold
              or getattr(model, "pool_x", None) is not None)
    if callable(getattr(model, "fit", None)) and not fitted:
        xf, yf = data.load(dataset, split="train", n=args.fit_n)
        model.fit(xf, yf)
        record["fit"] = {"split": "train", "n": len(xf)}
        _out(f"{args.defense}: fitted on the first {len(xf)} training points", quiet)
    return model, record


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """``["sigma=0.25", "vote=soft"]`` -> ``{"sigma": 0.25, "vote": "soft"}`` (values parsed as
    JSON where they can be, else kept as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--defense-option takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --- audit ------------------------------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    from robustlab import data, models
    from robustlab.evaluation.audit import audit
    from robustlab.report.summary import markdown
    from robustlab.threat import ThreatModel

    torch.manual_seed(args.seed)
    model, dataset = _checkpoint(args, torch.device("cpu"))
    x, y = data.load(dataset, split="test", n=args.n)
    threat = ThreatModel(args.norm, args.eps)
    model, defense = _defended(args, model, dataset, args.quiet)
    surrogate = models.load(args.surrogate) if args.surrogate else None
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / (
        f"audit-{args.defense}" if args.defense else "audit")
    result = audit(model, x, y, threat, surrogate=surrogate, steps=args.steps,
                   queries=args.queries, eot=args.eot, binarization_points=args.binarization,
                   batch_size=args.batch_size, seed=args.seed, out=out, progress=not args.quiet,
                   config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                    "classes": _classes(dataset),
                           "split": "test", "defense": defense, "command": " ".join(sys.argv)})
    _out(markdown(result.record), args.quiet)
    _out(f"results: {out / 'results.json'}\nsummary: {out / 'summary.md'}", args.quiet)
    return 0


# --- certify ----------------------------------------------------------------------------------
def cmd_certify(args: argparse.Namespace) -> int:
    from robustlab import data
    from robustlab.evaluation.certification import run_certification
    from robustlab.noise import CERTIFIED_NORM

    device = _device(args.device)
    model, dataset = _checkpoint(args, device)
    if args.denoiser:  # denoised smoothing: certify classifier(denoiser(x + delta))
        from robustlab.defenses.denoise import Denoised

        model = Denoised(model, str(args.denoiser)).to(device)
    x, y = data.load(dataset, split=args.split)
    idx = torch.arange(0, len(x), args.skip)[:args.n_points]
    x, y = x[idx].to(device), y[idx].to(device)
    out = (Path(args.out) if args.out else
           Path(args.checkpoint).parent / f"certify_{args.noise}_{args.sigma:g}")
    norm = CERTIFIED_NORM[args.noise]
    every = f" (every {args.skip}-th)" if args.skip > 1 else ""
    _out(f"certifying {len(x)} {dataset} {args.split} images{every} with "
         f"{args.noise} noise sigma {args.sigma:g}, n0 {args.n0}, n {args.n}, alpha "
         f"{args.alpha:g}; radii in {norm}; rows in {out / 'certify.jsonl'}", args.quiet)
    _out("idx\tlabel\tpredict\tradius\tcorrect\ttime", args.quiet)

    def row(r: dict[str, Any]) -> None:
        _out(f"{r['index']}\t{r['label']}\t{r['prediction']}\t{r['radius']:.4f}\t"
             f"{int(r['correct'])}\t{r['seconds']:.2f}", args.quiet)

    summary = run_certification(
        model, x, y, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
        noise=args.noise, batch_size=args.batch_size, seed=args.seed,
        indices=idx.tolist(), out=out, resume=not args.restart, on_row=row,
        config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                    "classes": _classes(dataset), "split": args.split,
                "denoiser": str(args.denoiser) if args.denoiser else None},
    )
    curve = ", ".join(f"r={c['radius']:g}: {100 * c['accuracy']:.1f}%"
                      for c in summary["certified_accuracy"][::5])
    _out(f"smoothed clean accuracy {100 * summary['clean_accuracy']:.1f}%, abstained "
         f"{100 * summary['abstain_rate']:.1f}%, average certified radius "
         f"{summary['average_certified_radius']:.3f} ({norm})\ncertified accuracy: {curve}\n"
         f"summary: {out / 'certify.json'}", args.quiet)
    return 0


# --- smooth -----------------------------------------------------------------------------------
def cmd_smooth(args: argparse.Namespace) -> int:
    from robustlab import data
    from robustlab.evaluation.smoothing_curves import FILE, smoothing_curves

    def listed(option: str, kind: type, example: str) -> list[Any]:
        text = getattr(args, option)
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--{option} takes comma-separated {kind.__name__}s, e.g. "
                             f"{example}, got {text!r}") from None

    sigmas = listed("sigmas", float, "0,0.12,0.25,0.5")
    samples = listed("samples", int, "1,4,16,64,256")
    votes = [v.strip() for v in args.votes.split(",")]
    torch.manual_seed(args.seed)  # a model with weight noise draws it from the global generator
    device = _device(args.device)
    model, dataset = _checkpoint(args, device)
    x, y = data.load(dataset, split=args.split, n=args.n)
    x, y = x.to(device), y.to(device)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "smoothing"
    _out(f"smoothing curves of {args.checkpoint} on {len(x)} {dataset} {args.split} images, "
         f"{args.noise} noise", args.quiet)
    rec = smoothing_curves(
        model, x, y, sigmas=sigmas, samples=samples, votes=votes, noise=args.noise,
        batch_size=args.batch_size, seed=args.seed, out=out, progress=not args.quiet,
        config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                    "classes": _classes(dataset), "split": args.split,
                "command": " ".join(sys.argv)},
    )
    cfg = rec["config"]
    acc = {(r["sigma"], r["samples"], r["vote"]): r["accuracy"] for r in rec["rows"]}
    _out(f"base model (no noise): {100 * rec['base_accuracy']:.1f}%", args.quiet)
    for vote in cfg["votes"]:
        _out(f"\n{vote} vote: accuracy (%) by sigma and n draws", args.quiet)
        _out("sigma\t" + "\t".join(f"n={n}" for n in cfg["samples"]), args.quiet)
        for sigma in cfg["sigmas"]:
            _out(f"{sigma:g}\t" + "\t".join(f"{100 * acc[sigma, n, vote]:.1f}"
                                            for n in cfg["samples"]), args.quiet)
    _out(f"\nsmoothing curves: {out / FILE}", args.quiet)
    return 0


# --- denoise ----------------------------------------------------------------------------------
def cmd_denoise(args: argparse.Namespace) -> int:
    from robustlab import data
    from robustlab.defenses.denoise import Denoiser, load_denoiser, train_denoiser

    device = _device(args.device)
    classifier, dataset = _checkpoint(args, device)
    x, _ = data.load(dataset, split="train", n=args.n_train)
    if args.init:
        denoiser = load_denoiser(args.init, device=device)
    else:
        denoiser = Denoiser(in_channels=x.shape[1], depth=args.depth,
                            width=args.width).to(device)

    def row(r: dict[str, Any]) -> None:
        extra = (f", classifier agrees with its clean prediction on "
                 f"{100 * r['stab_accuracy']:.1f}%" if "stab_accuracy" in r else "")
        _out(f"epoch {r['epoch']:>3}/{args.epochs} | loss {r['loss']:.5f} | "
             f"{r['time_s']:.0f}s{extra}", args.quiet)

    train_denoiser(denoiser, x, sigma=args.sigma, epochs=args.epochs, objective=args.objective,
                   classifier=classifier if args.objective == "stab" else None,
                   batch_size=args.batch_size, lr=args.lr, out=args.out, seed=args.seed,
                   noise=args.noise, log=row)
    _out(f"denoiser: {Path(args.out) / 'denoiser.safetensors'}; certify the classifier behind "
         f"it with: robustlab certify {args.checkpoint} --sigma {args.sigma:g} --denoiser "
         f"{Path(args.out) / 'denoiser.safetensors'}", args.quiet)
    return 0


# --- report and compare -----------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from robustlab.report.html import write_report

    out = args.output or (args.runs[0] / "report.html" if len(args.runs) == 1
                          else Path("report.html"))
    path = write_report(args.runs, out, title=args.title)
    print(f"report: {path.resolve()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from robustlab._io import atomic_write
    from robustlab.report.html import leaderboard_markdown
    from robustlab.report.runs import load_run

    text = leaderboard_markdown([load_run(p) for p in args.runs])
    if args.output:
        atomic_write(args.output, text)
        print(f"leaderboard: {args.output.resolve()}")
    else:
        print(text, end="")
    return 0


# --- list -------------------------------------------------------------------------------------
def _registries() -> dict[str, Any]:
    from robustlab import attacks, data, defenses, evaluation, models, training
    from robustlab.attacks.losses import loss_names
    from robustlab.training.schedules import SCHEDULES

    return {
        "attacks": attacks.names, "defenses": defenses.names, "models": models.names,
        "objectives": training.objectives,
        "datasets": data.names, "suites": evaluation.suites, "losses": loss_names,
        "schedules": SCHEDULES.names, "activations": models.activations,
    }


def cmd_list(args: argparse.Namespace) -> int:
    regs = _registries()
    for kind in [args.kind] if args.kind else list(regs):
        print(f"{kind}: {', '.join(regs[kind]())}")
    return 0


def _defense_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defense-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of --defense (repeatable), e.g. sigma=0.25 samples=32 "
                        "vote=prediction")
    p.add_argument("--fit-n", type=_positive_int, default=1000,
                   help="training points a defense that needs clean data is fitted on "
                        "(feature-squeezing's threshold, mixup-inference's pool)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustlab", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML recipe")
    t.add_argument("--config", required=True, type=Path, help="recipe, e.g. configs/pgd_at.toml")
    t.add_argument("--out", required=True, type=Path, help="run directory, e.g. runs/pgd_at")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--epochs", type=_positive_int, default=None, help="override the recipe")
    t.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    t.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    t.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="scalars per epoch in OUT/tensorboard/ (default: on when the tensorboard "
                        "package is installed)")
    t.add_argument("--device", default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N; under torchrun each "
                        "process takes cuda:LOCAL_RANK (or the CPU with gloo)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="clean and robust accuracy of a checkpoint")
    e.add_argument("checkpoint", type=Path, help="model.safetensors (with its .json sidecar)")
    e.add_argument("--norm", choices=NORMS, default="linf")
    e.add_argument("--eps", type=_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    e.add_argument("--suite", default="standard",
                   help="attack suite: standard (AutoAttack), fast, rand (randomised models), "
                        "quick, pgd, pgd-strong (robustlab list suites)")
    e.add_argument("--attack", action="append", default=None,
                   help="run this attack instead of a suite (repeatable)")
    e.add_argument("--steps", type=_positive_int, default=None)
    e.add_argument("--restarts", type=_positive_int, default=None)
    e.add_argument("--step-size", type=_eps, default=None)
    e.add_argument("--loss", default=None, help="attack loss for --attack: ce, cw-margin, dlr")
    e.add_argument("--eot", type=_positive_int, default=None,
                   help="average the gradient attacks' gradients over this many draws "
                        "(default: 20 on a randomised model, else 1)")
    e.add_argument("--bpda", action=argparse.BooleanOptionalAction, default=None,
                   help="attack through non-differentiable stages with BPDA (default: on when "
                        "the model has such stages)")
    e.add_argument("--repeats", type=_positive_int, default=None,
                   help="predictions per point, robust by majority (default: the suite's)")
    e.add_argument("--surrogate", type=Path, default=None,
                   help="checkpoint of a surrogate model for the transfer attack")
    e.add_argument("--defense", default=None,
                   help="evaluate the checkpoint inside this defense (robustlab list defenses), "
                        "e.g. smoothing; the attacks see the defended model")
    _defense_args(e)
    e.add_argument("--restart", action="store_true",
                   help="ignore an interrupted evaluation's state in --out and start over")
    e.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--n", "--n-points", dest="n", type=_positive_int, default=1000,
                   help="first n points of the split (under torchrun write --n-points: torchrun "
                        "reads --n as an abbreviation of its own options)")
    e.add_argument("--batch-size", type=_positive_int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="results directory (default: beside checkpoint)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("audit", help="the evaluation checklist (Carlini et al. 2019) on a "
                                     "checkpoint or a defense: PASS / FLAG per check")
    a.add_argument("checkpoint", type=Path, help="model.safetensors (with its .json sidecar)")
    a.add_argument("--norm", choices=NORMS, default="linf")
    a.add_argument("--eps", type=_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    a.add_argument("--defense", default=None,
                   help="audit the checkpoint inside this defense (robustlab list defenses)")
    _defense_args(a)
    a.add_argument("--surrogate", type=Path, default=None,
                   help="checkpoint for the transfer attack (default: the undefended "
                        "checkpoint when --defense is given)")
    a.add_argument("--steps", type=_positive_int, default=100, help="adaptive APGD-CE steps")
    a.add_argument("--queries", type=_positive_int, default=5000,
                   help="query budget of the gradient-free attacks")
    a.add_argument("--eot", type=_positive_int, default=None,
                   help="EOT draws (default: 20 on a randomised model, else 1)")
    a.add_argument("--binarization", type=int, default=20, metavar="N",
                   help="points of the binarization test (0 skips it)")
    a.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    a.add_argument("--n", "--n-points", dest="n", type=_positive_int, default=500,
                   help="first n test points")
    a.add_argument("--batch-size", type=_positive_int, default=500)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None,
                   help="results directory (default: audit[-DEFENSE] beside the checkpoint)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_audit)

    c = sub.add_parser("certify", help="Cohen et al.'s certified radii of a smoothed checkpoint")
    c.add_argument("checkpoint", type=Path, help="base model.safetensors (with its .json sidecar)")
    c.add_argument("--sigma", type=_eps, required=True, help="noise scale in input units")
    c.add_argument("--noise", choices=("gaussian", "laplace"), default="gaussian",
                   help="gaussian: l2 radii; laplace (scale sigma): l1 radii")
    c.add_argument("--n", type=_positive_int, default=100_000, help="estimation draws")
    c.add_argument("--n0", type=_positive_int, default=100, help="selection draws")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    c.add_argument("--n-points", type=_positive_int, default=500, help="examples to certify")
    c.add_argument("--skip", type=_positive_int, default=1,
                   help="take every skip-th example of the split (Cohen et al.: 20 on CIFAR-10)")
    c.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    c.add_argument("--split", default="test", choices=("train", "test"))
    c.add_argument("--batch-size", type=_positive_int, default=1000,
                   help="noisy copies per forward pass")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--out", default=None,
                   help="directory (default: beside the checkpoint, certify_<noise>_<sigma>)")
    c.add_argument("--denoiser", type=Path, default=None,
                   help="denoised smoothing: a denoiser.safetensors (robustlab denoise) in front "
                        "of the checkpoint")
    c.add_argument("--restart", action="store_true", help="discard the rows of an earlier run")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_certify)

    s = sub.add_parser("smooth", help="smoothing curves: accuracy of a smoothed checkpoint vs "
                                      "noise draws n and sigma, for each vote")
    s.add_argument("checkpoint", type=Path, help="base model.safetensors (with its .json sidecar)")
    s.add_argument("--sigmas", type=str, required=True,
                   help="noise scales in input units, comma-separated, e.g. 0,0.12,0.25,0.5")
    s.add_argument("--samples", type=str, required=True,
                   help="numbers of noise draws n, comma-separated, e.g. 1,4,16,64,256 (all "
                        "come from the largest n's draws)")
    s.add_argument("--votes", type=str, default="prediction,soft,weighted",
                   help="voting rules, comma-separated (default: all three)")
    s.add_argument("--noise", choices=("gaussian", "laplace"), default="gaussian")
    s.add_argument("--n", "--n-points", dest="n", type=_positive_int, default=500,
                   help="first n points of the split")
    s.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    s.add_argument("--split", default="test", choices=("train", "test"))
    s.add_argument("--batch-size", type=_positive_int, default=1024,
                   help="noisy copies per forward pass")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--out", default=None,
                   help="directory for smoothing.json (default: smoothing/ beside the checkpoint)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_smooth)

    d = sub.add_parser("denoise", help="train a denoiser for denoised smoothing of a checkpoint")
    d.add_argument("checkpoint", type=Path, help="the classifier (not modified)")
    d.add_argument("--sigma", type=_eps, required=True, help="noise scale to remove")
    d.add_argument("--noise", choices=("gaussian", "laplace"), default="gaussian")
    d.add_argument("--objective", choices=("mse", "stab"), default="mse",
                   help="mse: reconstruct the clean image; stab: keep the classifier's "
                        "clean prediction (fine-tune an mse denoiser with --init)")
    d.add_argument("--epochs", type=_positive_int, required=True)
    d.add_argument("--init", type=Path, default=None, help="start from this denoiser")
    d.add_argument("--depth", type=_positive_int, default=8)
    d.add_argument("--width", type=_positive_int, default=32)
    d.add_argument("--n-train", type=_positive_int, default=None, help="first n train images")
    d.add_argument("--batch-size", type=_positive_int, default=128)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    d.add_argument("--out", required=True, type=Path,
                   help="run directory; a rerun resumes after its last epoch")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_denoise)

    r = sub.add_parser("report", help="one self-contained HTML page of one or more runs: flags, "
                                      "accuracies, attack cascade, curves, examples, provenance")
    r.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories (robustlab train/evaluate/audit/certify/smooth --out)")
    r.add_argument("-o", "--output", type=Path, default=None,
                   help="HTML file (default: RUN_DIR/report.html for one run, else report.html)")
    r.add_argument("--title", default=None, help="page title")
    r.set_defaults(func=cmd_report)

    cm = sub.add_parser("compare", help="a RobustBench-style leaderboard of runs (Markdown)")
    cm.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    cm.add_argument("-o", "--output", type=Path, default=None,
                    help="write the Markdown here instead of printing it")
    cm.set_defaults(func=cmd_compare)

    ls = sub.add_parser("list", help="what is registered")
    ls.add_argument("kind", nargs="?", choices=sorted(_registries()), default=None)
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"robustlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
