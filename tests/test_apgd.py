"""Auto-PGD: the checkpoint schedule, exactness on a linear model, strength against PGD, early
stop, cost in model calls, and input checks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from linear_oracle import exact_broken, train_linear
from robustlab import ThreatModel, attacks
from robustlab.attacks.apgd import checkpoints

# eps with intermediate exact robust accuracy (about 50 %) for train_linear(seed=0)
ORACLE_EPS = {"linf": 0.18, "l2": 1.07, "l1": 5.6}


def test_checkpoints_follow_the_paper_rule():
    """w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06);
    the reference code's integer version gives the same iterations for N = 100."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    paper = [math.ceil(q * 100) for q in p if q <= 1]
    assert paper == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(100) == paper
    # integer rule: first after floor(0.22 N), intervals shrink by floor(0.03 N) to floor(0.06 N)
    assert checkpoints(200) == [0, 44, 82, 114, 140, 160, 174, 186, 198]
    assert checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [0, 1]


@pytest.fixture(scope="module")
def linear():
    return train_linear()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_apgd_t_is_exact_on_a_linear_model(norm, linear):
    model, x, y = linear
    eps = ORACLE_EPS[norm]
    exact = exact_broken(model, x, y, norm, eps)
    assert 0.3 < 1 - exact.float().mean() < 0.7
    for name in ("apgd-ce", "apgd-t"):
        res = attacks.create_for_evaluation(name, ThreatModel(norm, eps))(model, x, y)
        assert not (res.success & ~exact).any(), name  # never breaks an unbreakable point
        if name == "apgd-t":
            assert res.robust_accuracy <= 1 - exact.float().mean() + 0.01


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.15), ("l2", 1.5), ("l1", 12.0)])
def test_apgd_ce_at_least_as_strong_as_pgd(norm, eps, toy_model, toy_data):
    x, y = toy_data[0][:128], toy_data[1][:128]
    t = ThreatModel(norm, eps)
    pgd = attacks.create("pgd", t, steps=20)(toy_model, x, y)
    apgd = attacks.create("apgd-ce", t, early_stop=True)(toy_model, x, y)
    assert apgd.robust_accuracy <= pgd.robust_accuracy
    assert int((pgd.success & ~apgd.success).sum()) <= 2


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t"])
def test_early_stop_breaks_the_same_points(name, toy_model, toy_data):
    x, y = toy_data[0][:128], toy_data[1][:128]
    t = ThreatModel("linf", 0.15)
    full = attacks.create(name, t, steps=30)(toy_model, x, y)
    early = attacks.create(name, t, steps=30, early_stop=True)(toy_model, x, y)
    assert torch.equal(full.success, early.success)
    assert 0 < int(full.success.sum()) < len(x)
    assert torch.allclose(full.x_adv[full.success], early.x_adv[early.success], atol=1e-6)


def test_restarts_only_add_successes_and_wrong_points_stay(toy_model, toy_data):
    x, y = toy_data[0][:128], toy_data[1][:128].clone()
    y[:4] = (y[:4] + 1) % 4  # misclassified clean: returned unchanged
    t = ThreatModel("linf", 0.13)
    one = attacks.create("apgd-dlr", t, steps=10)(toy_model, x, y)
    three = attacks.create("apgd-dlr", t, steps=10, restarts=3)(toy_model, x, y)
    assert (three.success | ~one.success).all()
    assert three.success[:4].all() and torch.equal(three.x_adv[:4], x[:4])


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(("name", "runs"), [("apgd-ce", 2), ("apgd-t", 2 * 3)])
def test_cost_is_steps_plus_one_per_run(name, runs, toy_model, toy_data):
    """One clean forward, then N + 1 forward/backward passes per run; apgd-t runs once per
    target, capped at classes - 1 = 3 (default n_target_classes 9)."""
    model = Counting(toy_model)
    atk = attacks.create(name, ThreatModel("linf", 0.001), steps=7, restarts=2)
    res = atk(model, *toy_data)
    assert not res.success.any()
    assert model.calls == 2 + 1 + runs * (7 + 1)  # + probe and final check in Attack.__call__


def test_too_few_classes_for_dlr_is_a_clear_error(toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8] % 2
    for k, name, need in ((3, "apgd-t", "4 classes"), (2, "apgd-dlr", "3 classes")):
        model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), k))
        with pytest.raises(ValueError, match=need):
            attacks.create(name, ThreatModel("linf", 0.1), steps=2)(model, x, y)


def test_bad_options_are_rejected():
    t = ThreatModel("linf", 0.1)
    for name, opts, match in (
        ("apgd-ce", {"steps": 0}, "steps"),
        ("apgd-ce", {"rho": 1.5}, "rho"),
        ("apgd-dlr", {"restarts": 1.0}, "restarts"),
        ("apgd-t", {"n_target_classes": 0}, "n_target_classes"),
    ):
        with pytest.raises(ValueError, match=match):
            attacks.create(name, t, **opts)
    with pytest.raises(TypeError, match="apgd-t"):
        attacks.create("apgd-t", t, loss="ce")
