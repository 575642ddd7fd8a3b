"""The command line's arguments: one sub-parser per command of :mod:`robustlab.cli`, the
parent parser of the options the commands share (:func:`shared`), and the argparse types.

Parsing needs nothing of the library but the threat model's vocabulary (norms, ``8/255``, from
the torch-free :mod:`robustlab._eps`), so a bad argument is refused before torch, a model, a
data set or an attack is loaded. Each sub-parser
records its command's name in ``command``; :mod:`robustlab.cli` runs it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from robustlab._eps import NORMS, parse_eps
from robustlab._provenance import package_version


def _positive_int(text: str) -> int:
    """argparse type of a count (points, steps, draws, a batch size): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    """argparse type of ``--resize``: ``H,W`` in pixels, two positive integers."""
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(
            f"expected H,W: two positive integers in pixels, e.g. 32,32, got {text!r}"
        )
    return h, w


def _eps(text: str) -> float:
    """argparse type of a radius or a noise scale: ``0.1``, ``8/255``; >= 0."""
    try:
        value = parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {text}")
    return value


#: ``shared(batch_size=MEASURED)``: ``--batch-size`` defaults to None, measured by the command
MEASURED = "measured"
#: inputs per forward of ``certify --method ibp|crown|crown-ibp`` without --batch-size
VERIFY_BATCH = 1000


def shared(
    out: str,
    *,
    n: int | None = None,
    batch_size: int | str | None = None,
    dataset: bool = True,
    split: bool = True,
    seed: int | None = 0,
    device: str = "auto",
    out_required: bool = False,
) -> argparse.ArgumentParser:
    """The parent parser of the options the commands share, with one command's defaults:
    ``--dataset`` and ``--split`` (unless turned off), ``--n`` / ``--n-points`` and
    ``--batch-size`` (when given their default; ``MEASURED``: default None, the command measures
    it), ``--seed`` (None: the recipe's), ``--device``, ``--out`` (``out`` is its help) and
    ``--quiet``."""
    p = argparse.ArgumentParser(add_help=False)
    if dataset:
        p.add_argument(
            "--data",
            "--dataset",
            dest="dataset",
            default=None,
            metavar="DATA",
            help="a registered data set (robustlab list datasets), a folder of "
            "images in class subfolders (DATA/<class>/<image>.png), or an "
            ".npz / .safetensors file holding x (N,C,H,W or N,H,W,C; uint8 "
            "or floats in [0, 1]) and y; a registered name wins over a folder "
            "of that name (write ./NAME for the folder); a file or folder is "
            "read whole, in its order, with no split (default: the "
            "checkpoint's data set, else fashion-mnist)",
        )
        p.add_argument(
            "--resize",
            type=_size,
            default=None,
            metavar="H,W",
            help="resize every image of a --data folder to H x W pixels "
            "(bilinear); without it a folder of different sizes is an error",
        )
    if split:
        p.add_argument(
            "--split",
            default="test",
            choices=("train", "test"),
            help="which split of a registered data set (default: test); a --data "
            "file or folder has none (--split train is then an error)",
        )
    if n is not None:
        p.add_argument(
            "--n",
            "--n-points",
            dest="n",
            type=_positive_int,
            default=n,
            help="first n points of the split (under torchrun write --n-points: "
            "torchrun reads --n as an abbreviation of its own options)",
        )
    if batch_size == MEASURED:
        p.add_argument(
            "--batch-size",
            type=_positive_int,
            default=None,
            help="noisy copies per forward pass (default: the fastest of a short "
            "measurement, robustlab.defenses.batching; noise drawn in chunks "
            "of 1000); for --method ibp|crown|crown-ibp: inputs per forward "
            f"(default {VERIFY_BATCH})",
        )
    elif batch_size is not None:
        p.add_argument(
            "--batch-size",
            type=_positive_int,
            default=batch_size,
            help="inputs (for smoothing: noisy copies) per forward pass",
        )
    p.add_argument(
        "--seed",
        type=int,
        default=seed,
        help="seed of torch's generators, recorded with the results"
        + (" (default: the recipe's)" if seed is None else ""),
    )
    p.add_argument(
        "--device",
        default=device,
        help="auto (cuda when available), cpu, cuda, cuda:N or mps; under torchrun "
        "each process takes cuda:LOCAL_RANK (or the CPU with gloo)",
    )
    p.add_argument("--out", type=Path, default=None, required=out_required, help=out)
    p.add_argument("--quiet", action="store_true", help="no progress bars or printed results")
    return p


