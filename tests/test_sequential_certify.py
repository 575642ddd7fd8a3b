"""Sequential certification (:mod:`robustlab.defenses.sequential`) and batching across inputs
(:mod:`robustlab.defenses.batching`).

The base classifier of the exact cases is a halfspace, ``f(x) = 0 if x - b > 0 else 1`` on a
one-pixel input, so under Gaussian noise ``p_A = Phi((x - b) / sigma)`` exactly and the true
radius is ``sigma Phi^-1(p_A) = x - b``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

import robustlab as rl
from robustlab import cli
from robustlab.defenses import ABSTAIN, certify, certify_iter, predict
from robustlab.defenses.batching import _CHOSEN, CANDIDATES, best_batch_size
from robustlab.defenses.certify import lower_confidence_bound
from robustlab.defenses.sequential import Stopping, look_alphas, looks, lower_bounds, radii, replay
from robustlab.defenses.smoothing import noisy_logits
from robustlab.evaluation.certification import run_certification
from robustlab.evaluation.smoothing_curves import draw_logits, smoothing_curves


class Halfspace(nn.Module):
    def __init__(self, b: float) -> None:
        super().__init__()
        self.b = b
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = x.flatten(1).sum(1) - self.b
        return torch.stack([z, -z], 1)


def at_distance(p_a: float, sigma: float, n: int) -> tuple[Halfspace, torch.Tensor, float]:
    """A halfspace, ``n`` copies of the input 0.5, and the true radius for ``p_A``."""
    d = sigma * float(norm.ppf(p_a))
    return Halfspace(0.5 - d), torch.full((n, 1, 1, 1), 0.5), d


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def allowed_failures(reps: int, alpha: float) -> int:
    """The most failures a level-alpha procedure shows in ``reps`` runs, but with
    probability 1e-4."""
    return int(binom.ppf(1 - 1e-4, reps, alpha))


# --- the confidence sequence ------------------------------------------------------------------
def test_the_look_levels_sum_to_alpha_and_the_looks_grow_geometrically():
    assert look_alphas(0.01, 100_000).sum() == pytest.approx(0.01, rel=1e-4)
    grid = looks(100_000)
    assert grid[0] == 1000 and grid[-1] == 100_000 and grid == sorted(set(grid))
    assert looks(20_000)[0] == 200 and looks(5000)[0] == 100
    assert all(b <= 1.25 * a + 1 for a, b in zip(grid, grid[1:], strict=False))
    assert looks(7) == [7]


def test_radii_are_the_certified_radii_of_the_noise():
    p = np.array([0.3, 0.5, 0.6, 0.99])
    assert radii(p, "gaussian", 0.5, None) == pytest.approx(
        [0, 0, 0.5 * norm.ppf(0.6), 0.5 * norm.ppf(0.99)]
    )
    assert radii(p, "laplace", 0.5, None) == pytest.approx(
        [0, 0, -0.5 * np.log(0.8), -0.5 * np.log(0.02)]
    )


@pytest.mark.parametrize("p", [0.6, 0.95])
def test_the_lower_bounds_hold_together_at_an_adversarial_stopping_look(p):
    """Stop at the first look whose lower bound exceeds the true p (the worst stopping rule):
    with the levels alpha_k this fails in at most alpha of the runs; the same harness catches
    the naive sequence (level alpha at every look), so the check has teeth."""
    alpha, reps = 0.05, 4000
    grid = np.array(looks(20_000))
    rng = np.random.default_rng(0)
    steps = np.diff(grid, prepend=0)
    counts = rng.binomial(steps[None, :], p, size=(reps, len(grid))).cumsum(1)
    n = np.broadcast_to(grid, counts.shape)

    def failures(levels: np.ndarray) -> int:
        return int(
            (lower_bounds(counts, n, np.broadcast_to(levels, counts.shape)) > p).any(1).sum()
        )

    assert failures(look_alphas(alpha, len(grid))) <= allowed_failures(reps, alpha)
    assert failures(np.full(len(grid), alpha)) > allowed_failures(reps, alpha)


def test_sequential_radii_are_valid_on_the_halfspace():
    """2000 certifications with alpha = 0.1: the fraction of radii above the true one stays
    within the binomial tolerance of alpha; and the radii are close below it."""
    reps, alpha = 2000, 0.1
    model, x, d = at_distance(0.9, 1.0, reps)
    pred, rad = certify(
        model,
        x,
        sigma=1.0,
        alpha=alpha,
        sequential=True,
        max_n=2000,
        radius_tolerance=0.5,
        generator=gen(1),
    )
    assert (rad > d).sum() <= allowed_failures(reps, alpha)
    assert (pred == 0).float().mean() > 0.99 and float(rad.mean()) > d - 0.5


def test_replay_stops_recorded_votes_where_the_rule_does():
    """Without a model: a path of all votes for c_A stops at the first look whose bound
    ``alpha_k^(1/N_k)`` reaches Phi(2) (max_radius 2 sigma); a path of none stops at once as an
    abstention; a wrong shape is refused."""
    grid = np.array(looks(100_000))
    alphas = look_alphas(0.001, len(grid))
    rule = Stopping(0.25, 0.0, 2.0)
    kw = dict(sigma=1.0, max_n=100_000, alpha=0.001, rule=rule, noise="gaussian")
    draws, low = replay(np.stack([grid, 0 * grid]), **kw)
    first = int(np.argmax(alphas ** (1 / grid) >= norm.cdf(2)))
    assert draws.tolist() == [grid[first], grid[0]]
    assert low[0] == pytest.approx(alphas[first] ** (1 / grid[first])) and low[1] == 0
    with pytest.raises(ValueError, match="looks"):
        replay(grid[None, :-1], **kw)


# --- stopping ---------------------------------------------------------------------------------
def at_radius(d: float, sigma: float, n: int) -> tuple[Halfspace, torch.Tensor]:
    """A halfspace at distance ``d`` from ``n`` copies of the input 0.5."""
    return Halfspace(0.5 - d), torch.full((n, 1, 1, 1), 0.5)


def test_a_point_inside_a_cell_of_the_grid_stops_long_before_max_n():
    model, x = at_radius(2.25, 1.0, 8)  # the cell [2.0, 2.5) of the grid step 0.5
    certs = list(
        certify_iter(
            model,
            x,
            sigma=1.0,
            sequential=True,
            max_n=100_000,
            radius_tolerance=0.5,
            generator=gen(2),
        )
    )
    assert all(c.draws < 30_000 and c.prediction == 0 for c in certs)
    assert all(2.0 <= c.radius <= 2.25 for c in certs)
    assert sorted(c.index for c in certs) == list(range(8))


def test_the_returned_radius_lies_in_the_true_radius_cell():
    """2000 certifications with alpha = 0.1 of a point whose radius 1.25 is inside the cell
    [1.0, 1.5): a radius outside the cell needs a bound to fail (probability <= 2 alpha)."""
    reps, alpha = 2000, 0.1
    model, x = at_radius(1.25, 1.0, reps)
    certs = list(
        certify_iter(
            model,
            x,
            sigma=1.0,
            alpha=alpha,
            sequential=True,
            max_n=50_000,
            radius_tolerance=0.5,
            generator=gen(7),
        )
    )
    outside = sum(not 1.0 <= c.radius < 1.5 for c in certs)
    assert outside <= allowed_failures(reps, 2 * alpha)
    assert np.mean([c.draws for c in certs]) < 5000


def test_a_point_just_above_a_multiple_draws_until_late_and_one_on_it_stops_early():
    """Radius 1.02 on the grid of step 0.5: only the last looks of 100,000 draws can certify
    1.0 (fixed N = 100,000 does in about 85 % of runs), so the rule draws on; an input stops
    early where one of the projection's upper bounds fails (at most PROJECTION_LEVEL = 0.3 of
    the runs). Radius 1.0 itself no amount of draws certifies, and the projection of what the
    remaining draws can give stops it early, below 1.0."""
    kw = dict(sigma=1.0, sequential=True, max_n=100_000, radius_tolerance=0.5, generator=gen(8))
    above = list(certify_iter(*at_radius(1.02, 1.0, 10), **kw))
    assert sum(c.draws >= 50_000 and c.radius > 0.98 for c in above) >= 6
    assert all(c.radius < 1.02 for c in above)
    on = list(certify_iter(*at_radius(1.0, 1.0, 4), **kw))
    assert np.mean([c.draws for c in on]) < 50_000 and all(0.5 <= c.radius < 1.0 for c in on)


def test_a_point_stops_once_it_reaches_max_radius():
    model, x = at_radius(3.7, 1.0, 4)
    kw = dict(sigma=1.0, sequential=True, max_n=100_000, radius_tolerance=0.25)
    capped = list(certify_iter(model, x, max_radius=2.0, generator=gen(9), **kw))
    assert all(c.radius >= 2.0 and c.draws < 2000 for c in capped)
    free = list(certify_iter(model, x, generator=gen(9), **kw))
    assert all(c.draws > 10 * max(d.draws for d in capped) for c in free)


def test_a_point_that_cannot_reach_min_radius_stops_early():
    model, x, _ = at_distance(0.52, 1.0, 8)
    certs = list(
        certify_iter(
            model,
            x,
            sigma=1.0,
            sequential=True,
            max_n=100_000,
            radius_tolerance=0.01,
            min_radius=0.5,
            generator=gen(3),
        )
    )
    assert all(c.draws <= 1000 for c in certs)
    assert all(c.prediction == ABSTAIN or c.radius < 0.5 for c in certs)
    # without min_radius and with a fine tolerance it keeps drawing
    (c,) = certify_iter(
        model,
        x[:1],
        sigma=1.0,
        sequential=True,
        max_n=20_000,
        radius_tolerance=0.01,
        generator=gen(3),
    )
    assert c.draws > 5000


def test_sequential_results_do_not_depend_on_the_batch_size_or_the_other_inputs():
    model, x, _ = at_distance(0.9, 1.0, 3)
    kw = dict(sigma=1.0, sequential=True, max_n=3000, radius_tolerance=0.3)
    a = certify(model, x, batch_size=64, generator=[gen(i) for i in range(3)], **kw)
    b = certify(model, x[1:], batch_size=64, generator=[gen(i) for i in range(1, 3)], **kw)
    assert torch.equal(a[1][1:], b[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_n": 0}, "max_n"),
        ({"radius_tolerance": 0.0}, "radius_tolerance"),
        ({"radius_tolerance": -1.0}, "radius_tolerance"),
        ({"min_radius": -0.1}, "min_radius"),
        ({"max_radius": 0.0}, "max_radius"),
        ({"sequential": "yes"}, "sequential"),
        ({"generator": [gen()]}, "one torch.Generator"),
    ],
)
def test_bad_sequential_options_are_refused(kwargs, match):
    model, x, _ = at_distance(0.9, 1.0, 2)
    with pytest.raises((ValueError, TypeError), match=match):
        certify(model, x, sigma=1.0, **{"sequential": True, **kwargs})


# --- fixed N unchanged; batching --------------------------------------------------------------
def reference_certify(model, x, n0, n, alpha, batch_size, generator):
    """Cohen's CERTIFY as before this change: per input, n0 then n draws of ``noisy_logits``."""
    out = []
    for i in range(len(x)):
        counts = []
        for num in (n0, n):
            votes = torch.cat(
                [
                    lg.argmax(1)
                    for _, lg in noisy_logits(
                        model, x[i : i + 1], num, 0.5, "gaussian", batch_size, generator
                    )
                ]
            )
            counts.append(torch.bincount(votes, minlength=10))
        c_a = int(counts[0].argmax())
        out.append(
            (c_a, int(counts[1][c_a]), lower_confidence_bound(int(counts[1][c_a]), n, alpha))
        )
    return out


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_fixed_n_is_cohens_procedure_draw_for_draw(toy_model, toy_data, batch_size):
    x = toy_data[0][:4]
    certs = list(
        certify_iter(
            toy_model,
            x,
            sigma=0.5,
            n0=20,
            n=150,
            alpha=0.01,
            batch_size=batch_size,
            generator=gen(4),
        )
    )
    ref = reference_certify(toy_model, x, 20, 150, 0.01, batch_size, gen(4))
    assert [(c.count, c.p_lower) for c in certs] == [(r[1], r[2]) for r in ref]
    assert [c.prediction for c in certs] == [r[0] if r[2] > 0.5 else ABSTAIN for r in ref]


