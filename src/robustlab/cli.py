"""The command line: ``robustlab train | evaluate | audit | certify | smooth | denoise |
convert-weights | report | compare | list``. The pretrained zoo's commands are in
:mod:`robustlab.cli_zoo`.

Progress bars and printing live here, never in the library. The CLI seeds torch once and
records the seed with every result. The arguments (the options every command shares come
from one parent parser) are in :mod:`robustlab.cli_args`. This is the one module that imports
the library inside its functions: a command loads only what it runs, after its arguments were
parsed and checked (:mod:`robustlab.cli_out`: output folders, file-system problems, finished
results, an eps that covers the input box). The model and data a command runs on (a checkpoint
or ``--model SPEC``; ``--data``), and the check that they fit, are in :mod:`robustlab.cli_inputs`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import operator
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustlab import cli_out
from robustlab.cli_args import REGISTRIES, VERIFY_BATCH, build_parser, parse_options

if TYPE_CHECKING:
    import torch


def _device(name: str) -> torch.device:
    """``--device`` as a torch device; a ``ValueError`` naming what is there when it is not."""
    from robustlab._validate import resolve_device

    return resolve_device(name, fix="--device cpu")


def _launch(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """The process group and this process's device: under ``torchrun`` the launch's (training
    is data-parallel, evaluation sharded over the ranks), else one process on ``--device``."""
    from robustlab import distributed

    if distributed.launched():  # torchrun --nproc_per_node=N -m robustlab ...
        return distributed.init_from_env()
    return distributed.World(), _device(args.device)


def _inputs(
    args: argparse.Namespace, device: torch.device, *, n: int | None, split: str = "test"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model (checkpoint or ``--model``) on ``device``, the data (``--data``, else the
    checkpoint's data set, else Fashion-MNIST; ``--split``, else ``split``; the first ``n``
    images), checked to fit before anything runs, and what a result records of both
    (:mod:`robustlab.cli_inputs`)."""
    from robustlab import cli_inputs, defenses

    model, trained_on, spec = cli_inputs.load_model(args, device)
    inputs = cli_inputs.load_data(args, trained_on, split=getattr(args, "split", split), n=n)
    extra = (
        defenses.DEFENSES.get(args.defense).extra_outputs if getattr(args, "defense", None) else 0
    )
    cli_inputs.check_fit(model, inputs, args.num_classes, device, extra)
    return model, inputs, cli_inputs.record(args, inputs, spec)


