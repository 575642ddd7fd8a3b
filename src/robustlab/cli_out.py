"""What the command line checks between parsing its arguments and loading anything: where a
command writes (a folder named from the settings that change its result, unless ``--out``),
file-system problems (one line naming the path and the fix), a finished result that would be
replaced (never without ``--overwrite``), and an eps that covers the whole input box (most
likely ``8`` meant for ``8/255``).

Nothing here imports torch: a problem is reported in a fraction of a second, before a model,
a data set or an attack is loaded. The model a command runs on is a checkpoint or ``--model
SPEC`` (:func:`check_model_args`); a ``--model`` run writes under ``runs/<NAME>/`` of the current
folder, its spec, options, weights, normalisation and data in the settings' hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab._eps import box_diameter
from robustlab.cli_args import build_parser, commands, parse_options

RESULT = {
    "evaluate": "results.json",
    "audit": "results.json",
    "certify": "certify.json",
    "smooth": "smoothing.json",
}  # the file a finished run of each command leaves
RESUMES_FINISHED = {"certify"}  # reruns certify only the examples without a row
WHAT = {
    "evaluate": "evaluation",
    "audit": "audit",
    "certify": "certification",
    "smooth": "set of smoothing curves",
}
EVAL_STATE = "eval_state.safetensors"  # robustlab.evaluation.state.FILENAME: an interrupted run
INPUTS = {
    "checkpoint": "the checkpoint's .safetensors file",
    "config": "the .toml recipe",
    "surrogate": "the surrogate's .safetensors file",
    "denoiser": "the denoiser's .safetensors file",
    "init": "a denoiser .safetensors file",
    "weights": "the weights' .safetensors file",
    "source": "the .pt file to convert",
}
MODEL_KEYS = ("model", "model_option", "weights", "normalize", "resize")  # in the settings
SPEC_ONLY = ("model_option", "weights", "normalize")  # options of --model, not of a checkpoint


def _num(v: float) -> str:
    return f"{v:.6g}"


# --- the folder a command writes to -----------------------------------------------------------
def _threat(args: argparse.Namespace) -> list[str]:
    return [args.norm, _num(args.eps)]


def _settings(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The parts of the folder's name, and every setting that changes the command's result
    (those not in the name go into a short hash appended to it when they are not defaults)."""
    c = args.command
    if c == "evaluate":
        # no --suite: evaluation.suites.default_suite of the model (torch-free here)
        smoothed = args.defense == "smoothing"
        what = (
            "-".join(args.attack)
            if args.attack
            else args.suite or ("smoothed" if smoothed else "standard")
        )
        name = ["eval", *_threat(args), what, f"n{args.n}", f"seed{args.seed}"]
        extra: tuple[str, ...] = (
            "steps",
            "restarts",
            "step_size",
            "loss",
            "repeats",
            "bpda",
            "surrogate",
            "eot",
        )
    elif c == "audit":
        name = ["audit", *_threat(args), f"n{args.n}", f"seed{args.seed}"]
        extra = ("steps", "queries", "binarization", "surrogate", "eot")
    elif c == "certify" and args.method != "smoothing":  # bound propagation: an evaluation
        if args.eps is None:
            raise ValueError(
                f"--method {args.method} needs --eps, the radius in input units, e.g. --eps 0.1"
            )
        name = [
            "verify",
            args.method,
            *_threat(args),
            args.suite,
            f"n{args.n_points}",
            f"seed{args.seed}",
        ]
        extra = ("skip",)
    elif c == "certify":  # not the points: a rerun with more of them adds rows (resumes)
        if args.sigma is None:
            raise ValueError("--method smoothing needs --sigma (--keep for uniform-l0 noise)")
        name = ["certify", args.noise, _num(args.sigma), f"n{args.n}", f"seed{args.seed}"]
        extra = ("n0", "alpha", "denoiser")
    else:  # smooth: the lists of sigmas and draws go into the hash
        name = ["smooth", args.noise, f"n{args.n}", f"seed{args.seed}"]
        extra = ("sigmas", "samples", "votes")
    if getattr(args, "defense", None):
        name.append(args.defense)
        extra += ("defense_option", "fit_n")
    if args.split != "test":
        name.append(args.split)
    common = ("dataset",) if c == "certify" else ("dataset", "batch_size")  # rows: any batch
    settings = {k: getattr(args, k) for k in (*common, *extra)}
    settings.update({k: v for k in MODEL_KEYS if (v := getattr(args, k, None)) is not None})
    return name, _absolute(settings)


