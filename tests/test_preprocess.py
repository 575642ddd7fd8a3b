"""Input-transformation defenses (JPEG, bit depth, median) and the feature-squeezing detector:
exact values against Pillow, SciPy and hand computations, the stage contract, the declared
(non-)differentiability, BPDA, and the detector's threshold and rejection output."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

import robustlab.defenses as D
from robustlab.attacks.bpda import bpda, nondifferentiable_stages
from robustlab.defenses.preprocess import (
    BitDepthReduction,
    JPEGCompression,
    MedianSmoothing,
    Preprocessed,
)
from robustlab.defenses.squeeze import FeatureSqueezing, squeezer

STAGES = [
    ("jpeg", {}),
    ("jpeg", {"quality": 30}),
    ("bit-depth", {}),
    ("bit-depth", {"bits": 1}),
    ("median", {}),
    ("median", {"window": 3}),
]


def rand_images(shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def input_grad(f, x, y):
    """d CE(f(x), y) / dx (None where the output does not depend on x in the graph)."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(f(x), y, reduction="sum")
    return torch.autograd.grad(loss, x, allow_unused=True)[0]


class MeanModel(nn.Module):
    """Two classes: logits ``[offset + scale * mean(x), offset]``."""

    def __init__(self, scale: float = 4.0, offset: float = 0.0) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([self.offset + self.scale * m, torch.full_like(m, self.offset)], 1)


# --- the stage contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", STAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_stage_contract(name, options, dtype, channels):
    defense = D.create(name, nn.Identity(), **options)
    assert isinstance(defense, Preprocessed) and isinstance(defense.model, nn.Identity)
    x = rand_images((4, channels, 9, 7), dtype=dtype)
    before = x.clone()
    out = defense.stage(x)
    assert torch.equal(x, before)  # input untouched
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, defense.stage(x))  # deterministic
    assert not type(defense.stage).robustlab_random


def test_registered_with_validated_options():
    for name in ("jpeg", "bit-depth", "median", "feature-squeezing"):
        assert name in D.names()
    with pytest.raises(TypeError, match="options are: quality"):
        D.create("jpeg", nn.Identity(), bits=3)
    with pytest.raises(TypeError, match="model must be"):
        D.create("median", lambda x: x)


@pytest.mark.parametrize(
    "make,bad,error",
    [
        (JPEGCompression, 0, ValueError),
        (JPEGCompression, 101, ValueError),
        (JPEGCompression, 75.0, TypeError),
        (JPEGCompression, True, TypeError),
        (JPEGCompression, "75", TypeError),
        (BitDepthReduction, 0, ValueError),
        (BitDepthReduction, 9, ValueError),
        (BitDepthReduction, 2.5, TypeError),
        (MedianSmoothing, 0, ValueError),
        (MedianSmoothing, -2, ValueError),
        (MedianSmoothing, 2.0, TypeError),
    ],
)
def test_option_validation(make, bad, error):
    with pytest.raises(error, match=repr(bad) if error is TypeError else str(bad)):
        make(bad)


def test_stages_reject_non_images():
    for stage in (JPEGCompression(), BitDepthReduction(), MedianSmoothing()):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            stage(torch.rand(3, 4, 4))
        with pytest.raises(ValueError, match="float images"):
            stage(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


# --- JPEG ------------------------------------------------------------------------------------
def pillow_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in (x * 255).round().to(torch.uint8).numpy():
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        dec = np.array(Image.open(io.BytesIO(buf.getvalue())))
        out.append(dec[None] if dec.ndim == 2 else dec.transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32) / 255


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("quality", [75, 20])
def test_jpeg_equals_pillow_round_trip(channels, quality):
    x = rand_images((3, channels, 16, 12), seed=channels)
    out = JPEGCompression(quality)(x)
    assert torch.equal(out, pillow_round_trip(x, quality))
    assert (out - x).abs().max() > 0.05  # noise is not preserved


def test_jpeg_keeps_constant_images_and_quality_matters():
    for value in ((100,), (200, 50, 120)):
        x = (torch.tensor(value, dtype=torch.float32) / 255).view(1, -1, 1, 1).expand(2, -1, 16, 16)
        assert (JPEGCompression(75)(x) - x).abs().max() <= 1 / 255 + 1e-6
    x = rand_images((8, 1, 16, 16), seed=3)
    err = [float((JPEGCompression(q)(x) - x).abs().mean()) for q in (10, 50, 95)]
    assert err[0] > err[1] > err[2]


def test_jpeg_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="got 2 channels"):
        JPEGCompression()(torch.rand(1, 2, 8, 8))


