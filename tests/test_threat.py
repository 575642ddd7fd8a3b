"""ThreatModel: oracle tests against NumPy and property tests with Hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustlab import ThreatModel, parse_eps

NORMS = ["linf", "l2", "l1"]
ORD = {"linf": np.inf, "l2": 2, "l1": 1}


def batch(seed: int, n: int = 6, shape=(1, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g, dtype=torch.float64)
    v = x + 2 * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    return x, v


@pytest.mark.parametrize("norm", NORMS)
def test_distance_matches_numpy(norm):
    x, v = batch(0)
    t = ThreatModel(norm, 0.5)
    want = np.linalg.norm((v - x).reshape(len(x), -1).numpy(), ord=ORD[norm], axis=1)
    np.testing.assert_allclose(t.distance(v, x).numpy(), want, rtol=1e-12)


def test_linf_projection_is_numpy_clip():
    x, v = batch(1)
    t = ThreatModel("linf", 0.1, bounds=(0.0, 1.0))
    want = np.clip(np.clip(v.numpy(), x.numpy() - 0.1, x.numpy() + 0.1), 0, 1)
    np.testing.assert_allclose(t.project(v, x).numpy(), want, rtol=0, atol=0)


def test_l2_projection_without_active_box_is_radial():
    x, v = batch(2)
    t = ThreatModel("l2", 0.7, bounds=(-100.0, 100.0))
    d = (v - x).reshape(len(x), -1).numpy()
    want = d * np.minimum(1.0, 0.7 / np.linalg.norm(d, axis=1, keepdims=True))
    got = (t.project(v, x) - x).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_l1_projection_without_active_box_matches_sorting_oracle():
    """Duchi et al. (2008) sort-based projection onto the l1 ball as an independent oracle."""
    x, v = batch(3)
    t = ThreatModel("l1", 2.0, bounds=(-100.0, 100.0))
    d = (v - x).reshape(len(x), -1).numpy()
    want = []
    for row in d:
        u = np.sort(np.abs(row))[::-1]
        css = np.cumsum(u)
        rho = np.nonzero(u * np.arange(1, len(u) + 1) > (css - 2.0))[0][-1]
        theta = (css[rho] - 2.0) / (rho + 1)
        want.append(np.sign(row) * np.maximum(np.abs(row) - theta, 0))
    got = (t.project(v, x) - x).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(got, np.array(want), atol=1e-9)


def test_projection_with_box_is_nearest_feasible_point_scipy():
    """With the box active, compare l2/l1 projections to SciPy's constrained minimiser."""
    from scipy.optimize import minimize

    x, v = batch(4, n=3, shape=(5,))
    for norm, eps in (("l2", 0.4), ("l1", 0.6)):
        t = ThreatModel(norm, eps)
        p = t.project(v, x)
        for i in range(len(x)):
            xi, vi = x[i].numpy(), v[i].numpy()
            cons = [
                {
                    "type": "ineq",
                    "fun": lambda z, xi=xi, eps=eps, o=ORD[norm]: (
                        eps - np.linalg.norm(z - xi, ord=o)
                    ),
                }
            ]
            r = minimize(
                lambda z, vi=vi: ((z - vi) ** 2).sum(),
                xi,
                bounds=[(0, 1)] * 5,
                constraints=cons,
                method="SLSQP",
                options={"ftol": 1e-12},
            )
            ours = float(((p[i] - v[i]) ** 2).sum())
            assert ours <= r.fun + 1e-6, (norm, ours, r.fun)


arrays = st.integers(0, 2**31 - 1).map(lambda s: batch(s, n=4, shape=(2, 3, 3)))


@settings(max_examples=60, deadline=None)
@given(seed_batch=arrays, norm=st.sampled_from(NORMS), eps=st.floats(0.0, 3.0))
def test_projection_feasible_idempotent_and_nearest(seed_batch, norm, eps):
    x, v = seed_batch
    t = ThreatModel(norm, eps)
    p = t.project(v, x)
    assert t.contains(p, x).all()
    torch.testing.assert_close(t.project(p, x), p, rtol=0, atol=1e-9)
    # nearest: no random feasible point is closer to v than the projection
    if norm in ("linf", "l2"):
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            z = t.project(x + torch.randn(x.shape, generator=g, dtype=x.dtype), x)
            dz = (z - v).flatten(1).norm(dim=1)
            dp = (p - v).flatten(1).norm(dim=1)
            assert (dp <= dz + 1e-9).all()


@pytest.mark.parametrize("norm", NORMS)
def test_random_init_in_ball_bounds_and_deterministic(norm):
    x, _ = batch(5, n=200, shape=(1, 3, 3))
    x = x.float()
    t = ThreatModel(norm, 0.3)
    a = t.random_init(x, torch.Generator().manual_seed(7))
    b = t.random_init(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert t.contains(a, x).all()
    assert not torch.equal(a, x)


def test_random_init_l2_is_uniform_in_ball():
    # radius of a uniform point in the d-ball: P(r <= s * eps) = s^d; mean r = eps * d / (d + 1)
    t = ThreatModel("l2", 1.0, bounds=(-10.0, 10.0))
    x = torch.zeros(4000, 1, 2, 2)
    r = t.distance(t.random_init(x, torch.Generator().manual_seed(0)), x)
    assert abs(float(r.mean()) - 4 / 5) < 0.01


@pytest.mark.parametrize("norm", NORMS)
def test_steepest_step_lengths(norm):
    g = torch.randn(5, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    t = ThreatModel(norm, 1.0)
    s = t.steepest_step(g, 0.2, l1_sparsity=0.05)
    lengths = t.distance(s, torch.zeros_like(s))
    torch.testing.assert_close(lengths, torch.full((5,), 0.2))
    assert ((s * g).flatten(1).sum(1) > 0).all()  # ascent direction
    if norm == "linf":
        assert torch.equal(s, 0.2 * g.sign())
    if norm == "l1":
        assert ((s != 0).flatten(1).sum(1) == 5).all()  # 5% of 100 coordinates
    assert torch.equal(t.steepest_step(torch.zeros_like(g), 0.2), torch.zeros_like(g))


def test_parse_eps():
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps("0.1") == 0.1
    assert ThreatModel("linf", "8/255").eps == 8 / 255
    with pytest.raises(ValueError, match="8/255"):
        parse_eps("__import__('os')")
    with pytest.raises(TypeError):
        parse_eps(True)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("l3", 0.1), "valid norms"),
        (("linf", -0.1), ">= 0"),
        (("linf", math.nan), "finite"),
        (("linf", 0.1, (1.0, 0.0)), "low < high"),
        (("linf", 0.1, "ab"), "bounds"),
    ],
)
def test_bad_threat_models(args, match):
    with pytest.raises(ValueError, match=match):
        ThreatModel(*args)


def test_check_raises_instead_of_clipping():
    x = torch.zeros(2, 1, 2, 2)
    t = ThreatModel("linf", 0.1)
    with pytest.raises(RuntimeError, match="outside"):
        t.check(x + 0.2, x)
    t.check(x + 0.1, x)


def test_to_dict_round_trip():
    t = ThreatModel("l2", "1/2", bounds=(-1, 1))
    assert ThreatModel.from_dict(t.to_dict()) == t
