"""WRM (Sinha, Namkoong, Duchi 2018): the ascent against closed-form maximisers, the objective
against its definition, the certificate against a case solved by bisection and against its
own construction, and the recipe. The objective contract is in test_objectives.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import make_quadrants
from robustlab.attacks.wrm import smoothed_ce, transport_cost, wrm_ascent
from robustlab.config import load_recipe
from robustlab.evaluation.wrm import FINITE_SAMPLE_NOTE, wrm_certificate

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "wrm.toml"


def _points(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64), torch.randn(
        d, generator=g, dtype=torch.float64
    )


# --- the ascent ---------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, 15])
def test_ascent_reaches_the_maximiser_of_a_linear_loss(steps):
    """l(x) = w.x: argmax w.x - gamma ||x - x0||^2 = x0 + w / (2 gamma), outside [0, 1] here
    (the ascent does not clip)."""
    x0, w = _points()
    gamma = 0.2
    x = wrm_ascent(lambda xa: xa @ w, x0, gamma, steps)
    torch.testing.assert_close(x, x0 + w / (2 * gamma), rtol=1e-12, atol=1e-12)
    assert (x < 0).any() or (x > 1).any()


def test_ascent_converges_on_a_strongly_concave_quadratic():
    """l(x) = w.x + (a/2) ||x - x0||^2 with a < 2 gamma: maximiser x0 + w / (2 gamma - a), which
    the first step alone misses by half; each step t shrinks the error by the factor
    1 - (1 - a / (2 gamma)) / sqrt(t + 2) of the reference's step rule."""
    x0, w = _points()
    gamma, a = 0.5, 0.5

    def loss(xa):
        return xa @ w + 0.5 * a * (xa - x0).square().sum(1)

    exact = x0 + w / (2 * gamma - a)
    err = [
        float((wrm_ascent(loss, x0, gamma, k) - exact).norm() / (exact - x0).norm())
        for k in (0, 15, 100)
    ]
    assert err[0] == pytest.approx(0.5)
    assert err[1] == pytest.approx(0.5 * math.prod(1 - 0.5 / math.sqrt(t + 2) for t in range(15)))
    assert err[1] < 0.05 and err[2] < 1e-3, err


def test_ascent_leaves_inputs_and_parameters_alone():
    model = nn.Linear(5, 3).double()
    x0, _ = _points()
    before = x0.clone()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = wrm_ascent(lambda xa: smoothed_ce(model(xa), y), x0, 0.5)
    assert torch.equal(x0, before) and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="wrm gamma must be"):
        wrm_ascent(lambda xa: xa.sum(1), x0, 0.0)


def test_smoothed_ce_is_the_reference_label_smoothing():
    """0.9 on the true class, 0.1 / (K - 1) on the others, as the reference clips its labels."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 5])
    target = torch.full((4, 10), 0.1 / 9, dtype=torch.float64)
    target[torch.arange(4), y] = 0.9
    expected = -(target * F.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(smoothed_ce(logits, y, 0.1), expected)
    torch.testing.assert_close(smoothed_ce(logits, y), F.cross_entropy(logits, y, reduction="none"))


# --- the objective ------------------------------------------------------------------------------
def _smooth_cnn(drop: float) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return rl.models.create(
            "smallcnn", num_classes=4, input_size=16, activation="softplus", drop=drop
        )


def test_objective_is_the_smoothed_ce_at_the_ascent_points():
    model = _smooth_cnn(drop=0.0)  # no dropout, no BatchNorm: train and eval forwards agree
    x, y = make_quadrants(8, seed=1)
    obj = rl.training.create_objective("wrm", gamma=1.0, steps=3)
    assert not obj.needs_threat and obj.config() == {
        "name": "wrm",
        "gamma": 1.0,
        "steps": 3,
        "label_smoothing": 0.1,
    }
    loss = obj(model.train(), x, y)  # no threat model needed
    x_adv = wrm_ascent(lambda xa: smoothed_ce(model(xa), y, 0.1), x, 1.0, 3)
    with torch.no_grad():
        hand = smoothed_ce(model(x_adv), y, 0.1).mean()
        clean = smoothed_ce(model(x), y, 0.1).mean()
    torch.testing.assert_close(loss.detach(), hand)
    assert float(loss.detach()) > float(clean)


def test_objective_crafts_in_eval_mode():
    """With dropout the ascent's points are those of the eval-mode model, deterministically."""
    model = _smooth_cnn(drop=0.5).train()
    x, y = make_quadrants(6, seed=2)
    obj = rl.training.create_objective("wrm", gamma=1.0, steps=2)
    ours = obj.perturb(model, x, y)
    assert model.training
    model.eval()
    hand = wrm_ascent(lambda xa: smoothed_ce(model(xa), y, 0.1), x, 1.0, 2)
    torch.testing.assert_close(ours, hand)


def test_objective_defaults_and_bad_options():
    obj = rl.training.create_objective("wrm")
    assert obj.gamma == pytest.approx(0.5 / 1.3) and obj.steps == 15
    assert obj.label_smoothing == 0.1
    with pytest.raises(ValueError, match="wrm gamma must be a finite number > 0"):
        rl.training.create_objective("wrm", gamma=0)
    with pytest.raises(ValueError, match="wrm label_smoothing must be a number in"):
        rl.training.create_objective("wrm", label_smoothing=1.0)
    with pytest.raises(ValueError, match="wrm steps must be an integer >= 0"):
        rl.training.create_objective("wrm", steps=-1)