VERIFIERS = ("ibp", "crown", "crown-ibp")  # robustlab.models.bounds.METHODS, torch-free here
REGISTRIES = {  # robustlab list KIND: the module, and the function in it naming what is there
    "attacks": ("robustlab.attacks", "names"),
    "defenses": ("robustlab.defenses", "names"),
    "models": ("robustlab.models", "names"),
    "objectives": ("robustlab.training", "objectives"),
    "datasets": ("robustlab.data", "names"),
    "suites": ("robustlab.evaluation", "suites"),
    "losses": ("robustlab.attacks", "loss_names"),
    "schedules": ("robustlab.training", "SCHEDULES.names"),
    "activations": ("robustlab.models", "activations"),
    "zoo": ("robustlab.models", "zoo_names"),  # list zoo: with the cards' numbers (cli_zoo)
}


def parse_options(pairs: list[str] | None, option: str = "--defense-option") -> dict[str, Any]:
    """``["sigma=0.25", "vote=soft"]`` -> ``{"sigma": 0.25, "vote": "soft"}`` (values parsed as
    JSON where they can be, else kept as strings); a ValueError naming ``option`` for a pair
    that is not ``KEY=VALUE``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _train_parser(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a model from a TOML recipe",
        parents=[
            shared(
                "run directory, e.g. runs/pgd_at",
                dataset=False,
                split=False,
                seed=None,
                out_required=True,
            )
        ],
    )
    t.add_argument(
        "--config",
        required=True,
        type=Path,
        help="recipe file or shipped name: configs/pgd_at.toml, pgd_at",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--epochs", type=_positive_int, default=None, help="override the recipe")
    t.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scalars per epoch in OUT/tensorboard/ (default: on when the tensorboard "
        "package is installed)",
    )


MODEL_FOLDER = "runs/<NAME>/ under the current folder for --model SPEC"


def model_args(p: argparse.ArgumentParser, what: str = "model") -> None:
    """The model a command runs on: a robustlab checkpoint (the positional argument) or
    ``--model SPEC`` with ``--model-option``, ``--weights`` and ``--normalize``; and the checks
    ``--num-classes`` and ``--trust-code``. Exactly one of checkpoint and ``--model``
    (:func:`robustlab.cli_out.check_model_args`)."""
    p.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        default=None,
        help=f"the {what}: model.safetensors (with its .json sidecar); or --model",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help="instead of a checkpoint, your own model: path/to/file.py:NAME or "
        "package.module:NAME, NAME an nn.Module class or a function returning "
        "one (importing the file runs its code); needs --data",
    )
    p.add_argument(
        "--model-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an argument of --model's NAME (repeatable), values read as JSON where "
        "they parse, else strings, e.g. width=64 depth=28",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="a safetensors state dict for --model, loaded strictly (a 'module.' "
        "prefix stripped); a .pt file is converted once first with robustlab "
        "convert-weights IN.pt OUT.safetensors",
    )
    p.add_argument(
        "--normalize",
        default=None,
        metavar="MEAN/STD",
        help="put this per-channel normalisation in front of --model, which expects "
        "normalised inputs, in [0, 1] pixel units, e.g. "
        "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616; attacks stay in [0, 1]",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        default=None,
        metavar="K",
        help="the model's number of classes, checked (with the input shape) on two "
        "images before anything runs (default: the data's class count when it "
        "names its classes, else the model's)",
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="load a checkpoint saved from a --model (models.save of a from_spec "
        "model), which imports and runs the Python file it names",
    )


def _threat_args(p: argparse.ArgumentParser, what: str) -> None:
    """What ``evaluate`` and ``audit`` share beyond :func:`shared`: the model
    (:func:`model_args`), the threat model, the defense around the model, the EOT draws and
    the log-outputs switch."""
    model_args(p)
    p.add_argument(
        "--norm", choices=NORMS, default="linf", help="the threat model's norm (default: linf)"
    )
    p.add_argument(
        "--eps",
        type=_eps,
        required=True,
        help="radius in input units (inputs in [0, 1]), e.g. 0.1 or 8/255",
    )
    p.add_argument(
        "--force-eps",
        action="store_true",
        help="run even when the eps ball covers the whole input box (refused "
        "otherwise: --eps 8 is most likely 8/255)",
    )
    p.add_argument(
        "--defense",
        default=None,
        help=f"{what} the model inside this defense (robustlab list defenses), "
        "e.g. smoothing; the attacks see the defended model",
    )
    p.add_argument(
        "--defense-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an option of --defense (repeatable), e.g. sigma=0.25 samples=32 vote=prediction",
    )
    p.add_argument(
        "--fit-n",
        type=_positive_int,
        default=1000,
        help="training points a defense that needs clean data is fitted on "
        "(feature-squeezing's threshold, mixup-inference's pool)",
    )
    p.add_argument(
        "--eot",
        type=_positive_int,
        default=None,
        help="average the gradient attacks' gradients over this many draws "
        "(default: 20 on a randomised model, else 1)",
    )
    p.add_argument(
        "--log-outputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attack the logarithm of the model's outputs (default: on when they "
        "are probabilities: non-negative rows summing to 1)",
    )


def _evaluate_parser(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate",
        help="clean and robust accuracy of a model",
        parents=[
            shared(
                "results folder (default: beside the checkpoint, or in "
                + MODEL_FOLDER
                + ", named from the settings, e.g. eval-linf-0.1-standard-n1000-seed0)",
                n=1000,
                batch_size=500,
            )
        ],
    )
    _threat_args(e, "evaluate")
    e.add_argument(
        "--suite",
        default=None,
        help="attack suite: standard (AutoAttack), fast, rand (randomised models), "
        "smoothed (smoothed classifiers), quick, pgd, pgd-strong (robustlab "
        "list suites); default: smoothed with --defense smoothing, else "
        "standard",
    )
    e.add_argument(
        "--attack",
        action="append",
        default=None,
        help="run this attack instead of a suite (repeatable)",
    )
    e.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="iterations of each --attack (default: the attack's own)",
    )
    e.add_argument(
        "--restarts",
        type=_positive_int,
        default=None,
        help="random restarts of each --attack (default: the attack's own)",
    )
    e.add_argument(
        "--step-size",
        type=_eps,
        default=None,
        help="step size of each --attack in input units, e.g. 2/255 (default: the "
        "attack's own rule)",
    )
    e.add_argument("--loss", default=None, help="attack loss for --attack: ce, cw-margin, dlr")
    e.add_argument(
        "--bpda",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attack through non-differentiable stages with BPDA (default: on when "
        "the model has such stages)",
    )
    e.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="predictions per point, robust by majority (default: the suite's)",
    )
    e.add_argument(
        "--surrogate",
        type=Path,
        default=None,
        help="checkpoint of a surrogate model for the transfer attack",
    )
    e.add_argument(
        "--restart",
        action="store_true",
        help="ignore an interrupted evaluation's state in --out and start over",
    )
    _overwrite(e)


def _audit_parser(sub: Any) -> None:
    a = sub.add_parser(
        "audit",
        help="the evaluation checklist (Carlini et al. 2019) on a "
        "model or a defense: PASS / FLAG per check",
        parents=[
            shared(
                "results folder (default: beside the checkpoint, or "
                "in " + MODEL_FOLDER + ", named from the settings, "
                "e.g. audit-linf-0.1-n500-seed0)",
                n=500,
                batch_size=500,
            )
        ],
    )
    _threat_args(a, "audit")
    a.add_argument(
        "--surrogate",
        type=Path,
        default=None,
        help="checkpoint for the transfer attack (default: the undefended "
        "checkpoint when --defense is given)",
    )
    a.add_argument("--steps", type=_positive_int, default=100, help="adaptive APGD-CE steps")
    a.add_argument(
        "--queries",
        type=_positive_int,
        default=5000,
        help="query budget of the gradient-free attacks",
    )
    a.add_argument(
        "--binarization",
        type=int,
        default=20,
        metavar="N",
        help="points of the binarization test (0 skips it)",
    )
    _overwrite(a)


def _certify_parser(sub: Any) -> None:
    c = sub.add_parser(
        "certify",
        help="certified radii of a smoothed model, or verified "
        "accuracy by bound propagation (--method)",
        parents=[
            shared(
                "directory (default: beside the checkpoint, or in "
                + MODEL_FOLDER
                + ", named from the settings, e.g. "
                "certify-gaussian-0.25-...)",
                batch_size=MEASURED,
            )
        ],
    )
    model_args(c, "base model")
    c.add_argument(
        "--method",
        choices=("smoothing", *VERIFIERS),
        default="smoothing",
        help="smoothing: Cohen et al.'s radii of a smoothed model (--sigma); ibp, "
        "crown, crown-ibp: verified accuracy by bound propagation at --norm, "
        "--eps, next to the robust accuracy of --suite on the same points",
    )
    c.add_argument(
        "--norm",
        choices=("linf", "l2"),
        default="linf",
        help="for bound propagation (default: linf)",
    )
    c.add_argument(
        "--eps",
        type=_eps,
        default=None,
        help="for bound propagation: the radius in input units, e.g. 0.1",
    )
    c.add_argument("--force-eps", action="store_true", help="run even if eps covers the box")
    c.add_argument(
        "--suite",
        default="fast",
        help="for bound propagation: the attack suite of "
        "the empirical robust accuracy (default: fast; standard: AutoAttack)",
    )
    c.add_argument(
        "--sigma",
        "--keep",
        dest="sigma",
        type=_eps,
        default=None,
        help="the noise's parameter: its scale in input units (gaussian, laplace), "
        "or for uniform-l0 the keep probability alpha in (0, 1) (--keep)",
    )
    c.add_argument(
        "--noise",
        choices=("gaussian", "laplace", "uniform-l0"),
        default="gaussian",
        help="gaussian: l2 radii; laplace (scale sigma): l1 radii; uniform-l0 (each "
        "coordinate kept with probability --keep, else another of the 256 "
        "levels k/255; 8-bit inputs): l0 radii (Lee et al. 2019)",
    )
    c.add_argument("--n", type=_positive_int, default=100_000, help="estimation draws")
    c.add_argument("--n0", type=_positive_int, default=100, help="selection draws")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    q = c.add_argument_group("sequential certification (robustlab.defenses.sequential)")
    q.add_argument("--sequential", action="store_true", help="draw until the radius is decided")
    q.add_argument("--max-n", type=_positive_int, default=100_000, help="most draws per point")
    q.add_argument(
        "--radius-tolerance", type=_eps, default=None, help="radius grid step (default sigma / 4)"
    )
    q.add_argument("--min-radius", type=_eps, default=0.0, help="stop below it (default 0)")
    q.add_argument("--max-radius", type=_eps, default=None, help="stop at it (default: none)")
    c.add_argument("--n-points", type=_positive_int, default=500, help="examples to certify")
    c.add_argument(
        "--skip",
        type=_positive_int,
        default=1,
        help="take every skip-th example of the split (Cohen et al.: 20 on CIFAR-10)",
    )
    c.add_argument(
        "--denoiser",
        type=Path,
        default=None,
        help="denoised smoothing: a denoiser.safetensors (robustlab denoise) in front "
        "of the checkpoint",
    )
    c.add_argument("--restart", action="store_true", help="discard the rows of an earlier run")
    _overwrite(c)


def _smooth_parser(sub: Any) -> None:
    s = sub.add_parser(
        "smooth",
        help="smoothing curves: accuracy of a smoothed model vs "
        "noise draws n and sigma, for each vote",
        parents=[
            shared(
                "folder for smoothing.json (default: beside the "
                "checkpoint, or in " + MODEL_FOLDER + ", named from "
                "the settings)",
                n=500,
                batch_size=1024,
            )
        ],
    )
    model_args(s, "base model")
    s.add_argument(
        "--sigmas",
        type=str,
        required=True,
        help="noise scales in input units, comma-separated, e.g. 0,0.12,0.25,0.5",
    )
    s.add_argument(
        "--samples",
        type=str,
        required=True,
        help="numbers of noise draws n, comma-separated, e.g. 1,4,16,64,256 (all "
        "come from the largest n's draws)",
    )
    s.add_argument(
        "--votes",
        type=str,
        default="prediction,soft,weighted",
        help="voting rules, comma-separated (default: all three)",
    )
    s.add_argument(
        "--noise",
        choices=("gaussian", "laplace"),
        default="gaussian",
        help="the smoothing noise (default: gaussian)",
    )
    _overwrite(s)


def _denoise_parser(sub: Any) -> None:
    d = sub.add_parser(
        "denoise",
        help="train a denoiser for denoised smoothing of a classifier",
        parents=[
            shared(
                "run directory; a rerun resumes after its last epoch",
                batch_size=128,
                split=False,
                out_required=True,
            )
        ],
    )
    model_args(d, "classifier (not modified)")
    d.add_argument("--sigma", type=_eps, required=True, help="noise scale to remove")
    d.add_argument(
        "--noise",
        choices=("gaussian", "laplace"),
        default="gaussian",
        help="the noise to remove (default: gaussian)",
    )
    d.add_argument(
        "--objective",
        choices=("mse", "stab"),
        default="mse",
        help="mse: reconstruct the clean image; stab: keep the classifier's "
        "clean prediction (fine-tune an mse denoiser with --init)",
    )
    d.add_argument("--epochs", type=_positive_int, required=True, help="passes over the data")
    d.add_argument("--init", type=Path, default=None, help="start from this denoiser")
    d.add_argument("--depth", type=_positive_int, default=8, help="DnCNN layers (default: 8)")
    d.add_argument(
        "--width", type=_positive_int, default=32, help="DnCNN channels per layer (default: 32)"
    )
    d.add_argument("--n-train", type=_positive_int, default=None, help="first n train images")
    d.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 1e-3)")


def _report_parsers(sub: Any) -> None:
    r = sub.add_parser(
        "report",
        help="one self-contained HTML page of one or more runs: flags, "
        "accuracies, attack cascade, curves, examples, provenance",
    )
    r.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories (robustlab train/evaluate/audit/certify/smooth --out)",
    )
    r.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="HTML file (default: RUN_DIR/report.html for one run, else report.html)",
    )
    r.add_argument("--title", default=None, help="page title")

    cm = sub.add_parser("compare", help="a RobustBench-style leaderboard of runs (Markdown)")
    cm.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories or results files to rank",
    )
    cm.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="write the Markdown here instead of printing it",
    )
    cm.add_argument(
        "--zoo",
        action="store_true",
        help="rank the pretrained zoo's models beside the runs (from their model cards)",
    )

    ls = sub.add_parser("list", help="what is registered")
    ls.add_argument(
        "kind",
        nargs="?",
        choices=sorted(REGISTRIES),
        default=None,
        help="what to list (default: everything); suites also says what each runs and costs",
    )


def _convert_parser(sub: Any) -> None:
    cw = sub.add_parser(
        "convert-weights",
        help="convert a PyTorch .pt state dict from another "
        "code base into safetensors, once, without "
        "running any code it names",
    )
    cw.add_argument(
        "source",
        type=Path,
        metavar="IN",
        help="the .pt / .pth / .bin / .ckpt file, read with PyTorch's restricted "
        "loader (weights_only=True): anything but tensors and plain containers is "
        "refused",
    )
    cw.add_argument(
        "target",
        type=Path,
        metavar="OUT",
        help="the .safetensors file to write; its record (source SHA-256, "
        "tensors, prefixes stripped) goes to OUT.json beside it",
    )
    cw.add_argument(
        "--key",
        default=None,
        help="the top-level entry holding the state dict (default: the file itself "
        "if it is one, else the first of state_dict, model, net, ema, "
        "model_state_dict)",
    )
    _overwrite(cw, "replace OUT (and its .json record) if it exists")


def _overwrite(p: argparse.ArgumentParser, text: str | None = None) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=text
        or "replace a finished result in the output folder (without it a "
        "finished result is kept: a rerun of the same settings does "
        "nothing)",
    )


FIRST_HOUR = """\
a first hour:
  robustlab train --config configs/quickstart.toml --out runs/quickstart
  robustlab evaluate runs/quickstart/model.safetensors --eps 0.1 --suite fast
  robustlab report runs/quickstart            (writes runs/quickstart/report.html)
  robustlab list suites                       (what each attack suite runs and costs)

your own model, weights and images:
  robustlab convert-weights net.pt net.safetensors       (once, for a .pt from elsewhere)
  robustlab evaluate --model net.py:Net --weights net.safetensors --data images/ \\
      --eps 8/255 --normalize 0.5,0.5,0.5/0.25,0.25,0.25  (results in runs/Net/)

Each command explains its options: robustlab evaluate --help. Results go to a folder
named from the settings beside the checkpoint (--out chooses another); a finished
result is never replaced without --overwrite. robustlab --version prints the version.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``robustlab`` parser; the sub-command's name lands in ``command``."""
    p = argparse.ArgumentParser(
        prog="robustlab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adversarial robustness of image classifiers: train, attack, defend, "
        "certify,\nevaluate and report, from the command line.",
        epilog=FIRST_HOUR,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"robustlab {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for add in (
        _train_parser,
        _evaluate_parser,
        _audit_parser,
        _certify_parser,
        _smooth_parser,
        _denoise_parser,
        _convert_parser,
        _report_parsers,
    ):
        add(sub)
    return p


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parser of each command of :func:`build_parser`'s ``parser``, by name."""
    return next(a for a in parser._actions if a.dest == "command").choices  # type: ignore
