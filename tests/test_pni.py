"""Parametric noise injection (PNI) as a model option: models.create(..., noise="pni-w")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab import models
from robustlab.models.noise import NoisyConv2d, NoisyLinear, disabled, inject, noisy_layers

ARCHS = ["smallcnn", "lenet", "resnet20"]
KW = {"num_classes": 4, "input_size": 16}


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _alphas(model: nn.Module) -> list[nn.Parameter]:
    return [m.alpha for m in noisy_layers(model)]


def _plain_twin(name: str, noisy: nn.Module) -> nn.Module:
    """The model without noise, holding the noisy model's weights."""
    plain = models.create(name, **KW)
    state = {k: v for k, v in noisy.state_dict().items() if not k.endswith(".alpha")}
    plain.load_state_dict(state)  # strict: the weights' keys are unchanged by the noise
    return plain.eval()


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("kind", ["pni-w", "pni-a"])
def test_noise_is_random_in_eval_and_off_when_disabled_or_zero(name, kind):
    torch.manual_seed(0)
    model = models.create(name, noise=kind, **KW).eval()
    assert noisy_layers(model) and all(
        isinstance(m, NoisyConv2d | NoisyLinear) for m in noisy_layers(model)
    )
    plain = _plain_twin(name, model)
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # noise is on in eval mode
        with disabled(model):
            assert torch.equal(model(x), plain(x))
        assert all(m.noise_enabled for m in noisy_layers(model))  # restored
        for a in _alphas(model):
            a.zero_()
        assert torch.equal(model(x), plain(x))  # alpha = 0: exactly the plain model


def test_noise_is_on_in_train_mode_and_gradients_reach_every_alpha():
    for kind in ("pni-w", "pni-a"):
        with torch.no_grad():  # lenet has no dropout: any difference is the noise
            lenet = models.create("lenet", noise=kind, **KW).train()
            assert not torch.equal(lenet(_x()), lenet(_x()))
        model = models.create("smallcnn", noise=kind, **KW).train()
        x, y = _x(8), torch.arange(8) % 4
        F.cross_entropy(model(x), y).backward()
        grads = [a.grad for a in _alphas(model)]
        assert len(grads) == 7 and all(g is not None and g.abs().sum() > 0 for g in grads), kind


def test_weight_noise_has_the_pni_statistics_and_is_shared_by_the_batch():
    torch.manual_seed(1)
    layer = nn.Linear(300, 200)
    inject(layer, "pni-w")
    with torch.no_grad():
        layer.alpha.fill_(0.5)
        w_noisy = (layer(torch.eye(300)) - layer.bias).T  # one forward = one weight draw
        ratio = (w_noisy - layer.weight).std() / layer.weight.std()
        assert abs(ratio - 0.5) < 0.02  # W~ = W + alpha * N(0, std(W)^2)
        x = torch.rand(1, 300).expand(3, 300)
        out = layer(x)
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # shared draw
    act = nn.Linear(300, 200)
    inject(act, "pni-a")
    with torch.no_grad():
        out = act(x)
        assert not torch.equal(out[0], out[1])  # activation noise: each element its own draw
        clean = F.linear(x, act.weight, act.bias)
        assert abs((out - clean).std() / clean.std() - 0.25) < 0.03


def test_granularities_alpha_shapes_and_no_decay_flag():
    shapes = {}
    for kind, gran in (
        ("pni-w", "layer"),
        ("pni-w", "channel"),
        ("pni-w", "element"),
        ("pni-a", "channel"),
    ):
        m = models.create("lenet", noise=kind, noise_options={"granularity": gran}, **KW)
        shapes[kind, gran] = (tuple(m.features[0].alpha.shape), tuple(m.classifier[0].alpha.shape))
        assert m.robustlab_arch["kwargs"]["noise_options"] == {"granularity": gran, "init": 0.25}
        for name, p in m.named_parameters():
            assert getattr(p, "robustlab_no_decay", False) == name.endswith(".alpha"), name
        assert all(bool((a == 0.25).all()) for a in _alphas(m))
    assert shapes == {
        ("pni-w", "layer"): ((1,), (1,)),
        ("pni-w", "channel"): ((6, 1, 1, 1), (120, 1)),
        ("pni-w", "element"): ((6, 1, 5, 5), (120, 64)),
        ("pni-a", "channel"): ((6, 1, 1), (120,)),
    }


def test_bad_noise_options_are_named():
    with pytest.raises(ValueError, match="pni-a, pni-w|pni-w, pni-a"):
        models.create("lenet", noise="gaussian")
    with pytest.raises(ValueError, match="granularity"):
        models.create("lenet", noise="pni-w", noise_options={"granularity": "row"})
    with pytest.raises(ValueError, match="element-wise pni-a"):
        models.create("lenet", noise="pni-a", noise_options={"granularity": "element"})
    with pytest.raises(ValueError, match="init"):
        models.create("lenet", noise="pni-w", noise_options={"init": -1.0})
    with pytest.raises(TypeError, match="granularity, init"):
        models.create("lenet", noise="pni-w", noise_options={"sigma": 0.1})
    with pytest.raises(ValueError, match="needs noise="):
        models.create("lenet", noise_options={"init": 0.1})


@pytest.mark.parametrize("name", ARCHS)
def test_checkpoint_round_trip_keeps_noise_and_learned_scales(tmp_path, name):
    model = models.create(name, noise="pni-w", noise_options={"granularity": "channel"}, **KW)
    with torch.no_grad():
        for a in _alphas(model):
            a.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    plain_keys = set(models.create(name, **KW).state_dict())
    alpha_keys = {k for k in model.state_dict() if k.endswith(".alpha")}
    assert set(model.state_dict()) == plain_keys | alpha_keys and alpha_keys
    loaded = models.load(models.save(model, tmp_path / "model.safetensors"))
    assert loaded.robustlab_arch == model.robustlab_arch
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert all(p.robustlab_no_decay for p in _alphas(loaded))
    model.eval()
    x = _x()
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(x)
        torch.manual_seed(5)  # noise comes from the global RNG: same seed, same draws
        assert torch.equal(a, loaded(x))


def test_one_epoch_of_pgd_at_trains_the_noise_scales(tmp_path, toy_data):
    from robustlab.training.trainer import TrainConfig, make_optimizer

    model = models.create("lenet", noise="pni-w", **KW)
    opt = make_optimizer(model, TrainConfig(weight_decay=5e-4))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(decay[id(a)] == 0.0 for a in _alphas(model))  # alpha: no weight decay
    rl.training.fit(
        model,
        toy_data,
        objective="pgd-at",
        threat=rl.ThreatModel("linf", 0.1),
        epochs=1,
        batch_size=64,
        lr=0.05,
        objective_options={"steps": 2},
        out=tmp_path,
    )
    alphas = torch.cat([a.detach().flatten() for a in _alphas(model)])
    assert torch.isfinite(alphas).all() and not torch.allclose(alphas, torch.tensor(0.25))
    loaded = models.load(tmp_path / "model.safetensors")
    assert torch.equal(torch.cat([a.flatten() for a in _alphas(loaded)]), alphas)