def _absolute(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the paths in them absolute (the data when it is written as a path,
    the weights, a spec's ``.py`` file), so that one file is one setting from any folder."""
    out = dict(settings)
    data = out.get("dataset")
    if isinstance(data, str) and (
        os.sep in data or "/" in data or data.endswith((".npz", ".safetensors"))
    ):
        out["dataset"] = str(Path(data).resolve())
    if out.get("weights") is not None:
        out["weights"] = str(Path(out["weights"]).resolve())
    where, _, name = str(out.get("model") or "").rpartition(":")
    if where.endswith(".py") or "/" in where:
        out["model"] = f"{Path(where).resolve()}:{name}"
    return out


def model_name(spec: str) -> str:
    """The folder a ``--model`` run writes under: ``runs/<NAME>``, NAME the spec's last part
    (``net.py:Net`` -> ``runs/Net``), relative to the current folder."""
    name = spec.rpartition(":")[2] or Path(spec).stem or "model"
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9.,+=_-]", "_", name))


def model_words(args: argparse.Namespace) -> str:
    """The model as the command line named it: the checkpoint, or ``--model SPEC`` with its
    options, weights and normalisation."""
    if args.model is None:
        return str(args.checkpoint)
    return " ".join(
        [
            f"--model {args.model}",
            *(f"--model-option {o}" for o in args.model_option or []),
            *([f"--weights {args.weights}"] if args.weights else []),
            *([f"--normalize {args.normalize}"] if args.normalize else []),
        ]
    )


def default_folder(args: argparse.Namespace) -> Path:
    """``<checkpoint dir>/<command>-<settings>``, e.g. ``eval-linf-0.1-standard-n1000-seed0``,
    with ``-<hash>`` of the settings outside the name that are not their defaults: a rerun of
    the same settings finds its folder (and resumes), other settings never touch it. A
    ``--model`` run's folder is under ``runs/<NAME>`` (:func:`model_name`) instead of the
    checkpoint's, its spec, options, weights and normalisation in the hash."""
    name, extra = _settings(args)
    defaults = commands(build_parser())[args.command]
    changed = {
        k: v for k, v in extra.items() if v not in (None, False) and v != defaults.get_default(k)
    }
    if changed:
        blob = json.dumps(changed, sort_keys=True, default=str).encode()
        name.append(hashlib.sha256(blob).hexdigest()[:6])
    text = "-".join(str(p) for p in name)
    base = args.checkpoint.parent if args.checkpoint is not None else Path(model_name(args.model))
    return base / re.sub(r"[^A-Za-z0-9.,+=_-]", "_", text)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a result records of the command line to recognise a rerun: its settings and the
    checkpoint's ``model_sha256`` (from the sidecar; None where there is none yet), or for
    ``--model`` the SHA-256 of its ``--weights`` file (``weights_sha256``)."""
    name, extra = _settings(args)
    try:
        side = json.loads(args.checkpoint.with_suffix(".json").read_text())
        model = side.get("model_sha256") or side.get("sha256")
    except (OSError, ValueError, AttributeError):
        model = None
    if args.model is not None and args.weights is not None:
        try:
            extra["weights_sha256"] = hashlib.sha256(args.weights.read_bytes()).hexdigest()
        except OSError:
            extra["weights_sha256"] = None  # missing: the command says so when it loads
    return json.loads(json.dumps({"name": name, **extra, "model_sha256": model}, default=str))


# --- file-system problems ---------------------------------------------------------------------
def check_folder(path: Path, option: str = "--out") -> None:
    """ValueError naming ``path`` and the fix unless a folder can be written there (it is
    created later, by the command; nothing is left behind here)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder (created when missing)")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(
            f"{option} {path}: {base} is a file, not a folder; give a path under a folder"
        )
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ValueError(
            f"{option} {path}: {base} is not writable ({e.strerror}); give a "
            "folder you can write to"
        ) from None