def test_a_measured_batch_size_changes_nothing_but_the_forwards():
    """No batch_size: the noise is drawn as with batch_size=1000, forwards at the measured
    size (here forced to 64 through the cache)."""
    model, x, _ = at_distance(0.8, 1.0, 3)
    _CHOSEN[model] = {(tuple(x.shape[1:]), x.dtype, x.device): 64}
    a = certify(model, x, sigma=1.0, n0=10, n=3000, generator=gen(5))
    calls = model.calls
    b = certify(model, x, sigma=1.0, n0=10, n=3000, batch_size=1000, generator=gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert calls > 3 * (model.calls - calls)  # 64 rows per forward, not 1000
    assert torch.equal(
        predict(model, x, sigma=1.0, n=500, generator=gen(6)),
        predict(model, x, sigma=1.0, n=500, batch_size=1000, generator=gen(6)),
    )


def test_best_batch_size_measures_big_jobs_only_and_caches():
    model = Halfspace(0.0)
    x = torch.zeros(1, 1, 4, 4)
    assert best_batch_size(model, x, 100, 1000) == 1000 and model.calls == 0
    size = best_batch_size(model, x, 10**7, 1000)
    calls = model.calls
    assert size in CANDIDATES and calls > 0
    assert best_batch_size(model, x, 10**7, 1000) == size and model.calls == calls


def test_run_certification_batches_examples_and_resumes_sequentially(toy_model, toy_data, tmp_path):
    x, y = toy_data[0][:4], toy_data[1][:4]
    seq = {"max_n": 400, "radius_tolerance": 0.1}
    full = run_certification(
        toy_model,
        x,
        y,
        sigma=0.25,
        n0=10,
        seed=1,
        out=tmp_path / "a",
        sequential=seq,
        batch_size=50,
    )
    run_certification(
        toy_model,
        x[:2],
        y[:2],
        sigma=0.25,
        n0=10,
        seed=1,
        out=tmp_path / "b",
        sequential=seq,
        batch_size=50,
    )
    again = run_certification(
        toy_model,
        x,
        y,
        sigma=0.25,
        n0=10,
        seed=1,
        out=tmp_path / "b",
        sequential=seq,
        batch_size=50,
    )
    rows = [
        sorted(
            (json.loads(r) for r in (tmp_path / d / "certify.jsonl").read_text().splitlines()[1:]),
            key=lambda r: r["index"],
        )
        for d in "ab"
    ]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and all(0 < r["draws"] <= 400 for r in rows[0])
    assert full["certified_accuracy"] == again["certified_accuracy"]
    assert full["config"]["sequential"] == seq


def test_cli_certify_sequential(fake_fmnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    assert (
        cli.main(
            [
                "certify",
                str(ckpt),
                "--sigma",
                "0.25",
                "--n0",
                "10",
                "--n-points",
                "2",
                "--sequential",
                "--max-n",
                "300",
                "--radius-tolerance",
                "0.2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "c" / "certify.json").read_text())
    assert summary["config"]["sequential"] == {
        "max_n": 300,
        "radius_tolerance": 0.2,
        "min_radius": 0.0,
        "max_radius": None,
    }
    rows = (tmp_path / "c" / "certify.jsonl").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(json.loads(r)["draws"] <= 300 for r in rows)


def test_cli_certify_measures_the_batch_size_unless_given(fake_fmnist, tmp_path, monkeypatch):
    """certify's --batch-size defaults to None (measured); a given one is passed on."""
    from robustlab.evaluation import certification

    got = []

    def spy(*args, **kwargs):
        got.append(kwargs["batch_size"])
        return run_certification(*args, **kwargs)

    monkeypatch.setattr(certification, "run_certification", spy)
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    common = [
        "certify",
        str(ckpt),
        "--sigma",
        "0.25",
        "--n0",
        "10",
        "--n",
        "50",
        "--n-points",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*common, "--batch-size", "32", "--out", str(tmp_path / "b")]) == 0
    assert got == [None, 32]


# --- the smoothing curves at the measured batch size ------------------------------------------
def sampler_logits(model, x, sigma, draws, batch_size, generator):
    """draw_logits' former loop: noisy_logits' chunks placed per input in draw order."""
    out = torch.empty(len(x), draws, 2)
    filled = [0] * len(x)
    with torch.no_grad():
        for rows, logits in noisy_logits(model, x, draws, sigma, "gaussian", batch_size, generator):
            for r, row in zip(rows.tolist(), logits, strict=True):
                out[r, filled[r]] = row
                filled[r] += 1
    return out


@pytest.mark.parametrize("batch_size", [3, 7, 1000])
def test_draw_logits_with_a_batch_size_are_the_samplers_draws(batch_size):
    model = Halfspace(0.0)
    x = torch.rand(4, 1, 2, 2)
    got = draw_logits(model, x, 0.5, 5, gen(3), batch_size=batch_size)
    assert torch.equal(got, sampler_logits(model, x, 0.5, 5, batch_size, gen(3)))


def test_draw_logits_and_curves_without_a_batch_size_use_the_measured_one():
    """None: the noise of batch_size=1000, forwards at the measured size (forced to 16)."""
    model = Halfspace(0.0)
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 2, (6,), generator=gen(1))
    _CHOSEN[model] = {(tuple(x.shape[1:]), x.dtype, x.device): 16}
    calls = model.calls
    got = draw_logits(model, x, 0.5, 8, gen(4), batch_size=None)
    assert model.calls - calls == 3  # 48 rows, 16 per forward
    assert torch.equal(got, draw_logits(model, x, 0.5, 8, gen(4), batch_size=1000))
    measured = smoothing_curves(model, x, y, sigmas=[0.5], samples=[1, 8], batch_size=None)
    given = smoothing_curves(model, x, y, sigmas=[0.5], samples=[1, 8], batch_size=1000)
    assert measured["rows"] == given["rows"] and measured["config"]["batch_size"] is None
