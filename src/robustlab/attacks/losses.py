"""Per-sample losses that attacks maximise. Each maps logits (N, K) and labels (N,) to (N,).

For a targeted attack the labels are the targets and the loss is negated where needed, so an
attack always *maximises* what it gets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab._modes import declared
from robustlab.registry import Registry

LossFn = Callable[[Tensor, Tensor, bool], Tensor]
#: a loss an attack takes instead of a registered name: ``loss(logits, y) -> (N,)``, maximised
#: as it is (for a targeted attack ``y`` holds the targets: the callable rewards reaching them)
CustomLoss = Callable[[Tensor, Tensor], Tensor]
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


def _check_classes(logits: Tensor, k: int, what: str) -> None:
    if logits.shape[1] < k:
        raise ValueError(
            f"the {what} loss needs at least {k} classes, the model has "
            f"{logits.shape[1]}; use the 'ce' or 'cw-margin' loss"
        )


@LOSSES.register("dlr")
def dlr(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020): ``-(z_y - max_{j != y} z_j) /
    (z_pi1 - z_pi3 + 1e-12)`` with ``pi`` the classes by decreasing logit. Invariant to shifting
    and positive rescaling of the logits. Targeted: the same with the target's margin negated
    (the target-free form; APGD-T uses :func:`dlr_targeted`). Needs >= 3 classes."""
    _check_classes(logits, 3, "dlr")
    top = logits.sort(dim=1, descending=True).values
    m = margin(logits, y)
    return (m if targeted else -m) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein 2020) to maximise: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2
    + 1e-12)``, with ``y`` the true labels and ``target`` the target classes. Needs >= 4
    classes."""
    _check_classes(logits, 4, "targeted dlr")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


@LOSSES.register("detector-margin")
def detector_margin(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """The joint classifier-and-detector margin (Carlini & Wagner 2017, "Adversarial Examples
    Are Not Easily Detected", https://arxiv.org/abs/1705.07263) on a detector's (N, K + 1)
    outputs, whose last column is "rejected" (:func:`rejects`): untargeted
    ``max_{j != y, j != K} z_j - max(z_y, z_K)``, the rejection one more class to avoid;
    positive iff a wrong class wins over the label and the rejection. Targeted:
    ``z_t - max_{j != t} z_j`` over all K + 1 outputs (the target must beat the rejection too).
    Maximised, in logit units. Labels must be classes (< K): a label equal to the last
    column means the outputs have no rejection column (a model that does not reject)."""
    _check_classes(logits, 3, "detector-margin")
    k = logits.shape[1] - 1
    if len(y) and int(y.max()) >= k:
        raise ValueError(
            f"the detector-margin loss needs a detector's outputs, K classes and a "
            f"last 'rejected' column, but label {int(y.max())} is that column "
            f"({k + 1} outputs): this model does not reject; use the 'ce' or "
            "'cw-margin' loss, or a model that declares rejects = True"
        )
    if targeted:
        return margin(logits, y)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits[:, :k].masked_fill(F.one_hot(y, k).bool(), float("-inf"))
    return others.amax(1) - torch.maximum(z_y, logits[:, k])


def tempered(fn: LossFn, temperature: float) -> LossFn:
    """``fn`` on the logits divided by ``temperature`` T > 0: the temperature attack on
    defensive distillation (Carlini & Wagner 2016, "Defensive Distillation is Not Robust to
    Adversarial Examples", https://arxiv.org/abs/1607.04311). A distilled network trained at
    temperature T and deployed at 1 has logits about T times too large, so its softmax
    saturates and the gradient of the cross-entropy underflows to exactly 0 in float32;
    ``ce`` on ``z / T`` is the cross-entropy of ``softmax(z / T)``, whose gradient survives.
    ``fn`` itself when T == 1 (the margin losses only scale by 1 / T; DLR is unchanged)."""
    if temperature == 1:
        return fn

    def at_temperature(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
        return fn(logits / temperature, y, targeted)

    return at_temperature


def get_loss(name: str) -> LossFn:
    """The registered loss ``name``; a ValueError listing the valid ones if unknown."""
    return LOSSES.get(name)


def resolve_loss(loss: str | CustomLoss) -> tuple[str, LossFn]:
    """``(name recorded in results, loss fn)`` for a registered loss name or a callable
    ``loss(logits, y) -> (N,)`` (recorded under its ``__name__``); a callable's value is
    checked to be one number per sample."""
    if isinstance(loss, str) or not callable(loss):
        return loss, get_loss(loss)
    custom = loss

    def fn(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
        out = custom(logits, y)
        if not isinstance(out, Tensor) or out.shape != (len(logits),):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the attack's loss must return one value per sample, shape "
                f"({len(logits)},), got {shape}"
            )
        return out

    return getattr(custom, "__name__", type(custom).__name__), fn


def loss_names() -> list[str]:
    return LOSSES.names()


def rejects(model: object) -> bool:
    """Whether ``model`` is a detector whose last output column is a rejection ("adversarial
    input detected", declared through :func:`robustlab._modes.declared`, e.g. feature
    squeezing): a rejected adversarial input is defended, a rejected clean input is an error."""
    return declared(model, "rejects")


def is_success(logits: Tensor, y: Tensor, targeted: bool, reject: bool = False) -> Tensor:
    """Bool (N,): the prediction differs from ``y`` (untargeted) or equals it (targeted); with
    ``reject`` (a detector's logits) an untargeted attack must also avoid the last class, the
    rejection."""
    pred = logits.argmax(dim=1)
    if targeted:
        return pred == y
    hit = pred != y
    return hit & (pred != logits.shape[1] - 1) if reject else hit


__all__ = [
    "LOSSES",
    "CustomLoss",
    "LossFn",
    "cross_entropy",
    "cw_margin",
    "detector_margin",
    "dlr",
    "dlr_targeted",
    "get_loss",
    "is_success",
    "margin",
    "rejects",
    "resolve_loss",
    "tempered",
]