# --- the certificate ----------------------------------------------------------------------------
class Logistic(nn.Module):
    """Two classes, logits (0, w.x + b): CE = softplus(-m) for y = 1, softplus(m) for y = 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(b, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(m), m], 1)


def _phi_by_bisection(q0: torch.Tensor, norm_w: float, gamma: float):
    """max_s softplus(q0 + s |w|) - gamma s^2 (the loss moves along +-w only): the root s* of
    |w| sigmoid(q0 + s |w|) = 2 gamma s in [0, |w| / (2 gamma)]; returns (phi, s*^2, l(T))."""
    lo, hi = torch.zeros_like(q0), torch.full_like(q0, norm_w / (2 * gamma))
    for _ in range(100):
        mid = (lo + hi) / 2
        up = norm_w * torch.sigmoid(q0 + mid * norm_w) > 2 * gamma * mid
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    s = (lo + hi) / 2
    loss = F.softplus(q0 + s * norm_w)
    return loss - gamma * s * s, s * s, loss


def test_certificate_matches_the_exact_dual_of_a_logistic_model():
    """gamma > |w|^2 / 8 makes l(x) - gamma ||x - x0||^2 strongly concave: phi_gamma, rho_hat
    and the loss at T are known to bisection precision."""
    x, w = _points(n=12, d=6, seed=3)
    w = w / w.norm()
    y = torch.arange(12) % 2
    model, gamma = Logistic(w, -0.3), 0.5
    m0 = x @ w - 0.3
    phi, cost, loss = _phi_by_bisection(torch.where(y == 1, -m0, m0), 1.0, gamma)
    out = wrm_certificate(model, x, y, gamma, rhos=[0.0, 0.1, 1.0], batch_size=5)  # 15 steps
    assert out["phi_mean"] == pytest.approx(float(phi.mean()), rel=1e-6)
    assert out["rho_hat"] == pytest.approx(float(cost.mean()), rel=2e-3)
    assert out["loss_at_rho_hat"] == pytest.approx(float(loss.mean()), rel=5e-4)
    assert [c["bound"] for c in out["certificate"]] == pytest.approx(
        [gamma * r + float(phi.mean()) for r in (0.0, 0.1, 1.0)], rel=1e-6
    )
    short = wrm_certificate(model, x, y, gamma, rhos=[0.0], steps=0)
    assert out["step_residual_max"] < 1e-3 < short["step_residual_max"]
    assert out["n"] == 12 and out["finite_sample_term"] == FINITE_SAMPLE_NOTE


def test_certificate_is_its_construction_on_a_smooth_cnn():
    """The bound is gamma * rho + mean(l(T) - gamma c(T, x0)) with T the shared ascent; at
    rho_hat it equals the achieved loss, above it it is larger; phi >= the clean loss."""
    model = _smooth_cnn(drop=0.5)
    x, y = make_quadrants(10, seed=2)
    gamma, steps = 2.0, 4
    model.eval()
    t = wrm_ascent(lambda xa: smoothed_ce(model(xa), y), x, gamma, steps)
    with torch.no_grad():
        loss_t, cost = smoothed_ce(model(t), y).double(), transport_cost(t, x).double()
    rho_hat = float(cost.mean())
    phi = float((loss_t - gamma * cost).mean())
    model.train()
    out = wrm_certificate(
        model, x, y, gamma, rhos=[0.0, rho_hat, 2 * rho_hat], steps=steps, batch_size=4
    )
    assert model.training  # its mode given back
    assert out["rho_hat"] == pytest.approx(rho_hat, rel=1e-5)
    assert out["phi_mean"] == pytest.approx(phi, rel=1e-5)
    bounds = [c["bound"] for c in out["certificate"]]
    assert bounds == pytest.approx(
        [phi, gamma * rho_hat + phi, 2 * gamma * rho_hat + phi], rel=1e-5
    )
    assert bounds[1] == pytest.approx(out["loss_at_rho_hat"], rel=1e-5)
    assert bounds[2] > out["loss_at_rho_hat"] and out["phi_mean"] >= out["clean_loss"]
    assert 0 <= out["accuracy_at_rho_hat"] <= 1 and math.isfinite(out["step_residual_mean"])


def test_certificate_bad_input():
    model = Logistic(torch.ones(3, dtype=torch.float64), 0.0)
    x, y = torch.rand(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="wrm rho must be a finite number >= 0"):
        wrm_certificate(model, x, y, 1.0, rhos=[0.1, -1.0])
    with pytest.raises(TypeError, match="rhos must be a list"):
        wrm_certificate(model, x, y, 1.0, rhos=0.5)
    with pytest.raises(ValueError, match="labels out of range"):
        wrm_certificate(model, x, torch.tensor([0, 1, 2, 1]), 1.0, rhos=[0.1])


# --- the recipe ---------------------------------------------------------------------------------
def test_recipe_is_the_reference_setting_on_a_smooth_model():
    recipe = load_recipe(RECIPE)
    assert recipe.train.objective == "wrm" and recipe.dataset == "fashion-mnist"
    assert recipe.model["activation"] in rl.models.activations()
    assert recipe.model["activation"] != "relu"  # the certificate needs a smooth loss
    opts = recipe.train.objective_options
    assert opts["gamma"] == pytest.approx(0.5 / 1.3, abs=1e-4) and opts["steps"] == 15
    assert (recipe.train.optimizer, recipe.train.lr, recipe.train.batch_size) == ("adam", 1e-3, 256)