def check_file(path: Path, option: str, example: str = "report.html") -> None:
    """ValueError unless a file can be written at ``path`` (``example``: a file name the
    message suggests inside a folder given instead)."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    check_folder(path.parent, f"{option} {path}: the folder")


def check_paths(args: argparse.Namespace) -> None:
    """The inputs that must be files, and the outputs, of any command."""
    for attr, what in INPUTS.items():
        path = getattr(args, attr, None)
        if path is not None and path.is_dir():
            raise ValueError(f"{path} is a folder; give {what}")
    if getattr(args, "out", None) is not None:
        check_folder(args.out)
    if getattr(args, "output", None) is not None:
        check_file(args.output, "-o")


def os_error(e: OSError) -> str:
    """One line for an ``OSError`` met while running: the path (the folder, for the temporary
    file of an atomic write) and what went wrong."""
    if e.filename is None:  # raised with a message of its own (a missing checkpoint, ...)
        return str(e)
    name = Path(e.filename)
    if name is not None and name.name.startswith(".") and name.name.endswith(".tmp"):
        name = name.parent
    return f"{name}: {e.strerror or e}; check the path and its permissions, or choose another --out"


# --- finished results and eps slips -----------------------------------------------------------
def finished(args: argparse.Namespace) -> str | None:
    """A line saying that ``args.out`` already holds this very result (same checkpoint and
    settings: nothing to do); FileExistsError if it holds another finished result; None if
    the command should run (no finished result, an interrupted one, ``--overwrite``, or a
    certification of the same settings, which adds the rows of examples it lacks)."""
    verifies = getattr(args, "method", "smoothing") != "smoothing"  # certify --method ibp...
    result = args.out / ("results.json" if verifies else RESULT[args.command])
    if args.overwrite or not result.exists() or (args.out / EVAL_STATE).exists():
        return None
    try:
        recorded = json.loads(result.read_text()).get("config", {}).get("cli_settings")
    except (OSError, ValueError, AttributeError):
        recorded = None
    what = WHAT[args.command]
    if recorded is not None and recorded == args.cli_settings:
        if args.command in RESUMES_FINISHED and not verifies:
            return None
        return (
            f"{result} already holds this {what} (same checkpoint and settings); pass "
            "--overwrite to run it again"
        )
    raise FileExistsError(
        f"{args.out} already holds a finished {what} with other settings or "
        f"of another checkpoint ({result}); pass --overwrite to replace it, "
        "or --out to write elsewhere"
    )


def check_eps(args: argparse.Namespace, shape: Sequence[int] = (1,)) -> None:
    """ValueError when the ``--eps`` ball covers the whole input box [0, 1] of inputs of one
    sample's ``shape`` (linf: eps >= 1 whatever the shape; l0: eps >= the number of pixels),
    unless ``--force-eps``: every point is then an attack's candidate, and a robust accuracy
    of 0 says nothing."""
    if getattr(args, "eps", None) is None or args.force_eps:
        return
    size = box_diameter(args.norm, shape)
    if args.eps >= size:
        within = "" if args.norm == "linf" else f" ({args.norm} diameter {size:.4g})"
        raise ValueError(
            f"eps {args.eps:g} covers the whole input box [0, 1]{within}; did you "
            f"mean {args.eps:g}/255 (= {args.eps / 255:.4f})? pass --force-eps to "
            "run it anyway"
        )


def check_model_args(args: argparse.Namespace) -> None:
    """ValueError unless the command names its model once: a checkpoint or ``--model SPEC``,
    ``--model``'s options only with it, and ``--data`` with it (a spec names no data set)."""
    if not hasattr(args, "model"):
        return
    spec_only = [f"--{k.replace('_', '-')}" for k in SPEC_ONLY if getattr(args, k) is not None]
    if args.checkpoint is not None and args.model is not None:
        raise ValueError(f"give a checkpoint ({args.checkpoint}) or --model {args.model}, not both")
    if args.checkpoint is None and args.model is None:
        raise ValueError(
            f"no model: give a checkpoint (robustlab {args.command} "
            "model.safetensors ...) or your own with --model path/to/file.py:NAME"
        )
    if args.checkpoint is not None and spec_only:
        raise ValueError(
            f"{', '.join(spec_only)} apply to --model SPEC only; the checkpoint "
            f"{args.checkpoint} records its own architecture, weights and "
            "normalisation"
        )
    if args.model is not None and args.dataset is None:
        raise ValueError(
            f"--model {args.model} needs --data: a registered data set "
            "(robustlab list datasets), a folder of images in class subfolders, "
            "or an .npz / .safetensors file of x and y"
        )
    parse_options(args.model_option, "--model-option")


