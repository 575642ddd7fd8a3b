"""The decision-boundary binarization test (Zimmermann et al. 2022): a strong attack passes, a
weak one and a gradient-masked model fail, and the pieces (sampling, fit, features) are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab
from robustlab.attacks import create
from robustlab.evaluation.binarization import (
    Binarized,
    _boundary_points,
    _fit_readout,
    binarization_test,
    feature_module,
)

LINF = robustlab.ThreatModel("linf", 0.1)


@pytest.fixture
def data(toy_data):
    x, y = toy_data
    return x[:8], y[:8]


def _li(result):
    return [r["logit_improvement"] for r in result["per_sample"]]


def test_pgd_passes_on_plain_model(toy_model, data):
    res = binarization_test(toy_model, *data, LINF, create("pgd", LINF, steps=20))
    assert res["n"] == res["n_valid"] == 8 and res["n_failed_setup"] == 0
    assert res["asr"] >= 0.9
    assert all(li > 0 for li in _li(res))  # beyond the most confident boundary training point
    assert res["settings"]["feature_layer"] == "fc"
    assert res["settings"]["boundary_min_distance"] == pytest.approx(1.05 * 0.95 * 0.1)
    assert res["settings"]["attack"]["name"] == "pgd"
    assert set(res["per_sample"][0]) == {
        "index",
        "setup_ok",
        "setup_error",
        "attack_success",
        "random_success",
        "logit_improvement",
    }


def test_weak_attack_fails(toy_model, data):
    weak = create("pgd", LINF, steps=1, step_size=0.001)  # moves 1 % of eps from its start
    res = binarization_test(toy_model, *data, LINF, weak)
    assert res["n_valid"] == 8
    assert res["asr"] <= 0.1
    assert all(li < 0 for li in _li(res))
    # fresh random boundary points already fool the read-out: random sampling beats the attack
    assert res["random_asr"] > res["asr"]


def test_gradient_masking_fails_pgd_and_bpda_passes(toy_model, data):
    masked = robustlab.defenses.create("bit-depth", toy_model, bits=1)  # round(x): zero gradient
    plain = binarization_test(masked, *data, LINF, create("pgd", LINF, steps=20))
    assert plain["n_valid"] == 8 and plain["asr"] <= 0.1
    adaptive = binarization_test(masked, *data, LINF, create("pgd", LINF, steps=20, bpda=True))
    assert adaptive["asr"] >= 0.9


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("l1", 8.0)])
def test_other_norms(toy_model, data, norm, eps):
    threat = robustlab.ThreatModel(norm, eps)
    x, y = data
    res = binarization_test(toy_model, x[:4], y[:4], threat, create("pgd", threat, steps=20))
    assert res["n_valid"] == 4 and res["asr"] >= 0.9
    assert res["settings"]["norm"] == norm


def test_named_feature_layer(toy_model, data):
    res = binarization_test(
        toy_model, *data, LINF, create("pgd", LINF, steps=20), feature_layer="conv"
    )
    assert res["settings"]["feature_layer"] == "conv"
    assert res["n_valid"] == 8 and res["asr"] >= 0.9


def test_binarized_features_and_hooks(toy_model, data):
    x = data[0][:3]
    readout = nn.Linear(8 * 8 * 8, 2)
    net = Binarized(toy_model, readout)
    assert net.feature_layer == "fc"
    expected = F.max_pool2d(F.relu(toy_model.conv(x)), 2).flatten(1)  # the input of fc
    torch.testing.assert_close(net.features(x), expected)
    torch.testing.assert_close(net(x), readout(expected))
    conv_net = Binarized(toy_model, nn.Linear(256, 2), "conv")
    torch.testing.assert_close(conv_net.features(x), x.flatten(1))  # conv's input: the image
    xg = x.clone().requires_grad_(True)
    out = net(xg)
    (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xg)
    assert g.abs().sum() > 0  # differentiable through the model
    assert not toy_model.fc._forward_pre_hooks and not toy_model.conv._forward_pre_hooks
    assert feature_module(nn.Sequential(nn.ReLU())) == (None, None)  # no Linear: the logits


def test_deterministic_given_seed(toy_model, data):
    x, y = data[0][:3], data[1][:3]
    attack = create("pgd", LINF, steps=5)
    a = binarization_test(toy_model, x, y, LINF, attack, seed=3)
    b = binarization_test(toy_model, x, y, LINF, attack, seed=3)
    c = binarization_test(toy_model, x, y, LINF, attack, seed=4)
    assert a == b
    assert _li(a) != _li(c)
    # each index has its own generator: a sample's result does not depend on N
    e = binarization_test(toy_model, x[:2], y[:2], LINF, attack, seed=3)
    assert _li(e) == _li(a)[:2]


def test_randomised_model_with_repeats(toy_model, data):
    class Noisy(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x + 0.02 * torch.randn_like(x))

    x, y = data[0][:4], data[1][:4]
    res = binarization_test(
        Noisy(toy_model), x, y, LINF, create("pgd", LINF, steps=20, eot=2), repeats=3
    )
    assert res["settings"]["repeats"] == 3
    assert res["n_valid"] == 4 and res["asr"] >= 0.75


def test_setup_failures_are_recorded(toy_model, data):
    huge = robustlab.ThreatModel("linf", 2.0)  # no point of [0, 1] is 2 away in linf
    res = binarization_test(toy_model, *data, huge, create("pgd", huge, steps=2))
    assert res["n_valid"] == 0 and res["n_failed_setup"] == 8
    assert res["asr"] is None and res["random_asr"] is None
    assert all("no boundary point" in r["setup_error"] for r in res["per_sample"])

    class NoLinear(nn.Module):  # 4 logits as features: 99 points are not separable
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    with pytest.warns(RuntimeWarning, match="4 features"):
        res = binarization_test(NoLinear(), *data, LINF, create("pgd", LINF, steps=2))
    assert res["settings"]["feature_layer"] is None
    assert res["n_valid"] == 0
    assert all("does not separate" in r["setup_error"] for r in res["per_sample"])


def test_restores_modes_rng_and_inputs(toy_model, data):
    x, y = data[0][:2], data[1][:2]
    x_before = x.clone()
    toy_model.train()
    toy_model.conv.eval()  # a mixed state must come back as it was
    rng = torch.get_rng_state()
    binarization_test(toy_model, x, y, LINF, create("pgd", LINF, steps=2))
    assert torch.equal(torch.get_rng_state(), rng)  # all draws from its own generators
    assert toy_model.training and toy_model.fc.training and not toy_model.conv.training
    assert torch.equal(x, x_before)
    assert not toy_model.fc._forward_pre_hooks


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.5), ("l1", 20.0)])
def test_boundary_points_lie_on_the_sphere(norm, eps):
    threat = robustlab.ThreatModel(norm, eps)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, generator=g)
    x[..., :4, :] = torch.randint(0, 2, (1, 1, 4, 8), generator=g).float()  # pixels at the bounds
    pts = _boundary_points(x, threat, 20, 0.9 * eps, g)
    assert len(pts) == 20  # clipping-aware rescaling: none dropped
    dist = threat.distance(pts, x.expand_as(pts))
    torch.testing.assert_close(dist, torch.full_like(dist, eps), rtol=1e-5, atol=0)
    assert threat.contains(pts, x.expand_as(pts)).all()
    # from the all-ones image no point reaches l2 distance sqrt(64) + 1 (the box's far corner
    # is sqrt(64) away): every drawn point falls short and is dropped
    far = robustlab.ThreatModel("l2", 9.0)
    assert len(_boundary_points(torch.ones(1, 1, 8, 8), far, 5, 8.5, g)) == 0


def test_fit_readout_separates_or_gives_up():
    g = torch.Generator().manual_seed(0)
    inner = torch.randn(30, 5, generator=g) - torch.tensor([3.0, 0, 0, 0, 0])
    bound = torch.randn(30, 5, generator=g) + torch.tensor([3.0, 0, 0, 0, 0])
    w, b = _fit_readout(inner, bound)
    assert (inner.double() @ w + b < 0).all() and (bound.double() @ w + b > 0).all()
    same = torch.randn(10, 5, generator=g)
    assert _fit_readout(same, same) is None  # identical points in both classes


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_inner": 0}, ValueError, "n_inner"),
        ({"n_boundary": 1.5}, ValueError, "n_boundary"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"batch_size": True}, ValueError, "batch_size"),
        ({"eta": 1.0}, ValueError, "eta"),
        ({"eta": 0}, ValueError, "eta"),
        ({"gap": 1.0}, ValueError, "gap"),
        ({"gap": -0.1}, ValueError, "gap"),
        ({"eta": 0.99, "gap": 0.05}, ValueError, r"\(1 \+ gap\) \* eta"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"feature_layer": "nope"}, ValueError, "no module named 'nope'"),
        ({"feature_layer": 3}, TypeError, "feature_layer"),
    ],
)
def test_bad_options_raise(toy_model, data, kwargs, error, match):
    with pytest.raises(error, match=match):
        binarization_test(toy_model, *data, LINF, create("pgd", LINF), **kwargs)


def test_bad_attack_or_threat_raise(toy_model, data):
    with pytest.raises(ValueError, match="differs"):
        binarization_test(toy_model, *data, LINF, create("pgd", robustlab.ThreatModel("linf", 0.2)))
    with pytest.raises(ValueError, match="untargeted"):
        binarization_test(toy_model, *data, LINF, create("pgd", LINF, targeted=True))
    with pytest.raises(TypeError, match="callable"):
        binarization_test(toy_model, *data, LINF, "pgd")
    zero = robustlab.ThreatModel("linf", 0.0)
    with pytest.raises(ValueError, match="eps > 0"):
        binarization_test(toy_model, *data, zero, create("pgd", zero))