def _config(args: argparse.Namespace, about: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a result records of the command: its model and data (``about``, from
    :func:`_inputs`: the checkpoint or the ``--model`` spec, the data set or file with its
    class names for the report, the split), the settings that recognise a rerun, and
    ``extra``."""
    return {**about, "cli_settings": getattr(args, "cli_settings", None), **extra}


def _out(msg: str = "", quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


# --- train ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from robustlab import cli_inputs, data, distributed
    from robustlab.config import load_recipe
    from robustlab.training import Trainer

    recipe = load_recipe(args.config)
    world, device = _launch(args)
    quiet = args.quiet or not world.main
    cfg = recipe.train
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seed is not None:
        cfg.seed = args.seed
    torch.manual_seed(cfg.seed)
    out = args.out
    x, y = data.load(recipe.dataset, split="train", n=recipe.n_train)
    if recipe.unlabeled is not None:  # the semi-supervised objectives' pool
        cfg.objective_options["unlabeled"] = cli_inputs.unlabeled_pool(
            recipe.unlabeled, recipe.unlabeled_n, recipe.dataset, recipe.n_train
        )
    val = None
    if recipe.val_n:  # the LAST val_n test images: disjoint from `evaluate --n`'s first ones
        xv, yv = data.load(recipe.dataset, split="test")
        val = (xv[-recipe.val_n :], yv[-recipe.val_n :])
    model = recipe.create_model().to(device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.source, indent=2) + "\n")
    distributed.barrier(world)
    trainer = Trainer(
        model,
        (x, y),
        cfg,
        threat=recipe.threat,
        out=out,
        val=val,
        progress=not quiet,
        callback=lambda rec: _out(cli_out.epoch_line(rec, trainer.passes), quiet),
        tensorboard=args.tensorboard,
    )
    ranks = f" on {world.size} processes" if world.size > 1 else ""
    _out(
        f"training {recipe.model['arch']} on {recipe.dataset} ({len(x)} images) with "
        f"{cfg.objective}, {recipe.threat or 'no threat model'}, {trainer.passes} passes over "
        f"the data, {device}{ranks} -> {out}",
        quiet,
    )
    try:
        trainer.run(resume=args.resume)
    finally:
        distributed.shutdown(world)
    _out(f"checkpoint: {out / 'model.safetensors'}\ntraining log: {out / 'train_log.jsonl'}", quiet)
    return 0


# --- evaluate and audit -----------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from robustlab import distributed, models
    from robustlab.evaluation import evaluate_sharded
    from robustlab.report import markdown
    from robustlab.threat import ThreatModel

    world, device = _launch(args)  # torchrun: the points are split over the ranks and merged
    quiet = args.quiet or not world.main
    torch.manual_seed(args.seed)
    model, inputs, about = _inputs(args, device, n=args.n)
    x, y = inputs.x, inputs.y  # batches go to the model's device
    cli_out.check_eps(args, x.shape[1:])
    threat = ThreatModel(args.norm, args.eps)
    model, defense = _defended(args, model, inputs, device, quiet)
    options = {
        k: v
        for k in ("loss", "steps", "restarts", "step_size")
        if (v := getattr(args, k)) is not None
    }
    attacks = [(a, options) for a in args.attack] if args.attack else None
    out = args.out  # default: named from the settings (cli_out.default_folder)
    surrogate = (
        models.load(args.surrogate, device=device, trust_code=args.trust_code)
        if args.surrogate
        else None
    )
    try:
        result = evaluate_sharded(
            model,
            x,
            y,
            threat,
            suite=args.suite,
            attacks=attacks,
            batch_size=args.batch_size,
            seed=args.seed,
            out=str(out),
            progress=not quiet,
            resume=not (args.restart or args.overwrite),
            repeats=args.repeats,
            surrogate=surrogate,
            bpda=args.bpda,
            eot=args.eot,
            log_outputs=args.log_outputs,
            config=_config(args, about, defense=defense, command=" ".join(sys.argv)),
        )
    finally:
        distributed.shutdown(world)
    _out(markdown(result.record), quiet)
    _out(
        f"results: {out / 'results.json'}\nper-sample: {out / 'per_sample.jsonl'}\n"
        f"summary: {out / 'summary.md'}",
        quiet,
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import torch

    from robustlab import models
    from robustlab.evaluation.audit import audit
    from robustlab.report import markdown
    from robustlab.threat import ThreatModel

    device = _device(args.device)
    torch.manual_seed(args.seed)
    model, inputs, about = _inputs(args, device, n=args.n)
    x, y = inputs.x, inputs.y  # batches go to the model's device
    cli_out.check_eps(args, x.shape[1:])
    threat = ThreatModel(args.norm, args.eps)
    model, defense = _defended(args, model, inputs, device, args.quiet)
    surrogate = (
        models.load(args.surrogate, device=device, trust_code=args.trust_code)
        if args.surrogate
        else None
    )
    out = args.out
    result = audit(
        model,
        x,
        y,
        threat,
        surrogate=surrogate,
        steps=args.steps,
        queries=args.queries,
        eot=args.eot,
        binarization_points=args.binarization,
        log_outputs=args.log_outputs,
        batch_size=args.batch_size,
        seed=args.seed,
        out=out,
        progress=not args.quiet,
        config=_config(args, about, defense=defense, command=" ".join(sys.argv)),
    )
    _out(markdown(result.record), args.quiet)
    _out(f"results: {out / 'results.json'}\nsummary: {out / 'summary.md'}", args.quiet)
    return 0


def _defended(
    args: argparse.Namespace, model: torch.nn.Module, inputs: Any, device: torch.device, quiet: bool
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """``model`` inside ``--defense`` (with ``--defense-option``s) on ``device``, and the
    defense's record. A defense that is not ``fitted`` (a detector without its threshold,
    mixup inference without its pool) is fitted on the first ``--fit-n`` points of the
    registered data set's training split, never on the test points; a ``--data`` file or
    folder has no training split, so such a defense is refused there."""
    if not args.defense:
        return model, None
    from robustlab import data, defenses

    options = parse_options(args.defense_option)
    model = defenses.create(args.defense, model, **options).to(device)
    record: dict[str, Any] = {"name": args.defense, **options}
    if not model.fitted:
        if inputs.split is None:
            raise ValueError(
                f"--defense {args.defense} is fitted on training data, which "
                f"--data {inputs.source} does not have (a file or folder has no "
                "split): use a registered data set, or a defense without fitting"
            )
        xf, yf = data.load(inputs.source, split="train", n=args.fit_n)
        model.fit(xf.to(device), yf.to(device))
        record["fit"] = {"split": "train", "n": len(xf)}
        _out(f"{args.defense}: fitted on the first {len(xf)} training points", quiet)
    return model, record


# --- certify, smooth and denoise --------------------------------------------------------------
def cmd_certify(args: argparse.Namespace) -> int:
    from robustlab import defenses
    from robustlab.evaluation.certification import run_certification
    from robustlab.noise import CERTIFIED_NORM, check_noise

    if args.method != "smoothing":  # --eps and --sigma: checked in cli_out.prepare
        return _verify(args)
    check_noise(args.noise, args.sigma)  # e.g. --keep outside (0, 1), before loading anything
    device = _device(args.device)
    model, inputs, about = _inputs(args, device, n=None)
    if args.denoiser:  # denoised smoothing: certify classifier(denoiser(x + delta))
        model = defenses.create("denoised", model, denoiser=str(args.denoiser)).to(device)
    idx = list(range(0, len(inputs.x), args.skip))[: args.n_points]
    x, y = inputs.x[idx].to(device), inputs.y[idx].to(device)
    out = args.out
    norm = CERTIFIED_NORM[args.noise]
    every = f" (every {args.skip}-th)" if args.skip > 1 else ""
    split = f" {inputs.split}" if inputs.split else ""
    _out(
        f"certifying {len(x)} {inputs.source}{split} images{every}; rows in "
        f"{out / 'certify.jsonl'}",
        args.quiet,
    )  # the noise and draws: the bar's header
    _out("idx\tlabel\tpredict\tradius\tcorrect\ttime", args.quiet)

    def row(r: dict[str, Any]) -> None:
        _out(
            f"{r['index']}\t{r['label']}\t{r['prediction']}\t{r['radius']:.4f}\t"
            f"{int(r['correct'])}\t{r['seconds']:.2f}",
            args.quiet,
        )

    summary = run_certification(
        model,
        x,
        y,
        sigma=args.sigma,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        noise=args.noise,
        batch_size=args.batch_size,
        seed=args.seed,
        indices=idx,
        out=out,
        resume=not (args.restart or args.overwrite),
        on_row=row,
        progress=not args.quiet,
        sequential={
            "max_n": args.max_n,
            "radius_tolerance": args.radius_tolerance,
            "min_radius": args.min_radius,
            "max_radius": args.max_radius,
        }
        if args.sequential
        else None,
        config=_config(args, about, denoiser=str(args.denoiser) if args.denoiser else None),
    )
    curve = ", ".join(
        f"r={c['radius']:g}: {100 * c['accuracy']:.1f}%" for c in summary["certified_accuracy"][::5]
    )
    _out(
        f"smoothed clean accuracy {100 * summary['clean_accuracy']:.1f}%, abstained "
        f"{100 * summary['abstain_rate']:.1f}%, average certified radius "
        f"{summary['average_certified_radius']:.3f} ({norm})\ncertified accuracy: {curve}\n"
        f"summary: {out / 'certify.json'}",
        args.quiet,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    """``certify --method ibp|crown|crown-ibp``: verified accuracy next to the robust accuracy
    of ``--suite`` (seeded by ``--seed``) on the same points in one results.json, verified <=
    robust checked per point (:func:`robustlab.defenses.verify.annotate`)."""
    from robustlab.defenses.verify import annotate, verify
    from robustlab.evaluation import evaluate
    from robustlab.report import markdown
    from robustlab.threat import ThreatModel

    model, inputs, about = _inputs(args, device := _device(args.device), n=None)
    idx = list(range(0, len(inputs.x), args.skip))[: args.n_points]
    x, y = inputs.x[idx], inputs.y[idx]
    cli_out.check_eps(args, x.shape[1:])
    threat, batch = ThreatModel(args.norm, args.eps), args.batch_size or VERIFY_BATCH
    ver = verify(model, x.to(device), y.to(device), threat, args.method, batch)
    result = evaluate(
        model,
        x,
        y,
        threat,
        suite=args.suite,
        batch_size=batch,
        seed=args.seed,
        progress=not args.quiet,
        config=_config(args, about, method=args.method, command=" ".join(sys.argv)),
    )
    annotate(ver, result.record, result.per_sample, result.robust)
    result.save(args.out)
    _out(markdown(result.record) + f"\nresults: {args.out / 'results.json'}", args.quiet)
    return 0


def cmd_smooth(args: argparse.Namespace) -> int:
    import torch

    from robustlab.evaluation.smoothing_curves import FILE, smoothing_curves

    def listed(option: str, kind: type, example: str) -> list[Any]:
        text = getattr(args, option)
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(
                f"--{option} takes comma-separated {kind.__name__}s, e.g. {example}, got {text!r}"
            ) from None

    sigmas = listed("sigmas", float, "0,0.12,0.25,0.5")
    samples = listed("samples", int, "1,4,16,64,256")
    votes = [v.strip() for v in args.votes.split(",")]
    torch.manual_seed(args.seed)  # a model with weight noise draws it from the global generator
    device = _device(args.device)
    model, inputs, about = _inputs(args, device, n=args.n)
    x, y = inputs.x.to(device), inputs.y.to(device)
    out = args.out
    split = f" {inputs.split}" if inputs.split else ""
    _out(
        f"smoothing curves of {cli_out.model_words(args)} on {len(x)} {inputs.source}{split} "
        f"images, {args.noise} noise",
        args.quiet,
    )
    rec = smoothing_curves(
        model,
        x,
        y,
        sigmas=sigmas,
        samples=samples,
        votes=votes,
        noise=args.noise,
        batch_size=args.batch_size,
        seed=args.seed,
        out=out,
        progress=not args.quiet,
        config=_config(args, about, command=" ".join(sys.argv)),
    )
    cfg = rec["config"]
    acc = {(r["sigma"], r["samples"], r["vote"]): r["accuracy"] for r in rec["rows"]}
    _out(f"base model (no noise): {100 * rec['base_accuracy']:.1f}%", args.quiet)
    for vote in cfg["votes"]:
        _out(f"\n{vote} vote: accuracy (%) by sigma and n draws", args.quiet)
        _out("sigma\t" + "\t".join(f"n={n}" for n in cfg["samples"]), args.quiet)
        for sigma in cfg["sigmas"]:
            _out(
                f"{sigma:g}\t"
                + "\t".join(f"{100 * acc[sigma, n, vote]:.1f}" for n in cfg["samples"]),
                args.quiet,
            )
    _out(f"\nsmoothing curves: {out / FILE}", args.quiet)
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from robustlab.models.dncnn import Denoiser, load_denoiser
    from robustlab.training.denoiser import train_denoiser

    device = _device(args.device)
    classifier, inputs, _ = _inputs(args, device, n=args.n_train, split="train")
    x = inputs.x
    if args.init:
        denoiser = load_denoiser(args.init, device=device)
    else:
        denoiser = Denoiser(in_channels=x.shape[1], depth=args.depth, width=args.width).to(device)

    def row(r: dict[str, Any]) -> None:
        extra = (
            f", classifier agrees with its clean prediction on {100 * r['stab_accuracy']:.1f}%"
            if "stab_accuracy" in r
            else ""
        )
        _out(
            f"epoch {r['epoch']:>3}/{args.epochs} | loss {r['loss']:.5f} | "
            f"{r['time_s']:.0f}s{extra}",
            args.quiet,
        )

    train_denoiser(
        denoiser,
        x,
        sigma=args.sigma,
        epochs=args.epochs,
        objective=args.objective,
        classifier=classifier if args.objective == "stab" else None,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        seed=args.seed,
        noise=args.noise,
        log=row,
    )
    path = args.out / "denoiser.safetensors"
    _out(
        f"denoiser: {path}; certify the classifier behind it with: robustlab certify "
        f"{cli_out.model_words(args)}{f' --data {args.dataset}' if args.dataset else ''} "
        f"--sigma {args.sigma:g} --denoiser {path}",
        args.quiet,
    )
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from robustlab import models

    rec = models.convert_weights(args.source, args.target, key=args.key)
    entry = f"entry {rec['key']!r}" if rec["key"] is not None else "the whole file"
    print(
        f"converted {rec['tensors']} tensors ({entry}) of {args.source} into {args.target}\n"
        f"prefixes stripped: {', '.join(rec['prefixes_stripped']) or 'none'}\n"
        f"source SHA-256: {rec['source_sha256']}\nrecord: {args.target}.json\n"
        f"use it: robustlab evaluate --model FILE.py:NAME --weights {args.target} "
        "--data DATA --eps EPS"
    )
    return 0


# --- report, compare and list -----------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from robustlab.report import load_run, write_report

    runs = [load_run(p) for p in args.runs]
    for skipped in (s for run in runs for s in run.skipped):
        print(f"robustlab report: skipped {skipped}", file=sys.stderr)
    out = args.output or (
        args.runs[0] / "report.html" if len(args.runs) == 1 else Path("report.html")
    )
    path = write_report(runs, out, title=args.title)
    print(f"report: {path.resolve()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from robustlab._io import atomic_write
    from robustlab.report import leaderboard_markdown, load_run

    runs = [load_run(p) for p in args.runs]
    for skipped in (s for run in runs for s in run.skipped):
        print(f"robustlab compare: skipped {skipped}", file=sys.stderr)
    if args.zoo:  # the pretrained models, ranked from their cards' evaluations
        from robustlab.cli_zoo import zoo_runs

        runs += zoo_runs()
    text = leaderboard_markdown(runs)
    if args.output:
        atomic_write(args.output, text)
        print(f"leaderboard: {args.output.resolve()}")
    else:
        print(text, end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.kind == "suites":
        from robustlab.evaluation.suites import SUITES

        print("\n".join(cli_out.suite_lines(SUITES)))
        return 0
    if args.kind == "zoo":
        from robustlab.cli_zoo import zoo_lines

        print("\n".join(zoo_lines()))
        return 0
    for kind in [args.kind] if args.kind else list(REGISTRIES):
        module, function = REGISTRIES[kind]
        names = operator.attrgetter(function)(importlib.import_module(module))
        print(f"{kind}: {', '.join(names())}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "audit": cmd_audit,
    "certify": cmd_certify,
    "smooth": cmd_smooth,
    "denoise": cmd_denoise,
    "convert-weights": cmd_convert_weights,
    "report": cmd_report,
    "compare": cmd_compare,
    "list": cmd_list,
}


def main(argv: list[str] | None = None) -> int:
    """Run ``robustlab ARGV``; the exit status: 0, 2 on a user error (printed on stderr, no
    traceback), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if (done := cli_out.prepare(args)) is not None:  # before anything is loaded
            _out(done)
            return 0
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as e:  # one line, even for a message of several
        print(f"robustlab {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system problem: one line with the path, never a traceback
        print(f"robustlab {args.command}: error: {cli_out.os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
