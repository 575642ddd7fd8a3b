"""Sanity checks that flag an evaluation a reviewer should not trust as it stands.

Each check returns ``None`` or a flag ``{"name", "message"}``; flags go into the results JSON
and to the top of the Markdown summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import declared
from robustlab.attacks.losses import margin
from robustlab.threat import ThreatModel

Flag = dict[str, Any]


def randomised_output(model: nn.Module, x: Tensor, a: Tensor) -> Flag | None:
    """A module of the model declares itself randomised (:func:`robustlab._modes.declared`,
    e.g. a smoothing defense, whose votes can look deterministic where they are unanimous),
    or a second forward pass on ``x`` differs from the logits ``a`` of the first: the model is
    randomised, so single-draw predictions and gradients are not enough (use EOT and repeated
    predictions)."""
    random = [type(m).__name__ for m in model.modules() if declared(m, "randomized")]
    if random:
        return {
            "name": "randomised-output",
            "message": f"the model contains a randomised module ({random[0]}): "
            "single-draw attacks understate its vulnerability; evaluate with EOT "
            "and repeated predictions",
        }
    with torch.no_grad():
        b = model(x)
    if not torch.equal(a, b):
        diff = float((a - b).abs().max())
        return {
            "name": "randomised-output",
            "message": f"two forward passes on the same inputs differ (max |diff| {diff:.3g}): "
            "the model is randomised; single-draw attacks understate its "
            "vulnerability; evaluate with EOT and repeated predictions",
        }
    return None


def softmax_output(logits: Tensor) -> Flag | None:
    """The model returns probabilities rather than logits, which saturates the CE loss."""
    if (logits >= 0).all() and torch.allclose(
        logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-4
    ):
        return {
            "name": "softmax-output",
            "message": "the model's outputs are non-negative and sum to 1: it returns "
            "probabilities, not logits; gradient attacks on the CE loss vanish; "
            "remove the final softmax",
        }
    return None


def gradient_health(model: nn.Module, x: Tensor, y: Tensor) -> Flag | None:
    """Input gradients of the CE loss that are zero or non-finite for some samples: masked
    gradients make gradient attacks fail without the model being robust."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        if not out.requires_grad:
            return {
                "name": "no-gradient",
                "message": "the model's output has no gradient path to its input "
                "(non-differentiable forward); gradient attacks cannot run: use "
                "gradient-free or transfer attacks",
            }
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xg, allow_unused=True)
    if g is None:
        return {"name": "no-gradient", "message": "the input gradient is disconnected"}
    flat = g.flatten(1)
    bad_nan = int((~torch.isfinite(flat)).any(1).sum())
    bad_zero = int((flat == 0).all(1).sum())
    if bad_nan or bad_zero:
        return {
            "name": "masked-gradient",
            "message": f"input gradients are NaN/inf for {bad_nan} and exactly zero for "
            f"{bad_zero} of {len(x)} probe samples: gradient masking; the robust "
            "accuracy from gradient attacks is an upper bound only",
        }
    return None


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-sample logit margin and its input gradient; None without a finite gradient."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        if not out.requires_grad:
            return None
        loss = margin(out, y)
        (g,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
    if g is None or not torch.isfinite(g).all():
        return None
    return loss.detach(), g


def shattered_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, scale: float = 1e-3, threshold: float = 0.5
) -> Flag | None:
    """Input gradients that do not predict the loss a small step away: the first-order
    prediction ``g . d`` of the change of the logit margin ``z_y - max_{j != y} z_j`` (which,
    unlike the cross-entropy, does not saturate on confident points) along
    ``d = scale * sign(g)``, against the change measured: ``|dL - g . d| / |g . d|``. A median
    above ``threshold`` over the probe samples means discontinuous ("shattered") gradients
    (Athalye et al. 2018; e.g. k-WTA, whose gradient errs by orders of magnitude while a ReLU
    network's errs by a few percent at this scale): gradient steps are blind. Meaningless for
    a randomised model (two forward passes, two draws): check randomness first."""
    first = _loss_and_grad(model, x, y)
    if first is None:
        return None
    loss, g = first
    moved = (x + scale * g.sign()).clamp(0, 1)  # the clamp may shorten the step at the bounds
    predicted = (g * (moved - x)).flatten(1).sum(1).double()
    with torch.no_grad():
        actual = (margin(model(moved), y) - loss).double()
    live = predicted.abs() > 1e-6  # smaller changes drown in float32 rounding of the loss
    if not live.any():
        return None
    err = ((actual - predicted).abs() / predicted.abs())[live]
    med = float(err.median())
    if med <= threshold:
        return None
    return {
        "name": "shattered-gradient",
        "message": f"input gradients do not predict the loss a {scale:g} step away (median "
        f"relative error of the first-order prediction {med:.3g} over "
        f"{int(live.sum())} probe samples): shattered gradients; gradient "
        "attacks are blind here, trust gradient-free and transfer attacks or a "
        "smooth approximation",
        "prediction_error_median": med,
    }


