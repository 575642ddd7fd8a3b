"""The distribution detectors against their papers' definitions: LID (Ma et al. 2018) against
hand computations and the closed form on a known-dimensional subspace, KD+BU (Feinman et al.
2017) against NumPy and the exact expectation over enumerated dropout masks, and both
detectors' supervised fitting on the toy task."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.defenses.kd_bu import (
    KernelDensityUncertainty,
    bayesian_uncertainty,
    log_kernel_density,
    mc_softmax,
)
from robustlab.defenses.lid import LocalIntrinsicDimensionality, default_layers, lid_mle
from robustlab.defenses.supervised import LogisticHead
from robustlab.models.features import capture


def _lid_numpy(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((features[:, None, :] - reference[None, :, :]) ** 2).sum(-1))
    r = np.sort(d, axis=1)[:, :k]
    return -1.0 / np.log(r / r[:, -1:]).mean(1)


def test_lid_hand_case_and_numpy():
    # distances 1, 2, 4 (k = 3): -(1/3 (log 1/4 + log 2/4 + log 1))^{-1} = 1 / log 2
    lid = lid_mle(torch.tensor([[0.0]]), torch.tensor([[1.0], [-2.0], [4.0], [8.0]]), 3)
    assert lid.item() == pytest.approx(1 / math.log(2), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    f, ref = torch.randn(5, 3, generator=g), torch.randn(9, 3, generator=g)
    np.testing.assert_allclose(
        lid_mle(f, ref, 4).numpy(), _lid_numpy(f.numpy(), ref.numpy(), 4), rtol=1e-5
    )


@pytest.mark.parametrize("d", [2, 5])
def test_lid_recovers_the_dimension_of_a_subspace(d):
    # uniform points on a d-dim cube inside R^12: with u_i = (r_i / r_k)^d iid uniform, the
    # sum S of k - 1 terms -log(r_i / r_k) is Gamma(k - 1, rate d), so E[LID] = E[k / S] =
    # k d / (k - 2) and k / E[S] = k d / (k - 1)
    k, g = 20, torch.Generator().manual_seed(d)
    basis = torch.linalg.qr(torch.randn(12, d, generator=g, dtype=torch.float64))[0]
    ref = torch.rand(20000, d, generator=g, dtype=torch.float64) @ basis.T
    inner = (0.3 + 0.4 * torch.rand(500, d, generator=g, dtype=torch.float64)) @ basis.T
    lids = lid_mle(inner, ref, k)
    assert lids.mean().item() == pytest.approx(k * d / (k - 2), rel=0.03)
    assert 1 / (1 / lids).mean().item() == pytest.approx(k * d / (k - 1), rel=0.03)


def test_kernel_density_matches_numpy():
    g = torch.Generator().manual_seed(1)
    f, ref = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(7, 6, generator=g, dtype=torch.float64),
    )
    sigma = 1.7
    d2 = ((f.numpy()[:, None] - ref.numpy()[None]) ** 2).sum(-1)
    expected = np.exp(-d2 / sigma**2).mean(1)
    np.testing.assert_allclose(
        log_kernel_density(f, ref, sigma).exp().numpy(), expected, rtol=1e-10
    )


def test_bayesian_uncertainty_is_the_papers_formula():
    probs = torch.softmax(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(2)), 2)
    p = probs.numpy()
    expected = (p**2).sum(2).mean(0) - (p.mean(0) ** 2).sum(1)
    np.testing.assert_allclose(bayesian_uncertainty(probs).numpy(), expected, rtol=1e-6)


def test_mc_dropout_uncertainty_converges_to_the_enumerated_expectation():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    model = nn.Sequential(nn.Dropout(0.5), lin).eval()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.5]], dtype=torch.float64)
    # the 8 masks are equally likely with p = 0.5; kept units are scaled by 2
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    probs = []
    for mask in itertools.product([0.0, 2.0], repeat=3):
        z = (x.numpy() * np.array(mask)) @ w.T + b
        probs.append(np.exp(z) / np.exp(z).sum(1, keepdims=True))
    probs = np.stack(probs)
    exact = (probs**2).sum(2).mean(0) - (probs.mean(0) ** 2).sum(1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        drawn = mc_softmax(model, x, 4000, gen)
    assert not model[0].training  # the dropout layer's mode came back
    np.testing.assert_allclose(bayesian_uncertainty(drawn).numpy(), exact, rtol=0.05)
    with torch.no_grad():
        again = mc_softmax(model, x, 4000, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)  # the masks come from the generator


def test_logistic_head_learns_the_direction():
    x = torch.linspace(-3, 3, 40).unsqueeze(1)
    labels = (x[:, 0] + 0.5 * torch.sin(7 * x[:, 0]) > 0).float()
    head = LogisticHead().fit(torch.cat([x, torch.ones_like(x)], 1), labels)
    assert head.weight[0] > 0 and head.std[1] == 1  # a constant feature keeps std 1
    flipped = LogisticHead().fit(x, 1 - labels)
    assert flipped.weight[0] < 0


class DropCNN(nn.Module):
    """The toy CNN with a dropout layer before its head (the same function in eval mode)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.conv, self.drop, self.fc = base.conv, nn.Dropout(0.5), base.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)))


