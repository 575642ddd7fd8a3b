"""Randomised input transformations (TV minimisation, crop-rescale, random resize-pad) and
Mixup Inference: the stage contract, declared randomness and (non-)differentiability, option
checks, and exact values against hand computations and PyTorch's own resizing."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab.defenses as D
from helpers import make_quadrants
from robustlab.attacks.bpda import bpda, nondifferentiable_stages
from robustlab.defenses.crop_rescale import CropRescale
from robustlab.defenses.mixup import MixupInference
from robustlab.defenses.preprocess import Preprocessed
from robustlab.defenses.resize_pad import RandomResizePad
from robustlab.defenses.tv_min import (
    TVMin,
    _divergence,
    _forward_diff,
    total_variation,
    tv_minimize,
)

STAGES = [
    ("tv-min", {}),
    ("tv-min", {"drop_rate": 0.2, "lambda_tv": 0.1}),
    ("crop-rescale", {}),
    ("crop-rescale", {"ratio": 0.6}),
    ("random-resize-pad", {}),
    ("random-resize-pad", {"pad_value": 0.5}),
]
NAMES = ["tv-min", "crop-rescale", "random-resize-pad"]


def rand_images(shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def input_grad(f, x, y):
    """d CE(f(x), y) / dx (None where the output does not depend on x in the graph)."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(f(x), y, reduction="sum")
    return torch.autograd.grad(loss, x, allow_unused=True)[0]


# --- the stage contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", STAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_stage_contract(name, options, dtype, channels):
    defense = D.create(name, nn.Identity(), **options)
    assert isinstance(defense, Preprocessed) and isinstance(defense.model, nn.Identity)
    x = rand_images((4, channels, 24, 20), dtype=dtype)  # room for many distinct draws
    before = x.clone()
    out = defense.stage(x)
    assert torch.equal(x, before)  # input untouched
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert type(defense.stage).robustlab_random  # declared random ...
    assert not torch.equal(out, defense.stage(x))  # ... and it is
    defense.stage.generator = seeded(7)
    first = defense.stage(x)
    defense.stage.generator = seeded(7)
    assert torch.equal(first, defense.stage(x))  # same seed, same draws
    defense.stage.generator = seeded(8)
    assert not torch.equal(first, defense.stage(x))


@pytest.mark.parametrize("name", NAMES)
def test_defense_output_and_config(name, toy_data, toy_model):
    x = toy_data[0][:32]
    defense = D.create(name, toy_model, generator=seeded(0))
    out = defense(x)
    assert out.shape == (32, 4) and torch.isfinite(out).all()
    cfg = defense.config()
    assert cfg["name"] == name and json.loads(json.dumps(cfg)) == cfg


def test_mild_settings_keep_the_toy_accuracy(toy_data, toy_model):
    x, y = toy_data
    for name, options in (
        ("tv-min", {}),
        ("crop-rescale", {"ratio": 0.75, "samples": 4}),
        ("random-resize-pad", {}),
    ):
        defense = D.create(name, toy_model, generator=seeded(1), **options)
        with torch.no_grad():
            acc = (defense(x).argmax(1) == y).float().mean()
        assert acc >= 0.95, (name, float(acc))


# --- option checks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,options,error",
    [
        (TVMin, {"drop_rate": 1.0}, ValueError),
        (TVMin, {"drop_rate": -0.1}, ValueError),
        (TVMin, {"drop_rate": "0.5"}, TypeError),
        (TVMin, {"lambda_tv": 0}, ValueError),
        (TVMin, {"lambda_tv": math.nan}, ValueError),
        (TVMin, {"lambda_tv": math.inf}, ValueError),
        (TVMin, {"max_iter": 0}, ValueError),
        (TVMin, {"max_iter": 2.5}, TypeError),
        (TVMin, {"tol": -1e-3}, ValueError),
        (TVMin, {"drop_rate": True}, TypeError),
        (CropRescale, {"ratio": 0}, ValueError),
        (CropRescale, {"ratio": 1.5}, ValueError),
        (CropRescale, {"ratio": None}, TypeError),
        (RandomResizePad, {"min_ratio": 0.0}, ValueError),
        (RandomResizePad, {"min_ratio": 1.01}, ValueError),
        (RandomResizePad, {"pad_value": 2}, ValueError),
    ],
)
def test_stage_option_validation(make, options, error):
    ((key, bad),) = options.items()
    with pytest.raises(error, match=key):
        make(**options)


