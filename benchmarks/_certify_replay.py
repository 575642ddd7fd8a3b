"""The sequential rule replayed on the votes of the measured fixed-N runs (issue 22).

One benchmark run gives one draw of each image's votes, and on 30-odd images one image moves a
certified accuracy by 3 points: a single run says little about the rule's mean draws or about
how often its curve leaves fixed N's. The votes of a fixed-N run are exchangeable, so any
order of them is as likely as the one drawn: given the run's count ``C`` of votes for ``c_A``
among ``N``, the count after the first ``N_k`` is hypergeometric. :func:`resampled` replays
:func:`robustlab.defenses.sequential.replay` (the library's stopping rule) on ``reps`` random
orders of every image's measured votes, the same draws as the fixed run, as the benchmark's own
sequential rows share the fixed rows' seed. For scale it also draws ``reps`` independent
fixed-N runs (``Binomial(N, C / N)``): how often Cohen's procedure, rerun with another seed,
leaves its own curve by more than 0.5 points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.defenses.sequential import Stopping, looks, lower_bounds, radii, replay


def _vote_paths(count: int, n: int, grid: list[int], reps: int, rng: np.random.Generator) -> Any:
    """``reps`` random orders of ``count`` votes among ``n``: the votes after each look."""
    good, bad = np.full(reps, count), np.full(reps, n - count)
    paths, total, prev = np.zeros((reps, len(grid))), np.zeros(reps), 0
    for k, n_k in enumerate(grid):  # the looks grow strictly, so every look draws
        take = rng.hypergeometric(good, bad, n_k - prev)
        good, bad, prev = good - take, bad - (n_k - prev - take), n_k
        total = total + take
        paths[:, k] = total
    return paths


def _radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """The certified radius of each bound, -1 where it abstains (so it counts at no radius)."""
    return np.where(p_lower > 0.5, radii(p_lower, "gaussian", sigma, None), -1.0)


def _curves(radius: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Certified accuracy (points) at each radius of ``radii`` for each column of ``radius``
    (images x runs; -1: wrong or abstained)."""
    return 100 * (radius[None, :, :] >= radii[:, None, None] - 1e-12).mean(1)


def resampled(
    sigma: float,
    fixed: list[dict[str, Any]],
    *,
    rule: Stopping,
    max_n: int,
    alpha: float,
    reps: int,
    seed: int,
) -> dict[str, Any]:
    """Mean draws ratio (and its 5-95 % range over orders), the fraction of orders whose grid
    curve leaves the measured fixed one by more than 0.5 points, and the same fraction for
    independent fixed-N reruns. An image counts as correct where the fixed run predicted its
    label (the orders share its selection draws); where the fixed run abstained, its class is
    not recorded and no order counts it."""
    n = fixed[0]["draws"]
    if max_n > n:
        raise ValueError(f"replaying {n:,} fixed draws needs max_n <= {n:,}, got {max_n:,}")
    rng = np.random.default_rng(seed)
    grid = looks(max_n)
    grid_radii = np.arange(0, rule.max_radius + 1e-9, rule.tolerance)
    correct = np.array([r["prediction"] == r["label"] for r in fixed])[:, None]
    draws, seq, rerun = [], [], []
    for row in fixed:
        paths = _vote_paths(row["count"], n, grid, reps, rng)
        d, low = replay(paths, sigma=sigma, max_n=max_n, alpha=alpha, rule=rule, noise="gaussian")
        draws.append(d)
        seq.append(_radius(low, sigma))
        again = lower_bounds(rng.binomial(n, row["count"] / n, reps), np.full(reps, n), alpha)
        rerun.append(_radius(again, sigma))
    measured = np.array([r["radius"] for r in fixed])[:, None]
    base = _curves(np.where(correct, measured, -1.0), grid_radii)
    gap = {
        name: np.abs(_curves(np.where(correct, np.array(r), -1.0), grid_radii) - base).max(0)
        for name, r in (("sequential", seq), ("rerun", rerun))
    }
    ratio = np.array(draws).mean(0) / n
    return {
        "reps": reps,
        "draws_ratio": float(ratio.mean()),
        "draws_ratio_5_95": [float(np.quantile(ratio, 0.05)), float(np.quantile(ratio, 0.95))],
        "p_ratio_above_fifth": float((ratio > 0.2).mean()),
        "p_gap_above_half_point": float((gap["sequential"] > 0.5).mean()),
        "p_rerun_gap_above_half_point": float((gap["rerun"] > 0.5).mean()),
    }