def test_jpeg_batch_cost():
    x = rand_images((256, 1, 16, 16))
    JPEGCompression()(x[:1])  # import Pillow's plugins
    start = time.perf_counter()
    JPEGCompression()(x)
    assert time.perf_counter() - start < 1.0


# --- bit depth --------------------------------------------------------------------------------
def test_bit_depth_hand_values():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, -0.2, 1.3]).view(1, 1, 1, -1)
    assert BitDepthReduction(1)(x).flatten().tolist() == [0, 0, 0, 1, 1, 0, 1]  # 0.5: to even
    x = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(1, 1, 1, 3)
    assert torch.allclose(
        BitDepthReduction(2)(x).flatten(),
        torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64),
        atol=0,
    )
    assert BitDepthReduction().bits == 5
    assert float(BitDepthReduction()(torch.full((1, 1, 1, 1), 0.5))) == pytest.approx(16 / 31)
    levels = BitDepthReduction(3)(rand_images((2, 3, 8, 8))).mul(7)
    assert torch.allclose(levels, levels.round(), atol=1e-5)  # on the 8-level grid


# --- median -----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 1, 2, 3)])
def test_median_equals_scipy(window, shape):
    x = rand_images(shape, seed=window, dtype=torch.float64)
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, window, window), mode="reflect")
    assert np.array_equal(MedianSmoothing(window)(x).numpy(), expected)


def test_median_wide_window_reflects_like_scipy():
    x = rand_images((1, 1, 3, 4), seed=5, dtype=torch.float64)  # padding wider than the image
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, 6, 6), mode="reflect")
    assert np.array_equal(MedianSmoothing(6)(x).numpy(), expected)


def test_median_hand_values():
    # 2 x 2 windows reach up/left; the border repeats (half-sample reflection); of 4 values the
    # upper middle one is taken: (0,1): {.2,.6,.2,.6} -> .6; (1,1): {.2,.6,.7,.4} -> .6
    x = torch.tensor([[0.2, 0.6], [0.7, 0.4]]).view(1, 1, 2, 2)
    assert torch.equal(
        MedianSmoothing(2)(x), torch.tensor([[0.2, 0.6], [0.7, 0.6]]).view(1, 1, 2, 2)
    )


