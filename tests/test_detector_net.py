"""The detector network (Metzen et al. 2017): its score is its head on the classifier's
captured feature map, it learns to separate clean from adversarial points, it is
differentiable, and it records the attack it was fitted against."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robustlab as rl
from helpers import make_quadrants
from robustlab.defenses.detector_net import default_layer, detector_head

OPTS = dict(width=4, epochs=10, lr=3e-3, minibatch=32, eps=0.3, seed=0)


@pytest.fixture(scope="module")
def fitted(_trained, toy_data):
    x, y = toy_data
    return rl.defenses.create("detector-net", _trained, **OPTS).fit(x[:160], y[:160]).eval()


def test_score_is_the_head_on_the_captured_features(fitted, toy_data):
    x = toy_data[0][200:208]
    model = fitted.base
    assert fitted.layer == "conv"  # TinyCNN: no pool or activation module, the first Conv2d
    with torch.no_grad():
        by_hand = fitted.head((model.conv(x) - fitted.mean) / fitted.std).squeeze(1)
        got = fitted.score(x)
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert fitted.feature_shape == (8, 16, 16) and fitted.mean.shape == (8, 1, 1)
    with torch.no_grad():
        out = fitted(x)
    expected = out[:, :-1].amax(1) + (by_hand - fitted.threshold)
    assert out.shape == (8, 5) and torch.allclose(out[:, -1], expected, atol=1e-5)


def test_architecture_pools_only_large_maps():
    big = detector_head((8, 16, 16), width=4)
    small = detector_head((8, 4, 4), width=4)
    assert sum(isinstance(m, nn.MaxPool2d) for m in big) == 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in small) == 0
    convs = [m for m in big if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 4, (3, 3)),
        (4, 8, (3, 3)),
        (8, 8, (3, 3)),
        (8, 1, (1, 1)),
    ]
    assert big(torch.zeros(3, 8, 16, 16)).shape == (3, 1)


def test_detects_adversarial_points_at_the_fitted_fpr(fitted):
    x, y = make_quadrants(96, seed=7)
    res = fitted.attack(fitted.base, x, y)
    adv = res.x_adv[res.success]
    assert len(adv) > 40
    with torch.no_grad():
        fpr = float(fitted.detect(x).float().mean())
        tpr = float(fitted.detect(adv).float().mean())
    assert fpr <= 0.1 and tpr >= 0.95, (fpr, tpr)
    assert fitted.train_accuracy >= 0.9
    assert fitted.training_points["adversarial"] == fitted.training_points["clean"] > 0


def test_score_is_differentiable_in_x(fitted, toy_data):
    x = toy_data[0][:6].clone().requires_grad_(True)
    fitted.score(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().max()) > 0
    assert all(
        p.grad is None and not p.requires_grad  # the head is frozen
        for p in fitted.head.parameters()
    )


def test_config_records_the_attack(fitted, _trained, toy_data):
    cfg = json.loads(json.dumps(fitted.config()))
    assert cfg["name"] == "detector-net" and cfg["supervised"] is True
    assert cfg["attack"]["name"] == "pgd" and cfg["attack"]["threat"]["eps"] == 0.3
    assert cfg["attack"]["threat"]["norm"] == "linf"
    assert cfg["attack"]["steps"] == 10 and cfg["attack"]["random_start"] is False  # BIM
    assert cfg["layer"] == "conv" and cfg["feature_shape"] == [8, 16, 16]
    other = rl.defenses.create("detector-net", _trained, attack="fgsm", norm="l2", eps=1.0)
    assert other.config()["attack"]["name"] == "fgsm"
    assert other.config()["attack"]["threat"]["norm"] == "l2"


def test_fit_is_deterministic(fitted, _trained, toy_data):
    x, y = toy_data
    again = rl.defenses.create("detector-net", _trained, **OPTS).fit(x[:160], y[:160]).eval()
    with torch.no_grad():
        assert torch.equal(again.scores(x[200:]), fitted.scores(x[200:]))
    assert again.threshold == fitted.threshold


def test_errors(_trained, toy_data):
    x, _ = toy_data
    det = rl.defenses.create("detector-net", _trained, **OPTS)
    with pytest.raises(ValueError, match="labels"):
        det.fit(x[:64])
    with pytest.raises(ValueError, match="not fitted"):
        det.score(x[:2])
    with pytest.raises(ValueError, match="no module named"):
        rl.defenses.create("detector-net", _trained, layer="nope")
    with pytest.raises(ValueError, match="width"):
        rl.defenses.create("detector-net", _trained, width=0)


def test_default_layer_is_the_end_of_the_first_conv_block():
    assert default_layer(rl.models.create("smallcnn")) == "feature_extractor.maxpool1"
    assert default_layer(rl.models.create("lenet")) == "features.2"
    assert default_layer(rl.models.create("resnet20")) == "act"
    with pytest.raises(ValueError, match="layer="):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
