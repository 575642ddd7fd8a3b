"""Model selection on a hold-out of the training data: early stopping against robust
overfitting (Leslie Rice, Eric Wong, J. Zico Kolter, "Overfitting in adversarially robust deep
learning", ICML 2020, arXiv:2002.11569; reference code locuslab/robust_overfitting).

With PGD-AT the robust test accuracy peaks soon after the first decay of the learning rate and
then falls while the robust training accuracy keeps rising; keeping the checkpoint with the best
robust accuracy on held-out data recovers several points. The reference holds out 1,000
training images (seed 0) and checks them with PGD-10 every epoch. Here ``val_split`` training
examples (a count, or a fraction of the training set) are held out before training starts, the
same ones for every run seed (a permutation seeded with 0, as the reference), and never
trained on; every ``val_every`` epochs (and after the last) they are attacked with the run's
``val_attack`` (PGD-10 by default), and with ``keep_best`` the weights of the epoch with the
best robust accuracy on them (clean accuracy without a threat model; the earliest epoch on a
tie) are saved as ``model_best.safetensors``. The test images the CLI validates on (``val_n``)
are only watched, never used to choose: choosing on them is the reference's pitfall without
``--val``. Cost: one validation attack on the hold-out per check (PGD-10: about 11
forward/backward passes per held-out image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustlab._validate import integer, number

HOLDOUT_SEED = 0


def holdout_size(split: float | int, n: int) -> int:
    """The number of held-out examples: ``split`` itself for an integer count, else
    ``round(split * n)`` for a fraction in [0, 1); ValueError unless at least one training
    example is left."""
    if isinstance(split, float):
        k = round(number(split, "val_split", low=0, high=1, high_open=True) * n)
    else:
        k = integer(split, "val_split (a count, or a fraction such as 0.02)", minimum=0)
    if k >= n:
        raise ValueError(
            f"val_split={split!r} holds out {k} of the {n} training examples, "
            "leaving none to train on; hold out fewer"
        )
    return k


def hold_out(
    x: Tensor, y: Tensor, split: float | int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """``((x_train, y_train), (x_held, y_held))``: ``holdout_size(split, len(x))`` examples
    drawn by a permutation seeded with 0, both parts in their original order; the hold-out is
    None for a size of 0."""
    k = holdout_size(split, len(x))
    if k == 0:
        return (x, y), None
    held = torch.zeros(len(x), dtype=torch.bool)
    held[torch.randperm(len(x), generator=torch.Generator().manual_seed(HOLDOUT_SEED))[:k]] = True
    return (x[~held], y[~held]), (x[held], y[held])


def due(epoch: int, passes: int, every: int) -> bool:
    """True if validation runs after pass ``epoch`` (0-based): every ``every`` passes and
    after the last."""
    return (epoch + 1) % every == 0 or epoch + 1 == passes


def selection_key(robust: bool) -> str:
    """The log key that chooses the best epoch: hold-out robust accuracy if there is a
    threat model, else hold-out clean accuracy."""
    return "holdout_robust_acc" if robust else "holdout_clean_acc"


def best_epoch(history: list[dict[str, Any]], key: str) -> tuple[int, float] | None:
    """``(epoch, value)`` of the record with the highest ``key`` (the earliest of equals),
    skipping records the overfitting probe rolled back or stopped; None if none has it."""
    best: tuple[int, float] | None = None
    for rec in history:
        if key in rec and "overfit" not in rec and (best is None or rec[key] > best[1]):
            best = (rec["epoch"], rec[key])
    return best