def test_defense_option_validation():
    for name in ("crop-rescale", "random-resize-pad"):
        with pytest.raises(ValueError, match="samples"):
            D.create(name, nn.Identity(), samples=0)
        with pytest.raises(TypeError, match="samples"):
            D.create(name, nn.Identity(), samples=2.0)
    for name in NAMES:
        with pytest.raises(TypeError, match="generator"):
            D.create(name, nn.Identity(), generator=0)
    with pytest.raises(TypeError, match="options are: drop_rate, lambda_tv"):
        D.create("tv-min", nn.Identity(), quality=3)


def test_tv_minimize_validates_its_arguments():
    x = rand_images((1, 1, 4, 4))
    with pytest.raises(ValueError, match="lambda_tv"):
        tv_minimize(x, torch.ones_like(x), lambda_tv=0.0)
    with pytest.raises(TypeError, match="max_iter"):
        tv_minimize(x, torch.ones_like(x), max_iter=10.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        tv_minimize(x[0], torch.ones_like(x[0]))


def test_stages_reject_non_images():
    for stage in (TVMin(), CropRescale(), RandomResizePad()):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            stage(torch.rand(3, 4, 4))
        with pytest.raises(ValueError, match="float images"):
            stage(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="height >= 2"):
        RandomResizePad()(torch.rand(2, 1, 1, 5))


# --- total-variation minimisation --------------------------------------------------------------
def test_divergence_is_the_negative_adjoint_of_the_gradient():
    z = rand_images((2, 3, 5, 7), seed=1, dtype=torch.float64)
    ph, pv = (
        rand_images((2, 3, 5, 7), 2, torch.float64),
        rand_images((2, 3, 5, 7), 3, torch.float64),
    )
    gh, gv = _forward_diff(z)
    assert torch.allclose((gh * ph + gv * pv).sum(), -(z * _divergence(ph, pv)).sum())


def test_total_variation_by_hand():
    z = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # differences: (0,0): h 1, v 0 -> 1; (0,1): h 0, v -1 -> 1; (1,0): h 0 -> 0; (1,1): 0
    assert total_variation(z).item() == pytest.approx(2.0)
    z = torch.tensor([[0.0, 3.0], [4.0, 0.0]]).view(1, 1, 2, 2)
    assert total_variation(z).item() == pytest.approx(5.0 + 3.0 + 4.0)


@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_tv_minimize_shrinks_a_step_by_lambda_over_4(lam):
    # 1 x 4 image [0, 0, 1, 1]: min 2a^2 + 2(1-b)^2 + lam (b - a) gives a = lam/4, b = 1 - lam/4
    x = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 4)
    z = tv_minimize(x, torch.ones_like(x), lam, max_iter=5000, tol=0)
    a = lam / 4
    assert torch.allclose(
        z.flatten(), torch.tensor([a, a, 1 - a, 1 - a], dtype=torch.float64), atol=1e-6
    )


def test_tv_minimize_reaches_the_minimum():
    x = rand_images((3, 2, 8, 8), seed=4, dtype=torch.float64)
    keep = rand_images((3, 1, 8, 8), seed=5) >= 0.5
    lam = 0.1

    def objective(z):
        return (keep * (z - x)).square().sum((-2, -1)) + lam * total_variation(z)

    z = tv_minimize(x, keep, lam, max_iter=3000, tol=0)
    base = objective(z)
    g = seeded(6)
    for scale in (1e-2, 1e-3):  # a convex function: no descent direction
        for _ in range(50):
            d = torch.randn(x.shape, generator=g, dtype=torch.float64) * scale
            assert (objective(z + d) >= base - 1e-9).all()
    assert (base < objective(x)).all()


def test_tv_min_with_no_drop_and_tiny_lambda_is_the_identity():
    x = rand_images((4, 3, 12, 12), seed=2)
    out = TVMin(drop_rate=0.0, lambda_tv=1e-6)(x)
    assert (out - x).abs().max() < 1e-3


def test_tv_min_keeps_the_kept_pixels_and_drops_whole_pixels():
    x = rand_images((8, 3, 12, 12), seed=3)
    stage = TVMin(drop_rate=0.5, lambda_tv=1e-6)
    stage.generator = seeded(4)
    out = stage(x)
    keep = torch.rand((8, 1, 12, 12), generator=seeded(4)) >= 0.5  # the stage's first draw
    assert 0.4 < keep.float().mean() < 0.6
    assert ((out - x).abs() * keep).max() < 1e-3  # kept pixels stay
    moved = ((out - x).abs() > 1e-2) & ~keep  # dropped ones are rebuilt
    assert moved.float().sum() > 0.5 * (~keep).expand_as(x).float().sum()


