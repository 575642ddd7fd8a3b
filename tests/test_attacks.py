"""The attack contract, over every registered attack, and PGD's behaviour on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import ThreatModel, attacks

# l0: pixels of the 16 x 16 toy images (a class is a bright 8 x 8 quadrant)
NORM_EPS = {"linf": 0.3, "l2": 3.0, "l1": 32.0, "l0": 40}
# one step of l1 length eps on the few steepest coordinates (the fast gradient method's
# definition) cannot flip these images: exempt from the accuracy-drop check only
WEAK_BY_DEFINITION = {("fgsm", "l1")}
CASES = [
    (name, norm)
    for name in attacks.names()
    for norm in NORM_EPS
    if norm in attacks.ATTACKS.get(name).norms
]


# options an attack cannot be built without, given the test's model (unwrapped if it traps
# gradients)
REQUIRED_OPTIONS = {
    "transfer": lambda model: {"surrogate": model},
    "epgd": lambda model: {"sigma": 0.05},
    "smoothadv": lambda model: {"sigma": 0.05},
}


# smaller budgets for the attacks whose defaults cost tens of seconds on the toy model; the
# contract is about behaviour, and each still has to break the toy model
CHEAP_OPTIONS = {
    "cw-l2": {"steps": 200, "search_steps": 5},
    "nattack": {"population": 30},
    "pgd-l0": {"steps": 20, "restarts": 1},
    "sparse-rs": {"n_queries": 1000},
    "ead": {"steps": 200, "search_steps": 5},
    "lbfgs": {"steps": 10, "search_steps": 4},
    "cw-l0": {"steps": 30, "initial_const": 1.0, "largest_const": 100.0},
}


def build(name: str, norm: str, model=None, **opts) -> attacks.Attack:
    if name in REQUIRED_OPTIONS:
        opts = REQUIRED_OPTIONS[name](model) | opts
    opts = CHEAP_OPTIONS.get(name, {}) | opts
    return attacks.create(name, ThreatModel(norm, NORM_EPS[norm]), **opts)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_contract(name, norm, toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    x0, y0 = x.clone(), y.clone()
    for p in toy_model.parameters():
        p.requires_grad_(True)
    toy_model.train()
    atk = build(name, norm, toy_model)
    res = atk(toy_model, x, y, generator=torch.Generator().manual_seed(1))
    # caller's tensors and the model's mode and parameter gradients untouched
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert toy_model.training
    assert all(p.grad is None for p in toy_model.parameters())
    # inside the ball and the bounds
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert atk.threat.contains(res.x_adv, x).all()
    # success is the model's own verdict on x_adv
    toy_model.eval()
    with torch.no_grad():
        pred = toy_model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    # deterministic given a generator
    again = atk(toy_model, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.x_adv, again.x_adv)
    # accuracy drops on a trained model
    clean_acc = (toy_model(x).argmax(1) == y).float().mean()
    assert clean_acc > 0.95
    if (name, norm) not in WEAK_BY_DEFINITION:
        assert res.robust_accuracy < clean_acc - 0.3, (name, norm, res.robust_accuracy)


class Exploding(nn.Module):
    """Works for ``ok`` calls, then raises, to check the mode is restored on exceptions."""

    def __init__(self, inner: nn.Module, ok: int) -> None:
        super().__init__()
        self.inner, self.ok = inner, ok

    def forward(self, x):
        self.ok -= 1
        if self.ok < 0:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", attacks.names())
def test_mode_restored_on_exception(name, toy_model, toy_data):
    model = Exploding(toy_model, ok=2)
    model.train()
    norm = next(n for n in NORM_EPS if n in attacks.ATTACKS.get(name).norms)
    with pytest.raises(RuntimeError, match="boom"):
        build(name, norm, model)(model, *[t[:8] for t in toy_data])
    assert model.training and toy_model.training


class NoBackward(torch.autograd.Function):
    """Identity whose backward raises: proves an attack never asks for a gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("a gradient-free attack asked for a gradient")


class GradientTrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(NoBackward.apply(x))