# --- (non-)differentiability and BPDA ----------------------------------------------------------
@pytest.mark.parametrize("name", ["jpeg", "bit-depth"])
def test_nondifferentiable_stages_recover_gradients_under_bpda(name, toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    defense = D.create(name, toy_model)
    assert nondifferentiable_stages(defense) == ["stage"]
    g = input_grad(defense, x, y)
    assert g is None or torch.count_nonzero(g) == 0  # no usable gradient
    with bpda(defense):
        g = input_grad(defense, x, y)
        assert torch.equal(defense(x), toy_model(defense.stage(x)))  # value unchanged
    assert not defense.stage.robustlab_bpda  # switched back
    expected = input_grad(toy_model, defense.stage(x), y)  # identity BPDA
    assert torch.count_nonzero(g) > 0 and torch.allclose(g, expected)


def test_median_gradients_are_sparse_but_real(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    defense = D.create("median", toy_model)
    assert nondifferentiable_stages(defense) == []
    g = input_grad(defense, x, y)
    assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0
    xr = x.clone().requires_grad_(True)  # each output picks one input
    (selected,) = torch.autograd.grad(MedianSmoothing(3)(xr).sum(), xr)
    assert float(selected.sum()) == x.numel()
    assert torch.equal(selected, selected.round()) and float(selected.min()) >= 0


# --- feature squeezing -------------------------------------------------------------------------
def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def test_score_by_hand():
    x = torch.tensor([[0.2, 0.6], [0.7, 0.4]]).view(1, 1, 2, 2)
    fs = FeatureSqueezing(MeanModel(scale=4.0), ("bit-depth:1", "median:2"), threshold=0.0)
    # means: x 0.475, bit-depth [[0,1],[1,0]] 0.5, median [[.2,.6],[.7,.6]] 0.525; the
    # two-class L1 distance is 2 |sigmoid(a) - sigmoid(b)|
    bit, med = (2 * abs(sigmoid(1.9) - sigmoid(s)) for s in (2.0, 2.1))
    assert float(fs.score(x)) == pytest.approx(max(bit, med), rel=1e-5)
    only_bits = FeatureSqueezing(MeanModel(scale=4.0), "bit-depth:1", threshold=0.0)
    assert float(only_bits.score(x)) == pytest.approx(bit, rel=1e-5)


def test_fit_sets_the_fpr_quantile(toy_model, toy_data):
    x = toy_data[0]
    fs = FeatureSqueezing(toy_model, fpr=0.05)
    assert fs.fit(x, batch_size=100) is fs
    scores = torch.cat([fs.score(x[i : i + 100]) for i in range(0, 256, 100)]).detach()
    assert fs.threshold == float(scores.sort().values[243])  # ceil(256 * 0.95) = 244th
    assert fs.fit_samples == 256 and fs.fpr == 0.05
    flagged = sum(int(fs.detect(x[i : i + 100]).sum()) for i in range(0, 256, 100))
    assert flagged <= 12 and flagged == int((scores > fs.threshold).sum())
    if len(scores.unique()) == len(scores):
        assert flagged == 12  # floor(256 * 0.05)
    assert fs.config()["squeezers"] == ["bit-depth:1", "median:2"]


def test_forward_rejects_exactly_when_detected(toy_model, toy_data):
    x = toy_data[0][:64]
    noisy = (x + 0.3 * rand_images(x.shape, seed=7) - 0.15).clamp(0, 1)
    fs = FeatureSqueezing(toy_model).fit(x)
    both = torch.cat([x, noisy])
    out = fs(both)
    assert out.shape == (128, 5)
    assert torch.equal(out[:, :4], toy_model(both))  # the classifier is unchanged
    fired = fs.detect(both)
    assert 0 < int(fired.sum()) < 128
    assert torch.equal(out.argmax(1) == 4, fired)


def test_rejection_survives_rounding_against_large_logits():
    x = torch.tensor([[0.2, 0.6], [0.7, 0.4]]).view(1, 1, 2, 2)
    model = MeanModel(scale=4.0, offset=1000.0)  # ulp(1000) >> ulp(score)
    score = FeatureSqueezing(model, threshold=0.0).score(x)
    below = float(torch.nextafter(score, torch.zeros_like(score)))
    fs = FeatureSqueezing(model, threshold=below)
    assert bool(fs.detect(x)) and int(fs(x).argmax(1)) == 2
    assert int(FeatureSqueezing(model, threshold=float(score))(x).argmax(1)) == 0


def test_threshold_needed_before_use(toy_model, toy_data):
    fs = D.create("feature-squeezing", toy_model)
    for call in (fs, fs.detect):
        with pytest.raises(ValueError, match=r"\.fit\(x_train, y_train\).*threshold="):
            call(toy_data[0][:2])
    assert fs.score(toy_data[0][:2]).shape == (2,)


def test_gradients_under_bpda(toy_model, toy_data):
    x = toy_data[0][:8]
    fs = FeatureSqueezing(toy_model, ("bit-depth:1",), threshold=0.1)
    assert fs.robustlab_reject and getattr(fs, "robustlab_differentiable", True)
    assert nondifferentiable_stages(fs) == ["squeezers.0"]
    xr = x.clone().requires_grad_(True)
    with bpda(fs):
        out = fs(xr)
        (g,) = torch.autograd.grad(out[:, -1].sum(), xr)
    assert torch.equal(out.detach(), fs(x))
    # the same score with the squeezer written as a straight-through identity by hand
    xm = x.clone().requires_grad_(True)
    squeezed = xm + (BitDepthReduction(1)(x) - xm).detach()
    logits = toy_model(xm)
    dist = (logits.softmax(1) - toy_model(squeezed).softmax(1)).abs().sum(1)
    (expected,) = torch.autograd.grad((logits.amax(1) + dist).sum(), xm)
    assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0
    assert torch.allclose(g, expected, atol=1e-6)


def test_feature_squeezing_options():
    model = nn.Identity()
    fs = D.create("feature-squeezing", model, squeezers="bit-depth:5, median:3", threshold=1.5)
    assert [type(s) for s in fs.squeezers] == [BitDepthReduction, MedianSmoothing]
    assert (fs.squeezers[0].bits, fs.squeezers[1].window) == (5, 3)
    assert fs.config()["threshold"] == 1.5 and fs.config()["fit_samples"] is None
    assert isinstance(squeezer(JPEGCompression(50)), JPEGCompression)
    for bad in ("blur:3", "median", "median:x", "bit-depth:0"):
        with pytest.raises(ValueError, match="squeezer|bits"):
            FeatureSqueezing(model, (bad,))
    with pytest.raises(ValueError, match="empty"):
        FeatureSqueezing(model, ())
    with pytest.raises(TypeError, match="squeezer"):
        FeatureSqueezing(model, (3,))
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="fpr"):
            FeatureSqueezing(model, fpr=bad)
    for bad in (math.nan, -0.1, math.inf, "1"):
        with pytest.raises(ValueError, match="threshold"):
            FeatureSqueezing(model, threshold=bad)
