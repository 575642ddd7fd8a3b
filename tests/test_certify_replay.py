"""``benchmarks/_certify_replay.py``: the sequential rule replayed on reorderings of recorded
fixed-N votes (issue 22's benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hypergeom, norm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _certify_replay as cr  # noqa: E402

from robustlab.defenses.sequential import Stopping, look_alphas, looks  # noqa: E402


def test_vote_paths_are_orders_of_the_recorded_votes():
    """Every path ends at the recorded count, never drops, never gains more votes than draws,
    and its count at a look has the hypergeometric mean."""
    grid = looks(20_000)
    paths = cr._vote_paths(15_000, 20_000, grid, 400, np.random.default_rng(0))
    assert (paths[:, -1] == 15_000).all()
    steps = np.diff(paths, axis=1, prepend=0)
    assert (steps >= 0).all() and (steps <= np.diff(grid, prepend=0)).all()
    sd = hypergeom(20_000, 15_000, grid[3]).std() / np.sqrt(400)
    assert paths[:, 3].mean() == pytest.approx(0.75 * grid[3], abs=5 * sd)


def test_resampled_counts_draws_and_gaps_against_the_measured_run():
    """A certain image (every vote for c_A) stops, in every order, at the first look whose
    bound reaches max_radius; a wrong one never counts, so no order leaves the measured
    curve."""
    sigma, n, top = 0.5, 20_000, 1.0
    certain = {"prediction": 3, "label": 3, "count": n, "draws": n, "radius": 2.0}
    wrong = {"prediction": 1, "label": 2, "count": 12_000, "draws": n, "radius": 0.1}
    kw = dict(rule=Stopping(sigma / 4, 0.0, top), max_n=n, alpha=0.001, reps=20, seed=0)
    grid = np.array(looks(n))
    first = grid[np.argmax(look_alphas(0.001, len(grid)) ** (1 / grid) >= norm.cdf(top / sigma))]
    alone = cr.resampled(sigma, [certain], **kw)
    assert alone["draws_ratio"] == pytest.approx(first / n)
    assert alone["draws_ratio_5_95"] == pytest.approx([first / n] * 2)
    assert alone["p_ratio_above_fifth"] == float(first / n > 0.2)
    both = cr.resampled(sigma, [certain, wrong], **kw)
    assert both["p_gap_above_half_point"] == 0.0 and both["reps"] == 20
    with pytest.raises(ValueError, match="max_n"):
        cr.resampled(sigma, [certain], **(kw | {"max_n": 2 * n}))
