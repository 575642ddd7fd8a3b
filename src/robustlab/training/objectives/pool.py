"""The unlabelled pool of the semi-supervised objectives (rst, uat, mart-semi, noisy-student):
how it is given, how it joins the training set, and how its points are told apart.

A pool is given in one or both of two ways: ``labeled=k`` hides the labels of the training
images after the first ``k`` (an emulation: those labels are never read), and
``unlabeled=<images>`` adds images given as data (a float tensor (N, C, H, W) in the threat's
bounds; the CLI loads it from the recipe's ``[data] unlabeled``). :func:`join` returns the
training set the trainer draws its batches from: the labelled images with their labels, then
the pool's images, each marked in ``y`` by :func:`mark` as ``-1 - j`` (``j``: its row in the
pool, in the order hidden-label images first, then the given ones). A negative ``y`` is
therefore "unlabelled pool image j", never a class; an objective looks up what it made for
row ``j`` in :meth:`setup` (a pseudo-label, a teacher distribution, a weight) with
:func:`rows`. The batches are drawn uniformly from the joined set, so an unlabelled share of a
batch is the pool's share of the set in expectation, not exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import integer
from robustlab.training.objectives.distillation import load_teacher, model_device

BATCH = 512  # images per teacher forward while pseudo-labelling


def check_pool(labeled: Any, unlabeled: Any, who: str) -> None:
    """ValueError / TypeError unless a pool is given: ``labeled`` (an int >= 0) and/or
    ``unlabeled`` (a float tensor of images)."""
    if labeled is None and unlabeled is None:
        raise ValueError(
            f"{who} needs an unlabelled pool: unlabeled=<images (N, C, H, W)> "
            '(a recipe\'s [data] unlabeled = "<data set or file>") and/or '
            "labeled=<number of leading training images that keep their label; "
            "the others' labels are hidden>"
        )
    if labeled is not None:
        integer(labeled, f"{who} labeled", minimum=0)
    if unlabeled is not None and not (
        isinstance(unlabeled, Tensor) and unlabeled.is_floating_point() and unlabeled.dim() >= 2
    ):
        raise TypeError(
            f"{who} unlabeled must be a float tensor of images (N, C, H, W), got "
            f"{type(unlabeled).__name__}; in a recipe name the pool in [data] "
            "unlabeled, not in [objective]"
        )


def describe(unlabeled: Tensor | None) -> str | None:
    """How a given pool is recorded in ``config()``: its size and image shape."""
    if unlabeled is None:
        return None
    return f"<{len(unlabeled)} images of shape {tuple(unlabeled.shape[1:])}>"


def mark(j: Tensor) -> Tensor:
    """The ``y`` of pool rows ``j``: ``-1 - j`` (always negative)."""
    return -1 - j


def rows(y: Tensor) -> Tensor:
    """The pool rows of the negative entries of ``y`` (in their order)."""
    return -1 - y[y < 0]


def join(
    x: Tensor, y: Tensor, labeled: int | None, unlabeled: Tensor | None, who: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The training set ``(x', y')`` (labelled images, then the pool, marked) and the pool's
    images (rows ``j`` = 0 .. M-1). ``x`` and ``y`` are not modified; without a given pool,
    ``x'`` is ``x`` itself."""
    k = len(x) if labeled is None else labeled
    if k > len(x):
        raise ValueError(
            f"{who} labeled={k} but the training set has only {len(x)} images; use at most {len(x)}"
        )
    if unlabeled is not None and unlabeled.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"{who}: the unlabelled images have shape {tuple(unlabeled.shape[1:])}"
            f" but the training images {tuple(x.shape[1:])}: give a pool of the "
            "same image size and channels"
        )
    parts = [x[k:]] + ([unlabeled.to(x.device, x.dtype)] if unlabeled is not None else [])
    pool = torch.cat(parts)
    marks = mark(torch.arange(len(pool), device=y.device))
    y_all = torch.cat([y[:k], marks])
    x_all = x if unlabeled is None else torch.cat([x, parts[-1]])
    return x_all, y_all, pool


@torch.no_grad()
def teacher_logits(teacher: Any, images: Tensor, model: nn.Module, x: Tensor, who: str) -> Tensor:
    """The logits of ``teacher`` (a checkpoint or module, as
    :func:`~robustlab.training.objectives.distillation.load_teacher` takes it) on ``images``
    (on the images' device), in eval mode, in batches of :data:`BATCH` on the device of
    ``model`` (whose training batch is ``x``); ``who`` names the objective in errors."""
    device = model_device(model, x)
    net = load_teacher(teacher, device, who)
    with eval_mode(net):
        out = [
            net(images[i : i + BATCH].to(device)).float().to(images.device)
            for i in range(0, len(images), BATCH)
        ]
    return torch.cat(out) if out else images.new_zeros(0, 0)