def test_tv_min_with_strong_lambda_flattens_each_channel():
    x, _ = make_quadrants(4, seed=7)
    x = torch.cat([x, 1 - x, x.flip(-1)], 1)  # 3 different channels
    out = TVMin(drop_rate=0.0, lambda_tv=10.0, max_iter=3000, tol=0)(x)
    flat = out.flatten(2)
    assert (flat.amax(2) - flat.amin(2)).max() < 0.02  # constant per channel ...
    assert torch.allclose(flat.mean(2), x.flatten(2).mean(2), atol=0.01)  # ... at the mean
    assert (total_variation(out) < 0.05 * total_variation(x)).all()


def test_tv_min_default_lowers_total_variation():
    x = rand_images((6, 3, 16, 16), seed=8)
    assert (total_variation(TVMin()(x)) < 0.7 * total_variation(x)).all()  # about 0.5


def test_tv_min_batch_cost():
    x = rand_images((64, 1, 28, 28), seed=9)
    stage = TVMin()
    stage(x[:2])
    start = time.perf_counter()
    stage(x)
    assert time.perf_counter() - start < 1.0  # about 30 ms on one core


def test_tv_min_has_no_gradient_until_bpda(toy_data, toy_model):
    x, y = toy_data[0][:8], toy_data[1][:8]
    defense = D.create("tv-min", toy_model)
    assert nondifferentiable_stages(defense) == ["stage"]
    assert input_grad(defense, x, y) is None  # the solve leaves autograd
    defense.stage.generator = seeded(3)
    with bpda(defense):
        g = input_grad(defense, x, y)
    assert defense.stage.robustlab_bpda is False  # restored after the block
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()
    defense.stage.generator = seeded(3)
    with torch.no_grad():
        z = defense.stage(x)  # the same draw
    assert torch.allclose(g, input_grad(toy_model, z, y), atol=1e-6)  # identity backward


# --- crop-rescale ------------------------------------------------------------------------------
def test_crop_rescale_with_ratio_one_is_the_identity():
    x = rand_images((3, 3, 9, 7), seed=1)
    assert torch.equal(CropRescale(ratio=1.0)(x), x)