def check_convert(args: argparse.Namespace) -> None:
    """``convert-weights``: OUT can be written, and is not replaced without ``--overwrite``."""
    check_file(args.target, "OUT", "model.safetensors")
    if args.target.exists() and not args.overwrite:
        raise FileExistsError(
            f"{args.target} exists; pass --overwrite to replace it (and its "
            f"record {args.target.name}.json), or choose another OUT"
        )


def prepare(args: argparse.Namespace) -> str | None:
    """Everything checked before a command loads anything; fills in the default ``args.out``
    and ``args.cli_settings``. Returns a line to print instead of running when the result is
    already there; raises ValueError / FileExistsError with one line naming the fix."""
    parse_options(getattr(args, "defense_option", None))  # the arguments first, then the files
    check_model_args(args)
    if getattr(args, "norm", None) == "linf":  # l2 / l1: once the input size is known
        check_eps(args)
    check_paths(args)
    if args.command == "convert-weights":
        check_convert(args)
    if args.command not in RESULT:
        return None
    if args.out is None:
        args.out = default_folder(args)
        check_folder(args.out)
    args.cli_settings = run_settings(args)
    return finished(args)


def _stage(attack: str, o: dict[str, Any]) -> str:
    """One stage of a suite in words: ``transfer (apgd-ce 20 steps on the surrogate)``,
    ``epgd cw-margin 10 steps x 8 draws``."""
    if attack == "transfer":
        inner = o.get("attack_options", {})
        steps = f" {inner['steps']} steps" if "steps" in inner else ""
        return f"transfer ({o.get('attack', 'pgd')}{steps} on the surrogate)"
    runs = o.get("restarts", 1) * o.get("n_target_classes", o.get("k", 1))
    return " ".join(
        [
            attack,
            *([o["loss"]] if "loss" in o else []),
            *([f"{o['steps']} steps"] if "steps" in o else []),
            *([f"x {runs}"] if runs > 1 else []),
            *([f"x EOT {o['eot']}"] if "eot" in o else []),
            *([f"x {o['samples']} draws"] if "samples" in o else []),
        ]
    )


def suite_lines(suites: Any) -> list[str]:
    """What ``robustlab list suites`` prints of the registry ``suites``: per suite its attacks
    in order (linf), its cost per point (gradient steps, each a forward and backward pass of
    the model, or of the base model for noise draws; queries; when no stage breaks the point
    early) and what it is for."""
    lines = ["suites (robustlab evaluate --suite NAME; a point broken early costs less):"]
    for name in suites.names():
        suite, grads, queries, parts = suites.get(name), 0, 0, []
        for attack, o in suite.for_norm("linf"):
            if "n_queries" in o:
                queries += o["n_queries"]
                parts.append(f"{attack} {o['n_queries']} queries")
                continue
            parts.append(_stage(attack, o))
            inner = o.get("attack_options", {}) if attack == "transfer" else o
            runs = o.get("restarts", 1) * o.get("n_target_classes", o.get("k", 1))
            grads += runs * inner.get("steps", 1) * o.get("eot", 1) * o.get("samples", 1)
        cost = f"{grads:,} gradient steps" + (f" + {queries:,} queries" if queries else "")
        votes = f" and {suite.repeats} predictions" if suite.repeats > 1 else ""
        lines += [
            f"  {name}: {', '.join(parts)} (cost per point: up to {cost}{votes})",
            f"      {suite.description}",
        ]
    return lines


def epoch_line(rec: dict[str, Any], passes: int) -> str:
    """The line ``robustlab train`` prints after each epoch, from its log record ``rec``."""
    parts = [
        f"epoch {rec['epoch']:>3}/{passes}",
        f"loss {rec['train_loss']:.4f}",
        f"lr {rec['lr']:.3g}",
        f"{rec['train_time_s']:.0f}s",
    ]
    if "val_clean_acc" in rec:
        parts.append(f"val clean {100 * rec['val_clean_acc']:.1f}%")
    if "val_robust_acc" in rec:
        parts.append(f"val robust {100 * rec['val_robust_acc']:.1f}%")
    if "probe_robust_acc" in rec:
        parts.append(f"probe PGD-5 {100 * rec['probe_robust_acc']:.1f}%")
    if "holdout_robust_acc" in rec:
        parts.append(
            f"hold-out robust {100 * rec['holdout_robust_acc']:.1f}% "
            f"(best epoch {rec['best_epoch']})"
        )
    if "overfit" in rec:
        parts.append(f"catastrophic overfitting: {rec['overfit']}")
    return " | ".join(parts)
