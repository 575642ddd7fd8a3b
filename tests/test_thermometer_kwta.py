"""Tests for the thermometer encoding (defenses/thermometer.py) and k-WTA (defenses/kwta.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import TinyCNN, make_quadrants
from robustlab.attacks.bpda import bpda, nondifferentiable_stages
from robustlab.defenses.kwta import KWTA, KWTADefense
from robustlab.defenses.thermometer import Thermometer, ThermometerEncoding

SMALL = {"num_classes": 4, "input_size": 16}  # smallcnn for the 16x16 quadrant images


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    if not loss.requires_grad:
        return None
    return torch.autograd.grad(loss, x, allow_unused=True)[0]


# --- thermometer: the encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0.0, [1, 0, 0, 0]),
        (0.3, [1, 1, 0, 0]),
        (1.0, [1, 1, 1, 1]),
        (0.26, [1, 1, 0, 0]),  # floor(0.99999 * 0.26 * 4) = floor(1.04) = 1
        (0.5, [1, 1, 0, 0]),  # a bucket edge falls into the lower bucket: floor(1.99998) = 1
        (0.76, [1, 1, 1, 1]),  # floor(3.04) = 3
        (-0.2, [1, 0, 0, 0]),
        (1.3, [1, 1, 1, 1]),  # clipped to [0, 1] first
    ],
)
def test_encoding_hand_values(value: float, code: list[int]) -> None:
    out = ThermometerEncoding(levels=4).transform(torch.full((1, 1, 1, 1), value))
    assert out.flatten().tolist() == code


def test_encoding_shape_channel_order_dtype_and_input_untouched() -> None:
    x = torch.empty(2, 3, 5, 6, dtype=torch.float64)
    x[:, 0], x[:, 1], x[:, 2] = 0.0, 0.3, 1.0
    x[1, 1, 2, 3] = 0.6  # one pixel of channel 1 in bucket 2
    before = x.clone()
    out = ThermometerEncoding(levels=4)(x)
    assert out.shape == (2, 12, 5, 6) and out.dtype == torch.float64
    assert torch.equal(x, before)
    # channel c * levels + k holds code_k of input channel c
    expected = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    assert torch.equal(out[0, :, 4, 5], expected)
    assert torch.equal(out[1, 4:8, 2, 3], torch.tensor([1.0, 1, 1, 0], dtype=torch.float64))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert ThermometerEncoding()(x).shape == (2, 48, 5, 6)  # default: 16 levels


def test_encoding_counts_the_bucket() -> None:
    """The code of x has b + 1 ones, b = floor(0.99999 * x * levels), and is cumulative."""
    x = torch.rand(4, 2, 7, 7, generator=_gen())
    code = ThermometerEncoding(levels=16)(x).view(4, 2, 16, 7, 7)
    assert torch.equal(code.sum(2), torch.floor(0.99999 * x * 16) + 1)
    assert (code[:, :, 1:] <= code[:, :, :-1]).all()  # ones first, then zeros


def test_approximation_is_the_soft_thermometer() -> None:
    stage, levels = ThermometerEncoding(levels=8), 8
    x = torch.rand(3, 2, 5, 5, generator=_gen(1))
    code, soft = stage.transform(x), stage.approximation(x)
    assert soft.shape == code.shape
    # equal to the code except at index b + 1, where it is the fractional part of levels * x
    assert torch.equal(torch.floor(soft), code)
    frac = (levels * x - torch.floor(levels * x)).repeat_interleave(levels, 1)
    assert ((soft - code) <= frac + 1e-6).all()
    assert torch.allclose(soft.view(3, 2, levels, 5, 5).sum(2), (levels * x + 1).clamp(max=levels))
    # at the ends of the range and at bucket midpoints (b + 0.5) / levels
    ends = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    assert torch.equal(stage.approximation(ends), stage.transform(ends))
    mid = torch.full((1, 1, 1, 1), 2.5 / levels)
    assert stage.approximation(mid).flatten().tolist() == [1, 1, 1, 0.5, 0, 0, 0, 0]
    assert stage.transform(mid).flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("levels", [1, 0, 2.5, True, "16", None])
def test_levels_are_validated(levels: object) -> None:
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        ThermometerEncoding(levels)  # type: ignore[arg-type]


# --- thermometer: the defense ------------------------------------------------------------------


def _thermometer(levels: int = 16, seed: int = 0) -> Thermometer:
    torch.manual_seed(seed)
    model = rl.models.create("smallcnn", in_channels=levels, drop=0.0, **SMALL)
    defense = rl.defenses.create("thermometer", model, levels=levels)
    assert isinstance(defense, Thermometer) and defense.model is model
    return defense.eval()


def test_defense_is_nondifferentiable_and_bpda_recovers_the_soft_gradient() -> None:
    defense = _thermometer(levels=16)
    x, y = make_quadrants(4, seed=5)
    assert nondifferentiable_stages(defense) == ["stage"]
    assert _input_grad(defense, x, y) is None  # the code leaves autograd: no gradient at all
    with bpda(defense):
        grad = _input_grad(defense, x, y)
        with torch.no_grad():
            assert torch.equal(defense(x), defense.model(defense.stage.transform(x)))
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # oracle: J_soft(x)^T dL/dz at z = the exact code
    z = defense.stage.transform(x).requires_grad_(True)
    g_z = torch.autograd.grad(F.cross_entropy(defense.model(z), y, reduction="sum"), z)[0]
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(defense.stage.approximation(xr), xr, grad_outputs=g_z)[0]
    assert torch.allclose(grad, expected, atol=1e-6)
    assert defense.stage.robustlab_bpda is False  # switched back after the block


def test_wrong_channel_count_is_explained() -> None:
    x = torch.rand(2, 1, 16, 16, generator=_gen())
    with pytest.raises(ValueError, match=r"in_channels = C \* levels.*in_channels=16"):
        rl.defenses.create("thermometer", rl.models.create("smallcnn", **SMALL))  # 1 channel
    # a multiple of levels, but not C * levels for these images: found at the first forward
    for channels in (32, 16):
        model = rl.models.create("smallcnn", in_channels=channels, **SMALL)
        images = x if channels == 32 else x.repeat(1, 3, 1, 1)
        with pytest.raises(ValueError, match=r"in_channels = C \* levels") as info:
            Thermometer(model, levels=16)(images)
        assert f"has {images.shape[1] * 16}" in str(info.value)


def test_training_on_the_encoding_learns() -> None:
    x, y = make_quadrants(256, seed=3)
    xv, yv = make_quadrants(128, seed=4)
    defense = _thermometer(levels=16)

    def accuracy() -> float:
        with torch.no_grad():
            return (defense(xv).argmax(1) == yv).float().mean().item()

    before = accuracy()
    weights = copy.deepcopy(defense.model.state_dict())
    history = rl.training.fit(
        defense,
        (x, y),
        epochs=2,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        schedule="constant",
    )
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    defense.eval()
    assert not torch.equal(
        weights["classifier.fc3.weight"], defense.model.state_dict()["classifier.fc3.weight"]
    )
    assert before < 0.5 and accuracy() > 0.9


# --- k-WTA: the activation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "ratio", "k"),
    [((3, 4, 5, 5), 0.1, 10), ((3, 37), 0.2, 7), ((2, 100), 0.001, 1), ((2, 3, 4), 1.0, 12)],
)
def test_kwta_keeps_the_k_largest(shape: tuple[int, ...], ratio: float, k: int) -> None:
    x = torch.randn(shape, generator=_gen(), dtype=torch.float64)  # distinct values
    before = x.clone()
    out = KWTA(ratio)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, before)
    flat, got = x.flatten(1), out.flatten(1)
    assert ((got != 0).sum(1) == k).all()
    top = flat.topk(k, dim=1).indices
    assert torch.equal(got.gather(1, top), flat.gather(1, top))  # the winners keep their value


def test_kwta_hand_values_ties_and_negatives() -> None:
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.5], [-1.0, -2.0, -3.0, -4.0, -5.0]])
    # k = floor(0.4 * 5) = 2; ties with the 2nd largest are kept (reference: x >= topval)
    assert KWTA(0.4)(x).tolist() == [[3.0, 1.0, 1.0, 1.0, 0.0], [-1.0, -2.0, 0.0, 0.0, 0.0]]


def test_kwta_gradient_is_the_keep_mask() -> None:
    x = torch.randn(2, 3, 4, 4, generator=_gen(2)).requires_grad_(True)
    out = KWTA(0.25)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, (out != 0).float())


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_kwta_ratio_is_validated(ratio: object) -> None:
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        KWTA(ratio)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio"):
        rl.defenses.create("k-wta", _relu_net(), ratio=ratio)


def test_kwta_needs_a_batch() -> None:
    with pytest.raises(ValueError, match="k-WTA expects a batch"):
        KWTA()(torch.randn(5))


def test_kwta_activation_builds_and_checkpoints(tmp_path) -> None:
    assert "kwta" in rl.models.activations()
    torch.manual_seed(0)
    model = rl.models.create("smallcnn", activation="kwta", **SMALL).eval()
    kinds = {type(m) for m in model.modules()}
    assert KWTA in kinds and nn.ReLU not in kinds
    assert all(m.ratio == 0.1 for m in model.modules() if isinstance(m, KWTA))
    x = torch.rand(3, 1, 16, 16, generator=_gen())
    path = rl.models.save(model, tmp_path / "kwta.safetensors")
    loaded = rl.models.load(path)
    assert loaded.robustlab_arch["kwargs"]["activation"] == "kwta"
    assert sum(isinstance(m, KWTA) for m in loaded.modules()) == 6
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a converted factory model saves as what it is, or not at all
    converted = rl.defenses.create("k-wta", _relu_net()).net
    assert converted.robustlab_arch["kwargs"]["activation"] == "kwta"
    reloaded = rl.models.load(rl.models.save(converted, tmp_path / "net.safetensors"))
    assert sum(isinstance(m, KWTA) for m in reloaded.modules()) == 6
    with torch.no_grad():
        assert torch.equal(reloaded(x), converted(x))
    with pytest.raises(ValueError, match="no recorded architecture"):
        rl.models.save(KWTADefense(_relu_net(), ratio=0.2).net, tmp_path / "r02.safetensors")


# --- k-WTA: the defense ------------------------------------------------------------------------


def _relu_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return rl.models.create("smallcnn", drop=0.0, **SMALL).eval()


def test_defense_converts_a_copy_and_leaves_the_original() -> None:
    model = _relu_net()
    state = copy.deepcopy(model.state_dict())
    x = torch.rand(4, 1, 16, 16, generator=_gen())
    with torch.no_grad():
        reference = model(x)
    defense = rl.defenses.create("k-wta", model, ratio=0.2)
    assert isinstance(defense, KWTADefense) and defense.model is model
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 6  # original untouched
    assert model.robustlab_arch["kwargs"]["activation"] == "relu"
    assert not any(isinstance(m, nn.ReLU) for m in defense.net.modules())
    assert [m.ratio for m in defense.net.modules() if isinstance(m, KWTA)] == [0.2] * 6
    assert all(k.startswith("net.") for k in defense.state_dict())  # no duplicated weights
    assert sum(p.numel() for p in defense.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
    with torch.no_grad():
        assert torch.equal(defense(x), defense.net(x))
        assert not torch.allclose(defense(x), reference)
        assert torch.equal(model(x), reference)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # mode and dtype changes reach the undefended model too
    defense.train()
    assert model.training and defense.net.training
    defense.double()
    assert next(model.parameters()).dtype == torch.float64
    assert nondifferentiable_stages(defense) == []


def test_defense_refuses_functional_activations() -> None:
    with pytest.raises(ValueError, match="no activation module"):
        rl.defenses.create("k-wta", TinyCNN())  # F.relu in forward


def test_kwta_gradients_are_shattered() -> None:
    """Input gradients of the k-WTA net change direction between x and x + 1e-3 noise far more
    than those of the same ReLU net, and a first-order step predicts its loss badly (the
    discontinuities the audit's gradient checks look for)."""
    x, y = make_quadrants(32, seed=1)
    noise = 1e-3 * torch.randn(x.shape, generator=_gen(3))
    cosine, error = {}, {}
    for seed in range(2):
        relu = _relu_net(seed)
        for name, net in (("relu", relu), ("kwta", KWTADefense(relu).eval())):
            g0 = _input_grad(net, x, y)
            cosine[name, seed] = F.cosine_similarity(
                g0.flatten(1), _input_grad(net, x + noise, y).flatten(1)
            )
            with torch.no_grad():
                change = F.cross_entropy(net(x + noise), y, reduction="none") - F.cross_entropy(
                    net(x), y, reduction="none"
                )
            predicted = (g0 * noise).flatten(1).sum(1)
            error[name, seed] = ((change - predicted).abs() / predicted.abs()).median()
    for seed in range(2):
        assert cosine["relu", seed].mean() > 0.97
        assert cosine["kwta", seed].mean() < cosine["relu", seed].mean() - 0.2
        assert error["relu", seed] < 0.5 and error["kwta", seed] > 10