def test_crop_rescale_is_a_bilinear_rescale_of_a_crop_at_every_position():
    h, w, ch, cw = 7, 6, 4, 3  # ratio 0.55: round(3.85), round(3.3)
    x = rand_images((1, 2, h, w), seed=2)
    candidates = {
        (t, le): F.interpolate(
            x[..., t : t + ch, le : le + cw], size=(h, w), mode="bilinear", align_corners=False
        )
        for t in range(h - ch + 1)
        for le in range(w - cw + 1)
    }
    stage = CropRescale(ratio=0.55)
    stage.generator = seeded(3)
    seen = set()
    for _ in range(300):
        out = stage(x)
        match = [k for k, c in candidates.items() if torch.allclose(out, c, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(candidates)  # every offset, ends included


def test_crop_rescale_draws_per_image_and_is_differentiable(toy_data, toy_model):
    x = toy_data[0][:1].expand(16, -1, -1, -1)
    out = CropRescale(ratio=0.5)(x)
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) > 4
    defense = D.create("crop-rescale", toy_model, ratio=0.75)
    assert nondifferentiable_stages(defense) == []
    g = input_grad(defense, toy_data[0][:8], toy_data[1][:8])
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", ["crop-rescale", "random-resize-pad"])
def test_samples_average_softmax_over_draws(name, toy_data, toy_model):
    x, y = toy_data[0][:8], toy_data[1][:8]
    defense = D.create(name, toy_model, samples=4, generator=seeded(5))
    out = defense(x)
    assert torch.allclose(out.exp().sum(1), torch.ones(8), atol=1e-5)
    defense.stage.generator = seeded(5)
    with torch.no_grad():
        mean = sum(F.softmax(toy_model(defense.stage(x)), 1) for _ in range(4)) / 4
    assert torch.allclose(out, mean.log(), atol=1e-5)
    g = input_grad(defense, x, y)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()
    one = D.create(name, toy_model, generator=seeded(5))
    assert not torch.allclose(one(x).exp().sum(1), torch.ones(8))  # samples=1: raw logits


# --- random resize and pad ---------------------------------------------------------------------
def boxes(out):
    """(r_h, r_w, top, left) of the non-zero box of each image of a resized all-ones batch."""
    found = []
    for img in out[:, 0]:
        rows, cols = img.sum(1).nonzero().flatten(), img.sum(0).nonzero().flatten()
        found.append((len(rows), len(cols), int(rows[0]), int(cols[0])))
    return found


@pytest.mark.parametrize("size,allowed", [(28, {25, 26, 27}), (16, {14, 15}), (32, {29, 30, 31})])
def test_resize_pad_keeps_the_mass_of_a_box_of_ones(size, allowed):
    stage = RandomResizePad()
    stage.generator = seeded(1)
    ones = torch.ones(400, 2, size, size)
    out = stage(ones)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    seen_r, seen_top = set(), set()
    for (rh, rw, top, left), img in zip(boxes(out), out, strict=True):
        assert rh == rw and rh in allowed
        assert img.sum() == 2 * rh * rw  # mass r^2 per channel
        assert img[:, top : top + rh, left : left + rw].eq(1).all()  # a full box in a zero border
        assert 0 <= top <= size - rh and 0 <= left <= size - rw
        seen_r.add(rh)
        seen_top.add((rh, top))
    assert seen_r == allowed
    assert {(r, 0) for r in allowed} <= seen_top  # both extreme offsets occur
    assert {(r, size - r) for r in allowed} <= seen_top


def test_resize_pad_is_nearest_resizing_at_the_offset():
    x = rand_images((50, 3, 30, 20), seed=2)
    stage = RandomResizePad(pad_value=0.25)
    stage.generator = seeded(3)
    out = stage(x)
    stage.generator = seeded(3)  # same draws on a ones batch
    found = boxes(stage(torch.ones_like(x)) - 0.25)
    for i, (rh, rw, top, left) in enumerate(found):
        assert rh in {27, 28, 29} and rw == round(rh * 20 / 30)  # round(30 * 299/331) = 27
        inner = F.interpolate(x[i : i + 1], size=(rh, rw), mode="nearest")[0]
        expect = torch.full_like(x[i], 0.25)
        expect[:, top : top + rh, left : left + rw] = inner
        assert torch.equal(out[i], expect)


def test_resize_pad_gradient_reaches_the_copied_pixels(toy_data, toy_model):
    x, y = toy_data[0][:8], toy_data[1][:8]
    defense = D.create("random-resize-pad", toy_model)
    assert nondifferentiable_stages(defense) == []
    g = input_grad(defense, x, y)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()


# --- Mixup Inference ---------------------------------------------------------------------------
class Recorder(nn.Module):
    """Predicts class ``pred`` for all-zero images; records every input it sees."""

    def __init__(self, pred: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.pred, self.classes, self.seen = pred, classes, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.pred] = 1.0
        return logits


def scripted_pool(classes=(0, 1, 2, 3), per_class=2):
    """Constant 2x2 images; image j of class k has value (10 k + j + 1) / 100."""
    xs, ys = [], []
    for k in classes:
        for j in range(per_class):
            xs.append(torch.full((1, 2, 2), (10 * k + j + 1) / 100))
            ys.append(k)
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("mode,expected", [("ol", {0, 1, 3}), ("pl", {2})])
def test_mixup_partners_by_mode(mode, expected):
    pool_x, pool_y = scripted_pool()
    model = Recorder(pred=2)
    mi = MixupInference(
        model, mode=mode, lam=0.5, samples=200, pool_x=pool_x, pool_y=pool_y, generator=seeded(0)
    )
    mi(torch.zeros(3, 1, 2, 2))
    assert len(model.seen) == 1 + 200
    values = torch.cat(model.seen[1:]).flatten() * 2 * 100  # mix = 0.5 * 0 + 0.5 * x_s
    codes = values.round().long().unique().tolist()
    assert {c // 10 for c in codes} == expected  # never the predicted class
    assert {c % 10 for c in codes} == {1, 2}  # both images of each class


def test_mixup_ol_draws_other_classes_uniformly():
    pool_x, pool_y = scripted_pool(classes=(0, 1, 3, 4), per_class=3)  # class 2: no images
    mi = MixupInference(
        nn.Identity(), pool_x=pool_x, pool_y=pool_y, samples=400, generator=seeded(1)
    )
    pred = torch.tensor([0, 1, 2, 3, 4, 7])
    cls = pool_y[mi.partners(pred)]
    for i, p in enumerate(pred.tolist()):
        allowed = {0, 1, 3, 4} - {p}
        assert set(cls[i].tolist()) == allowed
        counts = torch.bincount(cls[i], minlength=5)[sorted(allowed)].float()
        expected = 400 / len(allowed)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 20  # p < 1e-3 even at 4 classes


def test_mixup_with_lam_one_is_the_model_log_softmax(toy_data, toy_model):
    x, y = toy_data
    mi = D.create("mixup-inference", toy_model, lam=1.0, samples=3, pool_x=x[100:], pool_y=y[100:])
    assert isinstance(mi, MixupInference) and not mi.robustlab_random
    with torch.no_grad():
        assert torch.allclose(mi(x[:20]), F.log_softmax(toy_model(x[:20]), 1), atol=1e-5)


def test_mixup_contract(toy_data, toy_model):
    x, y = toy_data
    pool_x, pool_y = make_quadrants(64, seed=11)
    mi = MixupInference(toy_model, samples=5).fit(pool_x, pool_y)
    assert mi.robustlab_random and type(mi).robustlab_random
    xb = x[:16].clone()
    before = xb.clone()
    out = mi(xb)
    assert torch.equal(xb, before)
    assert out.shape == (16, 4) and torch.allclose(out.exp().sum(1), torch.ones(16), atol=1e-5)
    assert not torch.equal(out, mi(xb))  # fresh partners each call
    mi.generator = seeded(2)
    first = mi(xb)
    mi.generator = seeded(2)
    assert torch.equal(first, mi(xb))
    g = input_grad(mi, xb, y[:16])
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()
    cfg = mi.config()
    assert cfg == {
        "name": "mixup-inference",
        "mode": "ol",
        "lam": 0.5,
        "samples": 5,
        "pool_size": 64,
    }
    mi_ol = MixupInference(toy_model, lam=0.6, samples=10, pool_x=pool_x, pool_y=pool_y)
    with torch.no_grad():
        assert (mi_ol(x).argmax(1) == y).float().mean() > 0.95


def test_mixup_errors(toy_model):
    pool_x, pool_y = scripted_pool()
    with pytest.raises(ValueError, match=r"fit\(x, y\)"):
        MixupInference(toy_model)(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        MixupInference(toy_model, mode="combined")
    for bad in (0, 1.5, math.nan):
        with pytest.raises(ValueError, match="lam"):
            MixupInference(toy_model, lam=bad)
    with pytest.raises(TypeError, match="lam"):
        MixupInference(toy_model, lam="0.5")
    with pytest.raises(ValueError, match="samples"):
        MixupInference(toy_model, samples=0)
    with pytest.raises(TypeError, match="samples"):
        MixupInference(toy_model, samples=3.0)
    with pytest.raises(TypeError, match="generator"):
        MixupInference(toy_model, generator=1)
    with pytest.raises(ValueError, match="together"):
        MixupInference(toy_model, pool_x=pool_x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MixupInference(toy_model).fit(pool_x + 1, pool_y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MixupInference(toy_model).fit(pool_x, torch.zeros(len(pool_x), dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        MixupInference(toy_model).fit(pool_x, pool_y.float())
    mi = MixupInference(Recorder(pred=4), mode="pl", pool_x=pool_x, pool_y=pool_y)
    with pytest.raises(ValueError, match="no image of class 4"):
        mi(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="do not match the pool"):
        mi(torch.zeros(2, 1, 3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_with_cpu_and_cuda_generators():
    x = rand_images((4, 3, 16, 16)).cuda()
    for name in NAMES:
        stage = D.create(name, nn.Identity()).stage
        for gen in (None, torch.Generator(), torch.Generator("cuda")):
            stage.generator = None if gen is None else gen.manual_seed(0)
            out = stage(x)
            assert out.device == x.device and out.shape == x.shape
    pool_x, pool_y = scripted_pool()
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5)).cuda()
    for gen in (None, torch.Generator(), torch.Generator("cuda")):
        mi = MixupInference(
            model, samples=3, pool_x=pool_x.cuda(), pool_y=pool_y.cuda(), generator=gen
        )
        assert mi(torch.rand(2, 1, 2, 2, device="cuda")).shape == (2, 5)
