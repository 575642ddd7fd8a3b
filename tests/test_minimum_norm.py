"""Minimum-norm attacks (FAB, FAB-T, DDN, C&W L2) against the exact minimal norms of a linear
model, their eps contract, and their success when unbounded."""

from __future__ import annotations

import pytest
import torch

from linear_oracle import exact_broken, exact_min_norm, train_linear
from robustlab import ThreatModel, attacks
from robustlab.attacks.fab import project_on_hyperplane

# eps with an intermediate exact robust accuracy for train_linear(seed=0)
EPS = {"linf": 0.18, "l2": 1.07, "l1": 5.6}
# (attack, norm, options, bound on the median of min_norm / exact): measured medians are
# 1.005 (fab, fab-t linf/l2: the 5 % overshoot, halved by the backward steps), 1.0005 (fab,
# fab-t l1), 1.001 (ddn, quantised), 1.000 (cw-l2, with p90 1.004), 1.020 (deepfool l2 and
# linf: its 2 % overshoot; L-BFGS-B and EAD: test_min_norm_classic.py)
CASES = [
    *[(name, norm, {}, 1.02) for name in ("fab", "fab-t") for norm in ("linf", "l2", "l1")],
    ("ddn", "l2", {}, 1.02),
    ("cw-l2", "l2", {"steps": 300}, 1.02),
    *[("deepfool", norm, {}, 1.025) for norm in ("l2", "linf")],
]


@pytest.fixture(scope="module")
def linear():
    model, x, y = train_linear(seed=0)
    exact = {norm: exact_min_norm(model, x, y, norm).float() for norm in EPS}
    return model, x, y, exact


@pytest.mark.parametrize(("name", "norm", "opts", "bound"), CASES)
def test_min_norm_against_exact(name, norm, opts, bound, linear):
    model, x, y, exact = linear
    exact = exact[norm]
    atk = attacks.create(name, ThreatModel(norm, EPS[norm]), **opts)
    res = atk(model, x, y)
    m = res.min_norm
    # never below the true minimum (it is the norm of a real adversarial point) ...
    assert (m >= exact * (1 - 1e-4) - 1e-6).all()
    # ... and close to it
    solved = (exact > 0) & torch.isfinite(exact)
    assert torch.isfinite(m[solved]).all()
    assert (m[solved] / exact[solved]).median() <= bound
    # the eps contract: broken exactly where min_norm <= eps, x_adv inside the ball
    tol = atk.threat.tolerance()
    assert torch.equal(m <= EPS[norm] + tol, res.success)
    assert (m > EPS[norm] + tol).float().mean().item() == pytest.approx(res.robust_accuracy)
    assert atk.threat.contains(res.x_adv, x).all()


def test_fab_t_robust_accuracy_matches_exact(linear):
    model, x, y, _ = linear
    exact = 1 - exact_broken(model, x, y, "linf", EPS["linf"]).float().mean().item()
    t = ThreatModel("linf", EPS["linf"])
    full = attacks.create("fab-t", t)(model, x, y)
    early = attacks.create_for_evaluation("fab-t", t)(model, x, y)
    assert abs(early.robust_accuracy - exact) <= 0.01
    assert torch.equal(full.success, early.success)  # early stop changes only the work


@pytest.mark.parametrize(
    ("name", "norm", "eps", "opts"),
    [
        ("fab", "linf", 1.0, {}),
        ("fab-t", "l2", 16.0, {}),
        ("fab", "l1", 256.0, {}),
        ("ddn", "l2", 16.0, {}),
        ("cw-l2", "l2", 16.0, {"steps": 100, "search_steps": 5}),
    ],
)
def test_unbounded_success(name, norm, eps, opts, toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    res = attacks.create(name, ThreatModel(norm, eps), early_stop=True, **opts)(toy_model, x, y)
    assert res.success.all()
    assert torch.isfinite(res.min_norm).all()


def test_fab_restarts_never_worse(linear):
    model, x, y, _ = linear
    t = ThreatModel("l2", EPS["l2"])
    one = attacks.create("fab", t, steps=20)(model, x, y)
    three = attacks.create("fab", t, steps=20, restarts=3)(model, x, y)
    assert (three.min_norm <= one.min_norm).all()
    assert attacks.create("fab-t", t).config()["n_target_classes"] == 9


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_hyperplane_projection_is_feasible_and_minimal(norm):
    """Against candidates: any point of the hyperplane inside the box is at least as far."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 6, generator=g, dtype=torch.float64)
    p = torch.rand(50, 6, generator=g, dtype=torch.float64)
    c = 0.3 * torch.randn(50, generator=g, dtype=torch.float64)
    d = project_on_hyperplane(norm, w, c, -p, 1 - p)
    assert ((d >= -p - 1e-12) & (d <= 1 - p + 1e-12)).all()
    reachable = torch.where(
        c > 0,
        (w * torch.where(w > 0, 1 - p, -p)).sum(1),
        (w * torch.where(w > 0, -p, 1 - p)).sum(1),
    )
    feasible = c.abs() <= reachable.abs()
    assert torch.allclose((w * d).sum(1)[feasible], c[feasible])
    assert torch.allclose((w * d).sum(1)[~feasible], reachable[~feasible])
    t = ThreatModel(norm, 1.0)
    for _ in range(200):  # random feasible points: box points moved onto the hyperplane
        q = torch.rand(50, 6, generator=g, dtype=torch.float64) - p
        j = torch.randint(0, 6, (50,), generator=g)
        wj = w.gather(1, j[:, None])[:, 0]
        qj = q.gather(1, j[:, None])[:, 0] + (c - (w * q).sum(1)) / wj
        q = q.scatter(1, j[:, None], qj[:, None])
        pj = p.gather(1, j[:, None])[:, 0]
        ok = feasible & (qj >= -pj) & (qj <= 1 - pj)
        zero = torch.zeros_like(q)
        assert (t.distance(d, zero)[ok] <= t.distance(q, zero)[ok] + 1e-9).all()


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("fab", {"steps": 0}, "steps"),
        ("fab", {"beta": 1.5}, "beta"),
        ("fab", {"eta": 0.5}, "eta"),
        ("fab-t", {"n_target_classes": 0}, "n_target_classes"),
        ("ddn", {"gamma": 1.0}, "gamma"),
        ("ddn", {"levels": 1}, "levels"),
        ("cw-l2", {"initial_const": 0}, "initial_const"),
        ("cw-l2", {"kappa": -1}, "kappa"),
    ],
)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        attacks.create(name, ThreatModel("l2", 1.0), **opts)


@pytest.mark.parametrize("name", ["ddn", "cw-l2"])
def test_l2_only(name):
    with pytest.raises(ValueError, match="l2"):
        attacks.create(name, ThreatModel("linf", 0.1))
