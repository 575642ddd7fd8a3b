"""The decision-boundary binarization test (Zimmermann, Brendel, Tramèr, Carlini, NeurIPS 2022,
"Increasing Confidence in Adversarial Robustness Evaluations"; reference code
google-research/active-adversarial-tests, ``active_tests/decision_boundary_binarization.py``).

For each test input ``x`` the test builds a two-class problem on the defended model's own
features for which an adversarial example inside the threat model is *known to exist*, and asks
whether the attack under test finds one:

1. inner points (class 0): ``x`` and ``n_inner - 1`` points drawn uniformly from the ball of
   radius ``eta * eps`` around it; boundary points (class 1): ``n_boundary`` points at distance
   exactly ``eps`` (linf: random corners ``x + eps * sign pattern``; l2: a uniform direction;
   l1: a uniform direction of the l1 sphere, normalised exponentials with random signs). All
   points are clipped to the threat's bounds; l2/l1 boundary points are rescaled after clipping
   so that they stay on the sphere (clipping-aware rescaling, as the reference code does);
2. features: the input of a layer of the model (default: the last ``nn.Linear``), computed by
   running the *whole* model, so preprocessing and randomness stay in place;
3. a linear read-out, logistic regression without penalty, is fitted until it separates the
   two sets perfectly (otherwise the sample's setup failed and it is skipped);
4. :class:`Binarized` (the model with the read-out as its head) labels ``x`` as 0 and the
   boundary points, all inside the threat model, as 1: an adversarial example exists;
5. the attack runs against :class:`Binarized` at ``x`` with label 0.

The attack success rate should be close to 1; a clearly lower value means the attack is too weak
for this model and its robustness numbers should not be trusted. A pass does not prove
robustness.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import check_inputs, integer, number, positive_int
from robustlab.models.features import capture, feature_module
from robustlab.threat import ThreatModel

__all__ = ["Binarized", "binarization_test", "feature_module"]

_BISECTION_STEPS = 60
_FIT_ROUNDS, _FIT_LBFGS_ITERS = 50, 20  # at most 1000 L-BFGS iterations per read-out


class Binarized(nn.Module):
    """``model`` with its head replaced by a two-class linear ``readout``.

    ``forward(x)`` runs the whole ``model`` on ``x`` (N, ...), captures the input of the feature
    layer (see :func:`feature_module`) with a forward pre-hook that lives for that call only, and
    returns ``readout(features)``, (N, 2) logits, differentiable through the model. The margin
    ``logits[:, 1] - logits[:, 0]`` is positive for class 1 ("boundary").

    Args:
        model: the (defended) classifier.
        readout: ``nn.Linear(D, 2)`` on the flattened features (D values per input).
        feature_layer: module name, or None for the last ``nn.Linear`` (the logits if there is
            none). Attribute ``feature_layer`` holds the resolved name (None: logits).
    """

    def __init__(
        self, model: nn.Module, readout: nn.Linear, feature_layer: str | None = None
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(readout, nn.Linear):
            raise TypeError(f"readout must be an nn.Linear, got {type(readout).__name__}")
        if readout.out_features != 2:
            raise ValueError(
                f"readout must have 2 outputs (inner, boundary), got {readout.out_features}"
            )
        self.model = model
        self.readout = readout.requires_grad_(False)
        self.feature_layer = feature_module(model, feature_layer)[0]

    def features(self, x: Tensor) -> Tensor:
        """Flattened features (N, D) of one forward pass of the model (see
        :func:`robustlab.models.features.capture`). A layer called several times in one pass
        (an internal ensemble) gives the mean of its inputs."""
        return capture(self.model, x, [self.feature_layer])[1][0]

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x))


def _boundary_points(
    x: Tensor, threat: ThreatModel, n: int, min_dist: float, g: torch.Generator
) -> Tensor:
    """Up to ``n`` points at distance ``eps`` from ``x`` (1, ...) inside the bounds: ``n``
    are drawn, and those that clipping to the bounds left closer than ``min_dist`` (the box
    leaves no room to reach ``eps`` along the drawn direction) are dropped."""
    pts = _sphere_points(x, threat, n, g)
    xs = x.expand_as(pts)
    return pts[threat.contains(pts, xs) & (threat.distance(pts, xs) >= min_dist)]


def _sphere_points(x: Tensor, threat: ThreatModel, n: int, g: torch.Generator) -> Tensor:
    lo, hi = threat.bounds
    d = math.prod(x.shape[1:])
    dev = g.device
    if threat.norm == "linf":  # corners of the box, then clipped: linf distance stays eps
        signs = torch.randint(0, 2, (n, d), generator=g, device=dev).to(x.dtype) * 2 - 1
        return (x + threat.eps * signs.to(x.device).reshape((n,) + x.shape[1:])).clamp(lo, hi)
    if threat.norm == "l2":
        u = torch.randn(n, d, generator=g, device=dev, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True)
    else:  # uniform on the l1 sphere: normalised exponentials with random signs
        e = torch.empty(n, d, device=dev, dtype=torch.float64).exponential_(generator=g)
        signs = torch.randint(0, 2, (n, d), generator=g, device=dev) * 2 - 1
        u = signs * e / e.sum(dim=1, keepdim=True)
    # clipping-aware rescaling: the scale s with ||clip(x + s u) - x|| = eps, by bisection
    # (the norm of the clipped step is non-decreasing in s; s = eps is the unclipped solution)
    x0 = x.detach().to(device=dev, dtype=torch.float64).flatten(1)
    room = torch.where(u > 0, hi - x0, x0 - lo).clamp_min(0)
    p = 2 if threat.norm == "l2" else 1

    def step(s: Tensor) -> Tensor:
        return torch.minimum(s * u.abs(), room) * u.sign()

    s_lo = torch.full((n, 1), threat.eps, dtype=torch.float64, device=dev)
    full = (room / u.abs().clamp_min(1e-300)).masked_fill(u == 0, 0).amax(1, keepdim=True)
    s_hi = torch.maximum(full, s_lo)
    for _ in range(_BISECTION_STEPS):
        mid = (s_lo + s_hi) / 2
        short = step(mid).norm(p=p, dim=1, keepdim=True) <= threat.eps
        s_lo, s_hi = torch.where(short, mid, s_lo), torch.where(short, s_hi, mid)
    pts = (x0 + step(s_lo)).to(device=x.device, dtype=x.dtype)  # the side within eps
    return pts.reshape((n,) + x.shape[1:]).clamp(lo, hi)


def _fit_readout(f_in: Tensor, f_bd: Tensor) -> tuple[Tensor, Tensor] | None:
    """Unpenalised logistic regression, inner (0) vs boundary (1), on standardised features
    with L-BFGS until every training point is on its side; returns ``(w, b)`` in raw feature
    units (score ``f @ w + b``), or None if not separated within the iteration cap."""
    feats = torch.cat([f_in, f_bd]).to(torch.float64)
    labels = torch.cat([feats.new_zeros(len(f_in)), feats.new_ones(len(f_bd))])
    mu, sd = feats.mean(0), feats.std(0)
    sd = torch.where(sd > 1e-12 * (1 + mu.abs()), sd, torch.ones_like(sd))  # constants: no info
    z = (feats - mu) / sd
    w = feats.new_zeros(feats.shape[1], requires_grad=True)
    b = feats.new_zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=_FIT_LBFGS_ITERS, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        loss = F.binary_cross_entropy_with_logits(z @ w + b, labels)
        w.grad, b.grad = torch.autograd.grad(loss, (w, b))
        return loss.detach()

    with torch.enable_grad():
        for _ in range(_FIT_ROUNDS):
            opt.step(closure)
            with torch.no_grad():
                s = z @ w + b
            if ((s > 0) == (labels > 0.5)).all():
                w_raw = w.detach() / sd
                return w_raw, b.detach() - mu @ w_raw
    return None


def _mean_features(net: Binarized, x: Tensor, repeats: int, batch_size: int) -> Tensor:
    """Features (N, D) averaged over ``repeats`` forward passes, in batches, without grad."""
    out: list[Tensor] = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            total = cast(Tensor, sum(net.features(xb) for _ in range(repeats)))  # repeats >= 1
            out.append(total / repeats)
    return torch.cat(out)


def _margin(readout: nn.Linear, feats: Tensor) -> Tensor:
    with torch.no_grad():
        logits = readout(feats)
    return logits[:, 1] - logits[:, 0]


def binarization_test(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attack: Any,
    *,
    n_inner: int = 49,
    n_boundary: int = 50,
    eta: float = 0.95,
    gap: float = 0.05,
    feature_layer: str | None = None,
    repeats: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Run the binarization test of ``attack`` on ``model`` at each input of ``x``.

    Args:
        model: the classifier (a defense wrapper included: its preprocessing, randomness and
            BPDA switches stay in place; the attack handles ``robustlab_bpda`` itself).
        x: (N, C, H, W) test inputs in the threat bounds (pass few, e.g. 10-50: each costs
            about ``repeats * (n_inner + 2 * n_boundary + 2)`` forward passes, a fit and one
            attack run).
        y: (N,) labels, validated only: the binarized task's labels are 0 (inner) and 1.
        threat: the threat model of the evaluation (norm, eps > 0, bounds); the attack must
            use the same one.
        attack: a robustlab attack (untargeted), called as
            ``attack(binarized, x_i, zeros(1), generator=g)``.
        n_inner: inner points, ``x_i`` included (>= 1). Default 49.
        n_boundary: boundary points drawn at distance ``eps`` (>= 1). Default 50. (The
            reference code requires both counts; typical values are not documented.)
        eta: inner radius ``eta * eps``, in (0, 1). Default 0.95 (reference code).
        gap: relative gap in (input-space) distance between the sets: boundary points closer
            than ``(1 + gap) * eta * eps`` (only where clipping to the bounds blocks the
            rescaling) are dropped; needs ``(1 + gap) * eta < 1``. Default 0.05 (the reference's
            ``relative_inner_boundary_gap``, which there sets eta = 1 - gap).
        feature_layer: name of the module whose input gives the features; default the last
            ``nn.Linear`` of the model; the logits when the model has none (few features: the
            fit then often fails, each such sample counted in ``n_failed_setup``).
        repeats: forward passes averaged per feature vector (>= 1), for randomised defenses;
            also used for the margin checks and the re-check of the attack's result. The attack
            itself sees single forward passes (give it EOT for randomised models).
        seed: seeds the sampling and the attack's generator; each sample gets its own
            generator, so its result does not depend on N. Deterministic models give identical
            results for the same seed (randomised defenses draw from their own generators).
        batch_size: inputs per forward pass for the feature extraction (>= 1).

    Returns:
        ``{"asr", "n_valid", "n_failed_setup", "n", "random_asr", "per_sample", "settings"}``:
        ``asr`` the fraction of valid samples (setup succeeded) where the attack reached class 1
        inside the threat model (the attack's success re-checked by the binarized prediction,
        features averaged over ``repeats``, and by ``threat.check``); ``random_asr`` the
        fraction of valid samples where some of ``n_boundary`` fresh random boundary points is
        already class 1 (then the sample is trivially passable); both None if no sample is
        valid. ``per_sample``: one dict per input with ``index``, ``setup_ok``,
        ``setup_error`` (why it failed, else None), ``attack_success``, ``random_success``,
        ``logit_improvement`` = ``(m_adv - m_best) / |m_best|`` with ``m = logit1 - logit0``,
        ``m_adv`` at the attack's point and ``m_best`` the largest margin of a boundary
        training point (>= 0: the attack found a point at least as confident as the known
        ones); None where the setup failed. The read-out is scaled so that the training
        margins lie in [-1, 1] (the reference's "fixed" rescaling).

    Raises:
        ValueError / TypeError for bad options (before any work); RuntimeError if the attack
        returns a point outside the threat model (a bug in the attack).
    """
    eta, gap, seed = _check_options(
        model,
        x,
        y,
        threat,
        attack,
        n_inner=n_inner,
        n_boundary=n_boundary,
        eta=eta,
        gap=gap,
        repeats=repeats,
        seed=seed,
        batch_size=batch_size,
    )
    opts = _Options(
        n_inner,
        n_boundary,
        (1 + gap) * eta * threat.eps,
        ThreatModel(threat.norm, eta * threat.eps, threat.bounds),
        repeats,
        batch_size,
    )
    min_dist = opts.min_dist
    seeds = torch.randint(0, 2**62, (len(x),), generator=torch.Generator().manual_seed(seed))
    # the head is set per sample; skip_init: no draw from the global RNG
    net = Binarized(model, nn.utils.skip_init(nn.Linear, 1, 2), feature_layer)
    modes = [(m, m.training) for m in net.modules()]
    per_sample: list[dict[str, Any]] = []
    warned = [False]
    try:
        net.eval()  # the model too; the attack restores this mode after its run
        for i in range(len(x)):
            g = torch.Generator(device=x.device).manual_seed(int(seeds[i]))
            per_sample.append(
                {"index": i}
                | _test_one(net, attack, x[i : i + 1].detach(), g, threat, opts, warned)
            )
    finally:
        for m, mode in modes:
            m.training = mode
    valid = [r for r in per_sample if r["setup_ok"]]
    n_valid = len(valid)
    return {
        "asr": sum(r["attack_success"] for r in valid) / n_valid if n_valid else None,
        "n_valid": n_valid,
        "n_failed_setup": len(x) - n_valid,
        "n": len(x),
        "random_asr": sum(r["random_success"] for r in valid) / n_valid if n_valid else None,
        "per_sample": per_sample,
        "settings": {
            **threat.to_dict(),
            "n_inner": n_inner,
            "n_boundary": n_boundary,
            "eta": eta,
            "gap": gap,
            "boundary_min_distance": min_dist,
            "feature_layer": net.feature_layer,
            "repeats": repeats,
            "seed": seed,
            "batch_size": batch_size,
            "attack": attack.config() if hasattr(attack, "config") else repr(attack),
        },
    }


