"""Colored noise injection (CNI-W) as a model option: models.create(..., noise="cni-w")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab import models
from robustlab.models.noise import (
    NoisyConv2d,
    NoisyLinear,
    disabled,
    inject,
    noise_parameter_names,
    noisy_layers,
)

KW = {"num_classes": 4, "input_size": 16}


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_weight_noise_covariance_is_diagonal_plus_low_rank():
    """Cov(W~ - W) = diag(std(W) * a) + V V^T, estimated from one weight draw per forward."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(2, 1, (1, 3), dtype=torch.float64)  # N = 6 weights, no nn.Linear
    inject(layer, "cni-w", rank=2)
    assert isinstance(layer, NoisyConv2d) and layer.noise_factor.shape == (6, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
        layer.noise_diag.copy_(torch.rand(layer.weight.shape, generator=g, dtype=torch.float64))
        layer.noise_factor.copy_(torch.randn(6, 2, generator=g, dtype=torch.float64))
        s = layer.weight.std()
        cov = torch.diag(s * layer.noise_diag.flatten()) + layer.noise_factor @ layer.noise_factor.T
        onehot = torch.eye(6, dtype=torch.float64).view(6, 2, 1, 3)  # output k = W~_k + b
        n = 20_000
        torch.manual_seed(1)
        eps = torch.stack(
            [layer(onehot).flatten() - layer.bias - layer.weight.flatten() for _ in range(n)]
        )
    emp = torch.cov(eps.T)
    # standard error of a Gaussian sample covariance: sqrt((S_ii S_jj + S_ij^2) / n); every
    # entry within 5 of them (a 5-sigma miss has probability < 1e-5 over the 21 entries)
    se = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() / se).max() < 5
    assert (eps.mean(0).abs() / (cov.diag() / n).sqrt()).max() < 5  # zero mean
    # the low-rank part is what makes the noise colored: without it the test would fail
    white = torch.diag(s * layer.noise_diag.flatten())
    assert ((emp - white).abs() / se).max() > 20


def test_layers_initial_values_last_linear_and_no_decay():
    model = models.create("smallcnn", noise="cni-w", **KW)
    layers = noisy_layers(model)
    assert len(layers) == 7 and all(isinstance(m, NoisyConv2d | NoisyLinear) for m in layers)
    *colored, last = layers
    assert last is model.classifier.fc3 and last.kind == "pni-w"
    assert last.granularity == "element" and last.alpha.shape == last.weight.shape
    assert bool((last.alpha == 0.25).all())
    for m in colored:
        assert m.kind == "cni-w" and m.noise_factor.shape == (m.weight.numel(), 5)
        assert bool((m.noise_diag == 0.0625).all()) and bool((m.noise_factor == 0.01).all())
    noise_keys = set(noise_parameter_names(model))
    assert len(noise_keys) == 2 * 6 + 1
    assert set(model.state_dict()) == set(models.create("smallcnn", **KW).state_dict()) | noise_keys
    for name, p in model.named_parameters():
        assert getattr(p, "robustlab_no_decay", False) == (name in noise_keys), name
    assert model.robustlab_arch["kwargs"]["noise_options"] == {
        "rank": 5,
        "init": 0.25,
        "factor_init": 0.01,
    }
    assert "rank=5" in repr(model)


@pytest.mark.parametrize("name", ["smallcnn", "resnet20"])
def test_random_in_eval_and_train_plain_when_disabled(name):
    torch.manual_seed(0)
    model = models.create(name, noise="cni-w", **KW).eval()
    plain = models.create(name, **KW).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in noise_parameter_names(model)}
    )
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # noise on in eval mode
        with disabled(model):
            assert torch.equal(model(x), plain(x))
            assert torch.equal(model(x), model(x))
        assert all(m.noise_enabled for m in noisy_layers(model))  # restored
    with torch.no_grad():
        lenet = models.create("lenet", noise="cni-w", **KW).train()  # no dropout in lenet
        assert not torch.equal(lenet(x), lenet(x))  # and in train mode


def test_gradients_reach_the_diagonal_and_the_factor():
    torch.manual_seed(0)
    model = models.create("smallcnn", noise="cni-w", **KW).train()
    x, y = _x(8), torch.arange(8) % 4
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    for key in noise_parameter_names(model):
        grad = params[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


def test_zero_noise_parameters_give_the_plain_layer_and_finite_gradients():
    layer = nn.Conv2d(1, 2, 3)
    inject(layer, "cni-w")
    with torch.no_grad():
        layer.noise_diag.zero_()
        layer.noise_factor.zero_()
    x = torch.rand(2, 1, 5, 5)
    out = layer(x)
    assert torch.equal(out, F.conv2d(x, layer.weight, layer.bias))
    out.sum().backward()
    assert torch.isfinite(layer.noise_diag.grad).all()  # sqrt at 0: no inf / nan


def test_checkpoint_round_trip(tmp_path):
    model = models.create("smallcnn", noise="cni-w", noise_options={"rank": 3}, **KW)
    with torch.no_grad():
        for key in noise_parameter_names(model):
            dict(model.named_parameters())[key].uniform_(
                0.0, 0.1, generator=torch.Generator().manual_seed(3)
            )
    loaded = models.load(models.save(model, tmp_path / "model.safetensors"))
    assert loaded.robustlab_arch == model.robustlab_arch
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    params = dict(loaded.named_parameters())
    assert all(params[k].robustlab_no_decay for k in noise_parameter_names(loaded))
    model.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(_x())
        torch.manual_seed(5)  # the noise comes from the global RNG: same seed, same draws
        assert torch.equal(a, loaded(_x()))


def test_bad_options_are_named():
    for rank in (0, 1.5, True, -2):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            models.create("lenet", noise="cni-w", noise_options={"rank": rank})
    with pytest.raises(ValueError, match="factor_init"):
        models.create("lenet", noise="cni-w", noise_options={"factor_init": -0.1})
    with pytest.raises(ValueError, match="init"):
        models.create("lenet", noise="cni-w", noise_options={"init": float("nan")})
    with pytest.raises(ValueError, match="cni-w has no granularity"):
        models.create("lenet", noise="cni-w", noise_options={"granularity": "layer"})
    with pytest.raises(ValueError, match="options of cni-w"):
        models.create("lenet", noise="pni-w", noise_options={"rank": 5})
    with pytest.raises(ValueError, match="cni-w"):
        models.create("lenet", noise="cni-a")