def _separates(detector, x, y):
    """Fitted on the toy data, the detector scores the adversarial points it was fitted on
    higher than their clean originals, with usable input gradients."""
    assert detector.fitted and detector.config()["supervised"]
    points = detector.config()["training_points"]
    assert points["clean"] == points["noisy"] == points["adversarial"] > 20
    xa = rl.attacks.create("fgsm", rl.ThreatModel("linf", 0.3))(detector.base, x, y).x_adv
    assert detector.scores(xa).mean() > detector.scores(x).mean() + 1
    xg = x[:8].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(detector(xg)[:, -1].sum(), xg)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_lid_detector_measures_against_its_reference(toy_model, toy_data):
    x, y = toy_data
    det = rl.defenses.create("lid", toy_model).fit(x, y)
    assert isinstance(det, LocalIntrinsicDimensionality)
    assert det.layers == default_layers(toy_model) == ["conv", "fc"]  # functional ReLUs
    assert det.config()["attack"]["name"] == "fgsm"
    assert det.config()["attack"]["threat"]["eps"] == 0.3
    # the characteristics are each layer's LID against the first `reference` fitting points
    with torch.no_grad():
        _, ref = capture(toy_model, x[:100], ["conv", "fc"], inputs=False)
        _, q = capture(toy_model, x[-10:], ["conv", "fc"], inputs=False)
        got = det.characteristics(x[-10:], toy_model(x[-10:]))
    for i in range(2):
        np.testing.assert_allclose(
            got[:, i].numpy(),
            _lid_numpy(q[i].double().numpy(), ref[i].double().numpy(), 20),
            rtol=1e-3,
        )
    _separates(det, x[200:], y[200:])


def test_lid_options_are_checked(toy_model):
    with pytest.raises(ValueError, match="reference"):
        LocalIntrinsicDimensionality(toy_model, k=20, reference=10)
    with pytest.raises(ValueError, match="no module named"):
        LocalIntrinsicDimensionality(toy_model, layers=["nope"])
    det = LocalIntrinsicDimensionality(toy_model, layers=["input", "logits"], reference=50)
    assert det.config()["layers"] == ["input", "logits"]


def test_kd_bu_without_dropout_warns_and_uses_kd_alone(toy_model, toy_data):
    x, y = toy_data
    det = KernelDensityUncertainty(toy_model)
    assert not det.randomized and det.feature_layer == "fc"
    with pytest.warns(UserWarning, match="no dropout"):
        det.fit(x, y)
    assert det.characteristics(x[:5], toy_model(x[:5])).shape == (5, 1)
    with pytest.raises(ValueError, match="supervised"):
        KernelDensityUncertainty(toy_model).fit(x)
    _separates(det, x[200:], y[200:])


def test_kd_bu_with_dropout_is_kd_and_bu_of_the_predicted_class(toy_model, toy_data):
    x, y = toy_data
    model = DropCNN(toy_model).eval()
    det = rl.defenses.create(
        "kd-bu", model, samples=8, bandwidth=3.0, generator=torch.Generator().manual_seed(5)
    ).fit(x, y)
    assert det.randomized and det.config()["uses_uncertainty"]
    xs = x[-6:]
    with torch.no_grad():
        logits, (feats,) = capture(model, xs, ["fc"], inputs=True)
        got = det.characteristics(xs, logits)
        det.generator = torch.Generator().manual_seed(9)
        again = det.characteristics(xs, logits)
        bu = bayesian_uncertainty(mc_softmax(model, xs, 8, torch.Generator().manual_seed(9)))
    ref, labels = det.reference.numpy(), det.reference_labels.numpy()
    for i, c in enumerate(logits.argmax(1).tolist()):
        d2 = ((ref[labels == c] - feats[i].numpy()) ** 2).sum(1)
        assert got[i, 0].exp().item() == pytest.approx(np.exp(-d2 / 9.0).mean(), rel=1e-4)
    torch.testing.assert_close(again[:, 1], bu)
    assert not model.drop.training
