"""PGD's inner optimisers, MI-FGSM, CW-linf and the minimum-margin attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linear_oracle import exact_broken, train_linear
from robustlab import ThreatModel, attacks
from robustlab.attacks.losses import margin
from robustlab.attacks.pgd import OPTIMIZERS

# the update rules (sgd, rmsprop, adagrad, ftrl): their own tests in test_optimizers.py
STEEPEST = [name for name, rule in OPTIMIZERS.items() if rule.steepest]


@pytest.mark.parametrize("optimizer", STEEPEST)
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.3), ("l2", 3.0)])
def test_every_optimizer_breaks_the_toy_model(optimizer, norm, eps, toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    res = attacks.create("pgd", ThreatModel(norm, eps), optimizer=optimizer)(toy_model, x, y)
    assert res.robust_accuracy < 0.3


@pytest.mark.parametrize("optimizer", STEEPEST)
def test_optimizer_state_follows_the_samples_through_early_stop(optimizer, toy_model, toy_data):
    """Dropping broken samples must not shift another sample's momentum or Adam moments: the
    same points break, and the unbroken ones end at the very same iterate."""
    x, y = toy_data
    t = ThreatModel("linf", 0.15)
    full = attacks.create("pgd", t, optimizer=optimizer)(toy_model, x, y)
    early = attacks.create("pgd", t, optimizer=optimizer, early_stop=True)(toy_model, x, y)
    assert torch.equal(full.success, early.success)
    assert 0 < int(full.success.sum()) < len(x)
    assert torch.equal(full.x_adv[~full.success], early.x_adv[~full.success])


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_optimizer_state_restarts_afresh(optimizer, toy_model, toy_data):
    """Without a random start a second restart repeats the first exactly if, and only if, its
    optimiser state starts from zero again."""
    x, y = toy_data
    t = ThreatModel("linf", 0.15)
    one = attacks.create("pgd", t, optimizer=optimizer, random_start=False)(toy_model, x, y)
    two = attacks.create("pgd", t, optimizer=optimizer, random_start=False, restarts=2)(
        toy_model, x, y
    )
    assert torch.equal(one.x_adv, two.x_adv)


def test_optimizer_options_are_validated():
    t = ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match="valid optimizers are: sign, momentum, adam"):
        attacks.create("pgd", t, optimizer="lbfgs")
    with pytest.raises(ValueError, match="momentum"):
        attacks.create("pgd", t, optimizer="momentum", momentum=-1.0)
    cfg = attacks.create("pgd", t, optimizer="momentum", momentum=0.5).config()
    assert cfg["optimizer"] == "momentum" and cfg["momentum"] == 0.5
    assert attacks.create("pgd", t).config()["optimizer"] == "sign"


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_one_step_mi_fgsm_is_fgsm(norm, eps, toy_model, toy_data):
    x, y = toy_data
    t = ThreatModel(norm, eps)
    mi = attacks.create("mi-fgsm", t, steps=1)(toy_model, x, y)
    fgsm = attacks.create("fgsm", t)(toy_model, x, y)
    # linf: sign(g / ||g||_1) == sign(g) exactly; l2: the same unit vector up to rounding
    torch.testing.assert_close(mi.x_adv, fgsm.x_adv, rtol=0, atol=0 if norm == "linf" else 1e-6)


def test_mi_fgsm_defaults_are_the_papers():
    atk = attacks.create("mi-fgsm", ThreatModel("linf", 0.1))
    assert (atk.steps, atk.momentum, atk.random_start) == (10, 1.0, False)
    assert atk.step_size == pytest.approx(0.01)


def test_cw_linf_kappa_pushes_to_the_confidence_margin(toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    t = ThreatModel("linf", 0.5)
    for kappa in (0.0, 5.0):
        res = attacks.create("cw-linf", t, kappa=kappa)(toy_model, x, y)
        adv_margin = -margin(res.logits, y)  # max_{j != y} z_j - z_y
        assert res.success.all()
        assert (adv_margin >= kappa - 1e-4).all()
        if kappa == 0:
            assert adv_margin.min() < 1.0  # without kappa it stops just past the boundary
    # keep-best still prefers any successful point when kappa is out of reach
    small = ThreatModel("linf", 0.15)
    plain = attacks.create("cw-linf", small)(toy_model, x, y)
    high = attacks.create("cw-linf", small, kappa=50.0)(toy_model, x, y)
    assert torch.equal(plain.success, high.success)
    with pytest.raises(ValueError, match="kappa"):
        attacks.create("cw-linf", t, kappa=-1)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.18), ("l2", 1.07)])
def test_mm_reaches_the_exact_robust_accuracy_of_a_linear_model(norm, eps):
    model, x, y = train_linear()
    exact = exact_broken(model, x, y, norm, eps)
    res = attacks.create("mm", ThreatModel(norm, eps), k=3)(model, x, y)  # every other class
    assert (exact | ~res.success).all()  # it never claims an impossible break
    assert abs(res.robust_accuracy - (1 - exact.float().mean().item())) <= 0.01


class RowCounter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


def test_mm_only_attacks_unbroken_points(toy_model, toy_data):
    x, y = toy_data
    model = RowCounter(toy_model)
    atk = attacks.create("mm", ThreatModel("linf", 0.3), k=3, steps=20)
    res = atk(model, x, y)
    assert res.robust_accuracy == 0
    budget = len(x) * (1 + 3 * 21)  # clean pass + k (steps + 1) passes for every point
    assert model.rows < 0.2 * budget
    assert atk.config()["k"] == 3
    with pytest.raises(ValueError, match="k must be"):
        attacks.create("mm", ThreatModel("linf", 0.3), k=0)
