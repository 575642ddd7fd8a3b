"""Robust accuracy over a grid of eps, with the check that it never rises as eps grows.

A larger ball contains the smaller one, so a point broken at eps is breakable at every larger
eps; robust accuracy that rises with eps, or a point broken at a small eps and not at a larger
one, means the attacks are not doing their job (Carlini et al. 2019, "accuracy must fall
monotonically with the budget"). Each eps is evaluated on its own, so the check can fail; the
reported curve is then the per-sample worst case carried upwards (a point broken at eps counts
as broken at every larger eps, with the adversarial input found at the smaller one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.run import evaluate
from robustlab.threat import ThreatModel, parse_eps


@dataclasses.dataclass
class SweepResult:
    """``curve``: one dict per eps (ascending) with ``robust_accuracy`` as evaluated there and
    ``robust_accuracy_monotone`` (the worst case carried from smaller eps); ``flags``: the
    not-monotone flag when raised; ``results``: the :class:`EvalResult` of each eps."""

    curve: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    results: list[EvalResult]


def eps_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    eps_values: Sequence[float | str],
    *,
    out: str | Path | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Evaluate at each eps of ``eps_values`` (threat's norm and bounds); ``kwargs`` go to
    :func:`evaluate` (suite, attacks, seed, ...). With ``out``, eps number i writes its results
    to ``out/eps_<i>``."""
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    grid = sorted(parse_eps(e) for e in eps_values)
    if not grid:
        raise ValueError("eps_values is empty: give at least one eps, e.g. [0.05, 0.1, 0.2]")
    results: list[EvalResult] = []
    curve: list[dict[str, Any]] = []
    broken_before = torch.zeros(len(x), dtype=torch.bool)
    bad_points, rises = 0, []
    for i, eps in enumerate(grid):
        t = dataclasses.replace(threat, eps=eps)
        res = evaluate(
            model, x, y, t, out=None if out is None else Path(out) / f"eps_{i}", **kwargs
        )
        bad_points = max(bad_points, int((broken_before & res.robust).sum()))
        if curve and res.robust_accuracy > curve[-1]["robust_accuracy"] + 1e-12:
            rises.append((curve[-1]["eps"], eps))
        broken_before |= ~res.robust
        curve.append(
            {
                "eps": eps,
                "robust_accuracy": res.robust_accuracy,
                "robust_accuracy_monotone": float((~broken_before).float().mean()),
            }
        )
        results.append(res)
    flags = []
    if rises or bad_points:
        flags.append(
            {
                "name": "not-monotone-in-eps",
                "message": (f"robust accuracy rises with eps between {rises}; " if rises else "")
                + f"{bad_points} points broken at a smaller eps survive a larger one: the "
                "attacks do not find what exists (too few steps, bad step size, or masked "
                "gradients)",
            }
        )
    return SweepResult(curve=curve, flags=flags, results=results)
