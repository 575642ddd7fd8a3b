"""Deterministic verification of a feed-forward ReLU classifier by bound propagation: a point
is *verified* when a lower bound of every margin z_y - z_j over the whole threat ball is > 0.

Methods (the bounds themselves are in :mod:`robustlab.models.bounds`, where the papers, the
formulas and the supported layers are):

- ``"ibp"``: interval bound propagation (Gowal et al. 2018, arXiv:1810.12715); cost about two
  forward passes; handles max pooling.
- ``"crown"``: CROWN's backward linear bounds (Zhang et al. 2018, arXiv:1811.00866) with every
  intermediate bound by CROWN too; cost one backward pass per hidden neuron (chunked), the
  tightest and slowest.
- ``"crown-ibp"``: IBP's intermediate bounds, one CROWN pass from the K - 1 margins (Zhang et
  al. 2020, arXiv:1906.06316); cost IBP plus one backward pass.

Threat models: linf and l2 balls intersected with the threat's bounds. Unlike Cohen's
certificate (:mod:`robustlab.defenses.certify`) the guarantee holds with certainty, up to
floating-point rounding of the dtype the model runs in. The empirical counterpart is the
evaluation's worst case over attacks; a verified point must be robust there
(:func:`check_below_empirical`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_inputs, check_labels, one_of, positive_int
from robustlab.models.bounds import METHODS, margin_bounds, network
from robustlab.threat import ThreatModel

__all__ = ["METHODS", "Verification", "annotate", "check_below_empirical", "verify"]


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify` on N points.

    Attributes:
        method: ``ibp``, ``crown`` or ``crown-ibp``.
        margins: (N, K-1) lower bounds of z_y - z_j over the ball ∩ box, in logit units, the
            classes j != y in increasing order.
        certified: bool (N,): every margin bound > 0, i.e. the model predicts y everywhere in
            the ball ∩ box.
    """

    method: str
    margins: Tensor
    certified: Tensor

    @property
    def min_margin(self) -> Tensor:
        """(N,) the smallest margin lower bound of each point (> 0 exactly when certified)."""
        return self.margins.min(dim=1).values

    @property
    def accuracy(self) -> float:
        """Verified accuracy: the fraction of points certified, in [0, 1]."""
        return float(self.certified.float().mean())


def verify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "ibp",
    batch_size: int = 100,
) -> Verification:
    """Verify ``model`` on ``(x, y)`` under ``threat`` by bound propagation.

    Args:
        model: a feed-forward chain of supported layers (:func:`robustlab.models.bounds.network`
            says how a chain is read and refuses any other model, naming the first unsupported
            layer); run in eval mode, its mode restored afterwards.
        x: inputs (N, ...) inside ``threat.bounds``; y: labels (N,).
        threat: a linf or l2 :class:`~robustlab.threat.ThreatModel`.
        method: ``"ibp"`` (default), ``"crown"`` or ``"crown-ibp"``; for the last two the margin
            bound is the larger of the method's and IBP's (both sound), so they are never looser
            than IBP.
        batch_size: points bounded at once.

    Returns:
        :class:`Verification`: certified points, margin lower bounds (N, K-1) and their minimum.
    """
    check_inputs(x, y, threat)
    one_of(method, "verification method", METHODS)
    one_of(threat.norm, "norm for verification (bound propagation)", ("linf", "l2"))
    batch_size = positive_int(batch_size, "batch_size")
    margins = []
    with eval_mode(model), torch.no_grad():
        net = network(model, x)
        check_labels(y, net.shapes[-1][0])
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            bound = margin_bounds(net, xb, yb, threat, method)
            if method != "ibp":
                bound = torch.maximum(bound, margin_bounds(net, xb, yb, threat, "ibp"))
            margins.append(bound)
    margin = torch.cat(margins)
    return Verification(method, margin, margin.min(dim=1).values > 0)


def check_below_empirical(ver: Verification, robust: Tensor) -> None:
    """Raise ``RuntimeError`` if a verified point is not robust empirically (``robust``: bool
    (N,), correct on the clean input and after every attack). Verified accuracy <= empirical
    robust accuracy always holds for a sound verifier: a violation is a bug in the bounds or
    in the attacks' bookkeeping, never a result."""
    bad = ver.certified.cpu() & ~robust.cpu().bool()
    if bad.any():
        raise RuntimeError(
            f"{int(bad.sum())} point(s) verified by {ver.method} were broken by an attack "
            f"(first: point {int(bad.nonzero()[0])}); verified accuracy {ver.accuracy:.4f} "
            "must never exceed the empirical robust accuracy: this is a bug in robustlab, "
            "please report it"
        )


def annotate(ver: Verification, record: dict, per_sample: list[dict], robust: Tensor) -> None:
    """Put ``ver`` into an evaluation's results on the same points, after
    :func:`check_below_empirical`: ``record["verified_accuracy"]`` (a fraction in [0, 1]),
    ``record["verification"]`` (method, verified count, mean of the min margin lower bounds)
    and each per-sample row's ``"verified"`` and ``"margin_lower_bound"`` (logit units)."""
    check_below_empirical(ver, robust)
    record["verified_accuracy"] = ver.accuracy
    record["verification"] = {
        "method": ver.method,
        "verified": int(ver.certified.sum()),
        "n": len(ver.certified),
        "mean_min_margin": float(ver.min_margin.mean()),
    }
    for row, ok, margin in zip(
        per_sample, ver.certified.tolist(), ver.min_margin.tolist(), strict=True
    ):
        row["verified"], row["margin_lower_bound"] = ok, margin
