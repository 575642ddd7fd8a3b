"""Per-sample losses that attacks maximise. Each maps logits (N, K) and labels (N,) to (N,).

For a targeted attack the labels are the targets and the loss is negated where needed, so an
attack always *maximises* what it gets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from robustlab.registry import Registry

LossFn = Callable[[Tensor, Tensor, bool], Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


@LOSSES.register("ce")
def cross_entropy(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """Cross-entropy; targeted: minus the cross-entropy of the target class."""
    ce = F.cross_entropy(logits, y, reduction="none")
    return -ce if targeted else ce


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j``: positive iff class ``y`` wins."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return z_y - other.amax(dim=1)


@LOSSES.register("cw-margin")
def cw_margin(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """Carlini-Wagner margin on logits: ``max_{j != y} z_j - z_y`` (untargeted), or
    ``z_t - max_{j != t} z_j`` (targeted). Positive iff the attack succeeds."""
    m = margin(logits, y)
    return m if targeted else -m


def get_loss(name: str) -> LossFn:
    """The registered loss ``name``; a ValueError listing the valid ones if unknown."""
    return LOSSES.get(name)


def loss_names() -> list[str]:
    return LOSSES.names()


def is_success(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Bool (N,): the prediction differs from ``y`` (untargeted) or equals it (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


__all__ = ["LOSSES", "cross_entropy", "cw_margin", "get_loss", "is_success", "margin"]