class _Options(NamedTuple):
    n_inner: int
    n_boundary: int
    min_dist: float
    inner_threat: ThreatModel
    repeats: int
    batch_size: int


def _check_options(
    model: Any,
    x: Any,
    y: Any,
    threat: ThreatModel,
    attack: Any,
    *,
    n_inner: Any,
    n_boundary: Any,
    eta: Any,
    gap: Any,
    repeats: Any,
    seed: Any,
    batch_size: Any,
) -> tuple[float, float, int]:
    """The binarization test's argument checks; returns ``eta``, ``gap`` and ``seed``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y, threat)
    if threat.eps <= 0:
        raise ValueError(f"the binarization test needs eps > 0, got {threat.eps}")
    if not callable(attack):
        raise TypeError(
            f"attack must be callable as attack(model, x, y, generator=g), got "
            f"{type(attack).__name__}"
        )
    attack_threat = getattr(attack, "threat", threat)
    if attack_threat != threat:
        raise ValueError(
            f"the attack's threat model ({attack_threat}) differs from the "
            f"test's ({threat}); test the attack with its own threat model"
        )
    if getattr(attack, "targeted", False):
        raise ValueError(
            "the binarization test runs the attack untargeted (label 0 -> any "
            "other class); pass an untargeted attack"
        )
    for name, value in (
        ("n_inner", n_inner),
        ("n_boundary", n_boundary),
        ("repeats", repeats),
        ("batch_size", batch_size),
    ):
        positive_int(value, name)
    eta = number(eta, "eta", low=0, high=1, low_open=True, high_open=True)
    gap = number(gap, "gap", low=0, high=1, high_open=True)
    if (1 + gap) * eta >= 1:
        raise ValueError(
            f"(1 + gap) * eta must be < 1 so that points at distance eps clear the "
            f"gap, got (1 + {gap}) * {eta} = {(1 + gap) * eta:.4g}"
        )
    seed = integer(seed, "seed")  # a wrong type raises OptionTypeError, a TypeError
    return eta, gap, seed


def _test_one(
    net: Binarized,
    attack: Any,
    xi: Tensor,
    g: torch.Generator,
    threat: ThreatModel,
    o: _Options,
    warned: list[bool],
) -> dict[str, Any]:
    """The test at one input ``xi`` (1, ...): set up the read-out, then attack it."""
    row: dict[str, Any] = {
        "setup_ok": False,
        "setup_error": None,
        "attack_success": None,
        "random_success": None,
        "logit_improvement": None,
    }
    inner = torch.cat([xi, o.inner_threat.random_init(xi.expand(o.n_inner - 1, *xi.shape[1:]), g)])
    bd = _boundary_points(xi, threat, o.n_boundary, o.min_dist, g)
    if len(bd) == 0:
        row["setup_error"] = (
            f"no boundary point reaches distance {o.min_dist:.4g} inside the bounds {threat.bounds}"
        )
        return row
    feats = _mean_features(net, torch.cat([inner, bd]), o.repeats, o.batch_size)
    if feats.shape[1] <= len(feats) and not warned[0]:
        warned[0] = True
        warnings.warn(
            f"{feats.shape[1]} features for {len(feats)} training points: "
            "the read-out may not separate them (setup failures)",
            RuntimeWarning,
            stacklevel=3,
        )
    fit = _fit_readout(feats[: o.n_inner], feats[o.n_inner :])
    if fit is None:
        row["setup_error"] = "the linear read-out does not separate inner and boundary"
        return row
    w, b = fit
    scale = 1 / (feats.to(torch.float64) @ w + b).abs().max()  # margins in [-1, 1]
    readout = nn.utils.skip_init(
        nn.Linear, feats.shape[1], 2, device=feats.device, dtype=feats.dtype
    )  # no draw from the global RNG
    with torch.no_grad():
        readout.weight.copy_(torch.stack([-w, w]) * scale / 2)
        readout.bias.copy_(torch.cat([-b, b]) * scale / 2)
    net.readout = readout.requires_grad_(False)
    m_train = _margin(readout, feats)
    m_clean = _margin(readout, _mean_features(net, xi, o.repeats, o.batch_size))
    if not (
        (m_train[: o.n_inner] < 0).all() and (m_train[o.n_inner :] > 0).all() and m_clean[0] < 0
    ):
        row["setup_error"] = (
            "the scaled read-out does not label x as 0 and the boundary points as 1"
        )
        return row
    row["setup_ok"] = True
    fresh = _boundary_points(xi, threat, o.n_boundary, o.min_dist, g)
    m_fresh = _margin(readout, _mean_features(net, fresh, o.repeats, o.batch_size))
    row["random_success"] = bool((m_fresh > 0).any())

    res = attack(net, xi, torch.zeros(1, dtype=torch.long, device=xi.device), generator=g)
    threat.check(res.x_adv, xi, who="the attack under test")
    m_adv = float(_margin(readout, _mean_features(net, res.x_adv, o.repeats, o.batch_size)))
    m_best = float(m_train[o.n_inner :].max())
    row["attack_success"] = bool(res.success[0]) and m_adv > 0
    row["logit_improvement"] = (m_adv - m_best) / abs(m_best)
    return row