GRADIENT_FREE = [(n, norm) for n, norm in CASES if not attacks.ATTACKS.get(n).uses_gradients]


@pytest.mark.parametrize(("name", "norm"), GRADIENT_FREE)
def test_gradient_free_attacks_take_no_gradient(name, norm, toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    res = build(name, norm, toy_model)(GradientTrap(toy_model), x, y)
    assert res.robust_accuracy < 0.7
    assert res.queries is not None and (res.queries >= 1).all()


MINIMUM_NORM = [(n, norm) for n, norm in CASES if attacks.ATTACKS.get(n).minimum_norm]


@pytest.mark.parametrize(("name", "norm"), MINIMUM_NORM)
def test_minimum_norm_is_consistent(name, norm, toy_model, toy_data):
    """min_norm is reported for every sample, never below the distance of a returned
    adversarial point, and a point counts as broken at eps exactly when min_norm <= eps."""
    x, y = toy_data[0][:64], toy_data[1][:64]
    atk = build(name, norm)
    res = atk(toy_model, x, y)
    assert res.min_norm is not None and res.min_norm.shape == (len(x),)
    dist = atk.threat.distance(res.x_adv, x)
    tol = atk.threat.tolerance()
    assert (res.min_norm[res.success] <= dist[res.success] + tol).all()
    assert torch.equal(res.min_norm <= atk.threat.eps + tol, res.success)


def test_restarts_only_add_successes(toy_model, toy_data):
    x, y = toy_data
    t = ThreatModel("linf", 0.15)
    one = attacks.create("pgd", t, steps=5)(toy_model, x, y)
    five = attacks.create("pgd", t, steps=5, restarts=5)(toy_model, x, y)
    assert (five.success | ~one.success).all()  # every point broken once stays broken
    assert five.success.sum() >= one.success.sum()


def test_early_stop_breaks_the_same_points(toy_model, toy_data):
    x, y = toy_data
    t = ThreatModel("linf", 0.15)
    full = attacks.create("pgd", t, steps=10)(toy_model, x, y)
    early = attacks.create("pgd", t, steps=10, early_stop=True)(toy_model, x, y)
    assert torch.equal(full.success, early.success)
    assert 0 < int(full.success.sum()) < len(x)


def test_keep_best_never_worse_than_last_iterate(toy_model, toy_data):
    x, y = toy_data
    t = ThreatModel("l2", 1.0)
    best = attacks.create("pgd", t, steps=10, loss="cw-margin")(toy_model, x, y)
    last = attacks.create("pgd", t, steps=10, loss="cw-margin", keep_best=False)(toy_model, x, y)
    assert (best.success | ~last.success).all()
    assert (best.loss >= last.loss - 1e-5).all()


def test_targeted_pgd_reaches_targets(toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    target = (y + 1) % 4
    atk = attacks.create("pgd", ThreatModel("linf", 0.4), steps=20, targeted=True)
    res = atk(toy_model, x, y, target=target)
    assert torch.equal(res.success, toy_model(res.x_adv).argmax(1) == target)
    assert res.success.float().mean() > 0.9
    with pytest.raises(ValueError, match="targeted"):
        atk(toy_model, x, y)


def test_zero_eps_returns_clean_points(toy_model, toy_data):
    x, y = toy_data
    res = attacks.create("pgd", ThreatModel("l2", 0.0), steps=3)(toy_model, x, y)
    assert torch.equal(res.x_adv, x)


def test_stronger_attacks_break_more(toy_model, toy_data):
    x, y = toy_data
    t = ThreatModel("linf", 0.15)
    fgsm = attacks.create("fgsm", t)(toy_model, x, y).robust_accuracy
    pgd = attacks.create("pgd", t, steps=20, restarts=2)(toy_model, x, y).robust_accuracy
    assert pgd <= fgsm


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid attacks are: .*fgsm.*pgd"):
        attacks.create("pgdd", ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="valid losses are"):
        attacks.create("pgd", ThreatModel("linf", 0.1), loss="hinge")
    with pytest.raises(TypeError, match="pgd"):
        attacks.create("pgd", ThreatModel("linf", 0.1), stepz=3)
