"""What a command of :mod:`robustlab.cli` runs on, loaded and checked before any attack: the
model (a robustlab checkpoint, or ``--model SPEC`` built by :func:`robustlab.models.from_spec`
with ``--model-option``, ``--weights`` and ``--normalize``) on ``--device``; the data (``--data``:
a registered data set, a folder of images or an array file, read by :func:`robustlab.data.load`,
:func:`robustlab.data.from_folder` or :func:`robustlab.data.from_arrays`); and that the two fit
(:func:`check_fit`: input shape, number of classes, labels).

This module imports torch: :mod:`robustlab.cli` imports it inside its commands only, so that
``robustlab --help`` stays fast. The arguments were checked before (:mod:`robustlab.cli_out`:
one model, ``--model``'s options only with it, ``--data`` with ``--model``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import data, models
from robustlab._modes import attached
from robustlab.cli_args import parse_options
from robustlab.models.spec import spec_provenance

DEFAULT_DATA = "fashion-mnist"  # a checkpoint that names no data set


@dataclass(frozen=True)
class Inputs:
    """The data a command runs on: ``x`` float32 (N, C, H, W) in [0, 1] and ``y`` int64 (N,),
    on the CPU; ``classes`` the class names by label (None when the source names none);
    ``source`` the registered name or the path as given; ``split`` the registered data set's
    split (None for a file or folder: read whole)."""

    x: Tensor
    y: Tensor
    classes: list[str] | None
    source: str
    split: str | None


def load_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, str | None, dict[str, Any] | None]:
    """The model on ``device``, the data set its checkpoint records (None: none), and for
    ``--model`` its ``robustlab_spec`` (spec, options, normalize, code_sha256, weights,
    weights_sha256; None for a checkpoint).

    A ``--model`` is put in ``eval()`` mode, with or without ``--weights`` (batch norm uses its
    running statistics, dropout is off); a checkpoint loads in ``eval()`` mode. A checkpoint
    saved from a ``--model`` imports the file it names only with ``--trust-code``."""
    if args.model is None:
        model = models.load(args.checkpoint, device=device, trust_code=args.trust_code)
        return model, getattr(model, "robustlab_meta", {}).get("dataset"), None
    options = parse_options(args.model_option, "--model-option")
    model = models.from_spec(
        args.model, weights=args.weights, normalize=args.normalize, device=device, **options
    )
    return model.eval(), None, dict(attached(model, "robustlab_spec"))


def load_data(
    args: argparse.Namespace, trained_on: str | None, *, split: str, n: int | None
) -> Inputs:
    """The first ``n`` (None: all) images of ``--data``, else of the data set the checkpoint
    was trained on (``trained_on``), else of Fashion-MNIST.

    A registered name is that data set's ``split``; any other text is a path: a folder
    (:func:`robustlab.data.from_folder`, with ``--resize``) or an ``.npz`` / ``.safetensors``
    file (:func:`robustlab.data.from_arrays`), read whole in its order: ``--split train`` is
    refused there (a file has no split), and ``--resize`` is refused for anything but a folder.

    Raises:
        ValueError: an unknown name that is no file or folder either; ``--split train`` or
            ``--resize`` where they do not apply; what the readers refuse (the file named).
    """
    text = args.dataset or trained_on or DEFAULT_DATA
    resize = getattr(args, "resize", None)
    if text in data.names():
        if resize is not None:
            _, h, w = data.info(text).shape
            raise ValueError(
                f"--resize applies to a --data folder of images; {text}'s images "
                f"are all {h}x{w}: drop --resize"
            )
        x, y = data.load(text, split=split, n=n)
        return Inputs(x, y, list(data.info(text).classes), text, split)
    path = Path(text)
    if not path.exists():
        raise ValueError(
            f"--data {text}: no registered data set ({', '.join(data.names())}) "
            "and no such file or folder; give one of those names, a folder of "
            "images in class subfolders, or an .npz / .safetensors file of x and y"
        )
    if getattr(args, "split", "test") != "test":
        raise ValueError(
            f"--split {args.split} applies to registered data sets; --data {text} "
            "is read whole: give the file or folder of the split you want"
        )
    if path.is_dir():
        images = data.from_folder(path, resize=resize, n=n)
    elif resize is not None:
        raise ValueError(
            f"--resize applies to a --data folder of images; {text} holds arrays "
            "of one size: resize them before saving them, or drop --resize"
        )
    else:
        images = data.from_arrays(path, n=n)
    return Inputs(images.x, images.y, images.classes, images.source, None)


def check_fit(
    model: nn.Module, inputs: Inputs, num_classes: int | None, device: torch.device, extra: int = 0
) -> int:
    """The model's number of classes K, after checking, on the first two images (on
    ``device``, without gradients, leaving torch's generators as they were), that the model
    takes the data's input shape and returns (N, K + ``extra``) logits (``extra``: the outputs
    a defense's model has beyond the classes, :attr:`Defense.extra_outputs`), K ==
    ``num_classes`` (``--num-classes``) when given, else K == the data's number of class names
    when it names them, and that every label is below K.

    Raises:
        ValueError / TypeError: one line starting with the data's name or file, with the fix.
    """
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):  # a randomised model draws no extra numbers
            k = models.check_model_fits(
                model, inputs.x[:2].to(device), None if num_classes is None else num_classes + extra
            )
    except (ValueError, TypeError) as err:
        raise type(err)(f"{inputs.source}: {err}") from err
    k -= extra
    classes = inputs.classes
    if num_classes is None and classes is not None and k != len(classes):
        raise ValueError(
            f"{inputs.source} has {len(classes)} classes ({', '.join(classes[:3])}"
            f"{', ...' if len(classes) > 3 else ''}) but the model returns {k} logits per "
            f"example: build the model for {len(classes)} classes (--model-option), or pass "
            f"--num-classes {k} if the labels are the model's class indices"
        )
    top = int(inputs.y.max()) if len(inputs.y) else 0
    if top >= k:
        raise ValueError(
            f"{inputs.source}: label {top} is out of range for the model's {k} classes (labels "
            f"0..{k - 1}): give labels that are the model's class indices, or a model built "
            "for more classes (--model-option)"
        )
    return k


def record(args: argparse.Namespace, inputs: Inputs, spec: dict[str, Any] | None) -> dict[str, Any]:
    """What a result records of its model and data: ``checkpoint`` (None for ``--model``),
    for ``--model`` its :func:`~robustlab.models.spec.spec_provenance` (``name``, ``model``:
    the spec, ``model_options``, ``normalize``, ``weights``, ``weights_sha256``, ...; as
    :func:`robustlab.benchmark` records them), ``dataset`` (the
    registered name or the path as given), ``classes`` (names by label, for the report, or
    None), ``split`` (None for a file or folder) and ``resize`` ([H, W] or None)."""
    resize = getattr(args, "resize", None)
    own = {} if spec is None else spec_provenance(spec)
    return {
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        **own,
        "dataset": inputs.source,
        "classes": inputs.classes,
        "split": inputs.split,
        "resize": None if resize is None else list(resize),
    }


def unlabeled_pool(source: str, n: int | None, dataset: str, n_train: int | None) -> Tensor:
    """The images of a recipe's ``[data] unlabeled`` (their labels are never read), the first
    ``n`` (None: all): a registered data set's training images (for the training data set
    itself, those after its first ``n_train``, so no image is both labelled and unlabelled),
    else a folder of images or an ``.npz`` / ``.safetensors`` file of ``x`` (and ``y``).

    Raises:
        ValueError: the training set itself without ``n_train``; no such data set, file or
            folder; fewer images than ``n``.
    """
    if source in data.names():
        skip = 0
        if source == dataset:
            if n_train is None:
                raise ValueError(
                    f"[data] unlabeled = {source!r} is the training set itself: set "
                    "[data] n_train, the labelled images; the pool is the images "
                    "after them"
                )
            skip = n_train
        x, _ = data.load(source, split="train")
        x = x[skip:]
    elif Path(source).is_dir():
        x = data.from_folder(source).x
    elif Path(source).is_file():
        x = data.from_arrays(source).x
    else:
        raise ValueError(
            f"[data] unlabeled = {source!r}: no registered data set "
            f"({', '.join(data.names())}) and no such file or folder"
        )
    if n is not None and n > len(x):
        raise ValueError(
            f"[data] unlabeled_n = {n} but {source} holds {len(x)} unlabelled "
            f"images; use at most {len(x)}"
        )
    return x[:n]