def eps_covers_box(threat: ThreatModel, shape: Sequence[int]) -> Flag | None:
    """An eps whose ball covers the whole input box (inputs of one sample's ``shape``, see
    :meth:`ThreatModel.box_diameter`): any input can be moved to any other, so a robust
    accuracy of 0 says nothing about the model; usually a slip of units (8 meant as 8/255)."""
    cover = threat.box_diameter(shape)
    dim = math.prod(shape)
    if threat.eps < cover:
        return None
    lo, hi = threat.bounds
    hint = (
        f"; did you mean eps {threat.eps:g}/255 = {threat.eps / 255:.4g}?"
        if threat.eps / 255 < cover
        else ""
    )
    return {
        "name": "eps-covers-box",
        "message": f"eps {threat.eps:g} ({threat.norm}) lets the ball cover the whole input "
        f"box [{lo:g}, {hi:g}]^{dim} (from eps {cover:.4g} on): any input can be "
        f"turned into any other, so the robust accuracy measures nothing{hint}",
    }


#: a detector that rejects at least this fraction of the clean test points raises
#: ``rejects-clean``
REJECTS_CLEAN = 0.5


def rejects_clean(rate: float | None, n: int) -> Flag | None:
    """A detector that rejects at least :data:`REJECTS_CLEAN` of the ``n`` clean test points
    (``rate``: the fraction it rejects; None: not a detector): a rejected adversarial input
    counts as defended, so such a detector looks robust without being so. The clean accuracy
    counts each rejected clean input as an error already; the robust accuracy, bounded by it,
    then measures the rejections, not robustness."""
    if rate is None or rate < REJECTS_CLEAN:
        return None
    how = "all" if rate >= 1 else f"{100 * rate:.1f}%"
    return {
        "name": "rejects-clean",
        "clean_rejection_rate": rate,
        "message": f"the detector rejects {how} of the {n} clean test points: a rejected "
        "adversarial input counts as defended, so a detector that rejects "
        "(nearly) everything looks robust without being so; the clean accuracy "
        "already counts each rejected clean input as an error, and the robust "
        "accuracy, bounded by it, measures the rejections rather than "
        "robustness; refit the detector's threshold on held-out clean training "
        "points at a lower false-positive rate (Detector.fit with fpr=...), or "
        "check its score on clean data",
    }


def run_checks(model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> list[Flag]:
    """All checks on a probe batch whose ``logits`` the model already gave (the model must be
    in eval mode)."""
    found = [
        randomised_output(model, x, logits),
        softmax_output(logits),
        gradient_health(model, x, y),
    ]
    return [f for f in found if f is not None]


def black_box_beats_white_box(
    per_attack: list[dict[str, Any]], n: int, tolerance: float = 0.002
) -> Flag | None:
    """Gradient-free attacks broke more than ``tolerance`` of the ``n`` points after the
    gradient attacks before them were done: the gradients mislead (masking), so the white-box
    numbers understate the vulnerability. AutoAttack's check on Square after APGD, with its
    tolerance (0.2 % of the points: a stray point or two is the ordinary gap between attacks)."""
    white_ran = False
    extra, total = [], 0
    for a in per_attack:
        if a.get("skipped"):
            continue
        if a.get("uses_gradients", True):
            white_ran = True
        elif white_ran and a["broken"] > 0:
            extra.append(f"{a['attack']} broke {a['broken']} of {a['attacked']}")
            total += a["broken"]
    if total <= tolerance * n:
        return None
    return {
        "name": "black-box-beats-white-box",
        "message": "gradient-free attacks broke points that the gradient attacks before "
        f"them did not ({'; '.join(extra)}): a sign of gradient masking; trust "
        "the worst case over all attacks, and look for an adaptive attack",
    }
