"""The evaluation of a universal adversarial perturbation: one ``v`` for a data set, fitted on
one set of points and measured on another, reported as such (one fooling rate, not a
per-sample robust accuracy).

The search lives in :mod:`robustlab.attacks.uap`; this module only fits, checks and measures.
Every figure is recomputed here from the returned ``v`` and the inputs ``clip(x + v)``, never
taken from the search's history.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._provenance import versions
from robustlab._validate import check_inputs, check_labels, positive_int, probe_model
from robustlab.attacks.uap import apply, norm_of, predict, universal_perturbation
from robustlab.evaluation.checks import Flag, randomised_output
from robustlab.threat import ThreatModel

#: largest gap between the search's own last fit-set fooling rate and the recomputed one
#: before it is flagged (a fraction of the fitting set)
AGREEMENT = 1e-9


def evaluate_universal(
    model: nn.Module,
    x_fit: Tensor,
    y_fit: Tensor,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    batch_size: int = 256,
    **search: Any,
) -> dict[str, Any]:
    """Fit a universal perturbation ``v`` on ``(x_fit, y_fit)`` with
    :func:`~robustlab.attacks.uap.universal_perturbation` (``search``: its options, e.g.
    ``delta``, ``max_passes``, ``seed``) and measure it on the held-out ``(x, y)``.

    Returns a record (JSON-ready) with:

    - ``fooling_rate``: the fraction of the ``n`` test points whose prediction on
      ``clip(x + v)`` differs from their prediction on ``x`` (the paper's definition, labels
      aside), recomputed here;
    - ``clean_accuracy`` and ``perturbed_accuracy``: accuracy on ``x`` and on ``clip(x + v)``
      (fractions of ``n``; one perturbation for all points, so no per-sample worst case);
    - ``fit_fooling_rate``: the fooling rate on the fitting set, recomputed the same way;
      ``search_fit_fooling_rate``: the search's own last figure, only for comparison (a gap
      above ``AGREEMENT`` raises the ``search-disagrees`` flag);
    - ``v_norm``: ``||v||`` in the threat's norm, checked ``<= eps + tolerance`` (and every
      ``clip(x + v)`` inside the ball and the bounds), a ``RuntimeError`` otherwise;
    - ``passes``, ``history`` (the search's per-pass records), ``search_seconds``,
      ``seconds`` (the whole call, wall clock), ``n``, ``n_fit``, ``threat``, ``options``,
      ``versions``;
    - ``flags``: ``randomised-output`` (two forward passes differ: one draw per prediction
      understates the effect), ``overlap`` (test points also in the fitting set: the paper
      measures on points disjoint from those ``v`` was fitted on), ``search-disagrees``.

    Raises:
        ValueError / TypeError: bad inputs (as :func:`universal_perturbation`, and for the
            test set: empty, outside the bounds, labels out of range).
        RuntimeError: ``v`` outside the ball or of another shape than one sample (a bug of
            the search).
    """
    t0 = time.perf_counter()
    batch_size = positive_int(batch_size, "batch_size")
    check_inputs(x_fit, y_fit, threat)
    check_inputs(x, y, threat)
    if x.shape[1:] != x_fit.shape[1:]:
        raise ValueError(
            f"x has samples of shape {tuple(x.shape[1:])} but x_fit "
            f"{tuple(x_fit.shape[1:])}: fit and test points must share one shape"
        )
    v, history = universal_perturbation(
        model, x_fit, y_fit, threat, batch_size=batch_size, **search
    )
    search_seconds = time.perf_counter() - t0
    x, v = x.detach(), v.detach()
    v_norm = _check_ball(v, x, threat)
    x_adv = apply(v, x, threat)
    threat.check(x_adv, x, who="the universal perturbation")
    flags: list[Flag] = []
    with eval_mode(model):
        logits = probe_model(model, x[:2])
        check_labels(y, logits.shape[1])
        flag = randomised_output(model, x[:2], logits)
        clean, adv = predict(model, x, batch_size), predict(model, x_adv, batch_size)
        fit_clean = predict(model, x_fit, batch_size)
        fit_adv = predict(model, apply(v, x_fit.detach(), threat), batch_size)
    flags += [flag] if flag is not None else []
    fit_rate = (fit_adv != fit_clean).float().mean().item()
    claimed = history[-1].get("fooling_rate") if history else None
    if not isinstance(claimed, float) or abs(claimed - fit_rate) > AGREEMENT:
        flags.append(
            {
                "name": "search-disagrees",
                "message": f"the search reported a fit-set fooling rate of {claimed!r}, "
                f"recomputed from v it is {fit_rate:.6g}; the recomputed "
                "figure is the one reported (a randomised model, or a bug of "
                "the search)",
            }
        )
    overlap = _overlap(x_fit, x)
    if overlap:
        flags.append(
            {
                "name": "overlap",
                "message": f"{overlap} of the {len(x)} test points are also in the "
                "fitting set: the fooling rate is not a held-out figure; fit v "
                "on points disjoint from the test points",
            }
        )
    y = y.to(adv.device)
    return {
        "kind": "universal-perturbation",
        "fooling_rate": (adv != clean).float().mean().item(),
        "clean_accuracy": (clean == y).float().mean().item(),
        "perturbed_accuracy": (adv == y).float().mean().item(),
        "fit_fooling_rate": fit_rate,
        "search_fit_fooling_rate": claimed,
        "v_norm": v_norm,
        "passes": len(history),
        "history": history,
        "search_seconds": search_seconds,
        "seconds": time.perf_counter() - t0,
        "n": len(x),
        "n_fit": len(x_fit),
        "threat": threat.to_dict(),
        "options": _options(batch_size, search),
        "flags": flags,
        "versions": versions(),
    }


def _options(batch_size: int, search: dict[str, Any]) -> dict[str, Any]:
    """The options of the call as JSON-ready data (a generator as its type's name)."""
    return {"batch_size": batch_size} | {
        k: "torch.Generator" if isinstance(o, torch.Generator) else o for k, o in search.items()
    }


def _check_ball(v: Tensor, x: Tensor, threat: ThreatModel) -> float:
    """``||v||`` in the threat's norm; ``RuntimeError`` if ``v`` is not of one sample's shape
    or its norm exceeds ``eps + tolerance``."""
    if v.shape != x.shape[1:]:
        raise RuntimeError(
            f"the universal perturbation has shape {tuple(v.shape)}, not one "
            f"sample's {tuple(x.shape[1:])}: this is a bug in the search"
        )
    norm = norm_of(v, threat)
    if not norm <= threat.eps + threat.tolerance():
        raise RuntimeError(
            f"the universal perturbation has {threat.norm} norm {norm:.6g} > eps "
            f"{threat.eps:g}: this is a bug in the search"
        )
    return norm


def _overlap(x_fit: Tensor, x: Tensor) -> int:
    """How many points of ``x`` equal (bit for bit) a point of ``x_fit``."""

    def rows(t: Tensor) -> list[bytes]:  # as raw bytes: any float dtype, bfloat16 included
        raw = t.detach().flatten(1).cpu().contiguous().view(torch.uint8).numpy()
        return [row.tobytes() for row in raw]

    seen = set(rows(x_fit))
    return sum(row in seen for row in rows(x))
