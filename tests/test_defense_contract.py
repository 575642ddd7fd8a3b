"""Every registered defense keeps the contract the evaluation relies on: logits of the right
shape for any batch, the input untouched, and its declarations true. A module that declares
randomness gives two different outputs for one input and one that does not gives the same;
a declared non-differentiable stage gives no usable gradient until BPDA switches it, and a
defense without one gives finite, non-zero input gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robustlab as rl
from robustlab.attacks.bpda import bpda, nondifferentiable_stages
from robustlab.attacks.losses import rejects
from robustlab.models.dncnn import Denoiser

K = 4  # classes of the toy data


def _smallcnn(**kw):
    torch.manual_seed(0)
    return rl.models.create("smallcnn", **{"num_classes": K, "input_size": 16, **kw}).eval()


def _build(name, toy_model, toy_data):
    x, y = toy_data
    if name == "thermometer":
        return rl.defenses.create(name, _smallcnn(in_channels=16), levels=16)
    if name == "k-wta":
        return rl.defenses.create(name, _smallcnn())
    if name in ("feature-squeezing", "pca-detector"):
        return rl.defenses.create(name, toy_model).fit(x[:128])
    if name == "trapdoor":  # fpr 0.1: every toy label has the 10 points of its own quantile
        return rl.defenses.create(name, toy_model, fpr=0.1).fit(x[:128])
    # labels: class statistics, supervised fits
    if name in ("mahalanobis", "lid", "kd-bu", "mahalanobis-ensemble"):
        return rl.defenses.create(name, toy_model).fit(x[:128], y[:128])
    if name == "detector-net":  # supervised: BIM points crafted inside fit
        return rl.defenses.create(name, toy_model, width=4, epochs=2, eps=0.3).fit(x[:128], y[:128])
    if name == "extra-class":  # a model with an extra output, trained elsewhere
        return rl.defenses.create(name, _smallcnn(num_classes=K + 1)).fit(x[:128])
    if name == "mixup-inference":
        return rl.defenses.create(name, toy_model, samples=4).fit(x[128:], y[128:])
    if name == "smoothing":
        return rl.defenses.create(name, toy_model, sigma=0.25, samples=8, vote="soft")
    if name == "denoised":
        return rl.defenses.create(name, toy_model, denoiser=Denoiser(depth=2, width=4))
    if name == "magnet":
        ae = rl.models.create("magnet-ae", width=2)
        return rl.defenses.create(name, toy_model, autoencoder=ae).fit(x[:128])
    return rl.defenses.create(name, toy_model)


def test_every_defense_is_covered():
    covered = {
        "bit-depth",
        "crop-rescale",
        "denoised",
        "feature-squeezing",
        "jpeg",
        "k-wta",
        "kd-bu",
        "lid",
        "magnet",
        "mahalanobis",
        "median",
        "mixup-inference",
        "pca-detector",
        "random-resize-pad",
        "smoothing",
        "thermometer",
        "tv-min",
        "detector-net",
        "extra-class",
        "trapdoor",
        "mahalanobis-ensemble",
    }
    assert set(rl.defenses.names()) == covered, "add the new defense to this contract test"


@pytest.fixture(params=rl.defenses.names())
def defense(request, toy_model, toy_data):
    return _build(request.param, toy_model, toy_data).eval()


def _declared_random(model) -> bool:
    return any(getattr(m, "robustlab_random", False) for m in model.modules())


@pytest.mark.parametrize("n", [1, 5])
def test_shape_and_input_untouched(defense, toy_data, n):
    x = toy_data[0][:n].clone()
    before = x.clone()
    torch.manual_seed(1)
    with torch.no_grad():
        out = defense(x)
    assert torch.equal(x, before)
    assert out.shape == (n, K + 1 if rejects(defense) else K)
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_declared_randomness_is_real(defense, toy_data):
    x = toy_data[0][:8]
    torch.manual_seed(1)
    with torch.no_grad():
        a, b = defense(x), defense(x)
    assert _declared_random(defense) == (not torch.equal(a, b))


def test_declared_differentiability_is_real(defense, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]

    def grad():
        xg = x.clone().requires_grad_(True)
        out = defense(xg)
        if not out.requires_grad:
            return None
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xg, allow_unused=True)
        return g

    torch.manual_seed(1)
    modules = dict(defense.named_modules())
    for name in nondifferentiable_stages(defense):  # no usable gradient through the stage
        xg = x.clone().requires_grad_(True)
        out = modules[name](xg)
        if out.requires_grad:
            (gs,) = torch.autograd.grad(out.sum(), xg, allow_unused=True)
            assert gs is None or float(gs.abs().max()) == 0.0, name
    if nondifferentiable_stages(defense):
        with bpda(defense):  # BPDA opens the paths the stages blocked
            g = grad()
    else:
        g = grad()
    assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 0
