"""Trapdoor detection (Shan et al., CCS 2020) against its definition: the triggers (a union of
squares at value mask_ratio, clipped normal patterns with mu, s ~ U(0, 1)), the injection
objective, the signature and the cosine score computed by hand with NumPy, and a toy model
trained with the objective whose trapdoors work and whose detector flags targeted PGD."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from scipy.special import ndtr
from torch import nn

import robustlab as rl
from helpers import make_quadrants
from robustlab.attacks.pgd import PGD
from robustlab.defenses.trapdoor import UNPROTECTED, TrapdoorDetector
from robustlab.models.trapdoor import Trapdoors

# --- the triggers -------------------------------------------------------------------------


def _opening(support: torch.Tensor, size: int) -> torch.Tensor:
    """The union of the size x size squares that lie inside ``support`` (K, 1, H, W)."""
    ones = torch.ones(1, 1, size, size)
    inside = F.conv2d(support.float(), ones) == size * size
    return F.conv_transpose2d(inside.float(), ones) > 0


@pytest.mark.parametrize(
    "c, h, w, k, squares, size, ratio, seed",
    [(1, 16, 16, 4, 7, 3, 0.1, 0), (3, 12, 10, 5, 4, 2, 0.25, 3)],
)
def test_masks_are_unions_of_squares_at_mask_ratio(c, h, w, k, squares, size, ratio, seed):
    t = Trapdoors(c, h, w, k, squares=squares, size=size, mask_ratio=ratio, seed=seed)
    assert t.masks.shape == (k, 1, h, w) and t.patterns.shape == (k, c, h, w)
    on = t.masks > 0
    assert torch.equal(t.masks[on], torch.full_like(t.masks[on], ratio))  # exactly the ratio
    assert torch.equal(_opening(on, size), on)  # every pixel lies on a whole square inside
    counts = on.sum((1, 2, 3))
    assert (counts >= size * size).all() and (counts <= squares * size * size).all()
    assert (t.patterns[~on.expand_as(t.patterns)] == 0).all()
    assert t.patterns.min() >= 0 and t.patterns.max() <= 1
    assert len(t.patterns[on.expand_as(t.patterns)].unique()) > 10  # random, not a colour
    if c > 1:  # mu and s are drawn per channel
        assert not torch.equal(t.patterns[:, 0], t.patterns[:, 1])


def test_triggers_are_determined_by_seed_and_shape():
    a, b = Trapdoors(1, 8, 8, 5, seed=1), Trapdoors(1, 8, 8, 5, seed=1)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.patterns, b.patterns)
    assert not torch.equal(a.masks, Trapdoors(1, 8, 8, 5, seed=2).masks)
    few = Trapdoors(1, 8, 8, 3, seed=1)  # label t's trigger does not depend on the label count
    assert torch.equal(few.masks, a.masks[:3]) and torch.equal(few.patterns, a.patterns[:3])
    assert torch.equal(Trapdoors(**a.config()).patterns, a.patterns)
    state = torch.get_rng_state()
    Trapdoors(3, 8, 8, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched


def _p_zero() -> float:
    """P(clip(N(mu, s^2), 0, 1) == 0) with mu, s ~ U(0, 1): E[Phi(-mu / s)]."""
    return integrate.dblquad(lambda s, mu: ndtr(-mu / s), 0, 1, 0, 1)[0]


def _p_one() -> float:
    """P(clip(N(mu, s^2), 0, 1) == 1) = E[Phi((mu - 1) / s)]."""
    return integrate.dblquad(lambda s, mu: ndtr((mu - 1) / s), 0, 1, 0, 1)[0]


def test_pattern_pixels_follow_the_clipped_normal_with_uniform_mu_and_s():
    """On 1 x 1 images, a 1 x 1 square per trigger: one pixel per label, 4000 labels; the
    fraction clipped to 0 and to 1 match the integrals of the definition. Two squares on the
    one pixel add their clipped values: zero only when both are zero."""
    one = Trapdoors(1, 1, 1, 4000, squares=1, size=1, seed=0).patterns.flatten()
    p0, p1 = _p_zero(), _p_one()
    assert abs(float((one == 0).float().mean()) - p0) < 0.025
    assert abs(float((one == 1).float().mean()) - p1) < 0.025
    two = Trapdoors(1, 1, 1, 4000, squares=2, size=1, seed=0).patterns.flatten()
    assert abs(float((two == 0).float().mean()) - p0**2) < 0.025


def test_stamp_is_the_blend_formula():
    t = Trapdoors(3, 6, 5, 4, squares=3, size=2, mask_ratio=0.3, seed=2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    before = x.clone()
    out = t.stamp(x, labels)
    m, p = t.masks.double().numpy(), t.patterns.double().numpy()
    want = np.stack([(1 - m[k]) * x[i].numpy() + m[k] * p[k] for i, k in enumerate(labels)])
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-12)
    assert out.dtype == torch.float64 and torch.equal(x, before)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(t.stamp(xg, labels).sum(), xg)
    np.testing.assert_allclose(grad.numpy(), np.broadcast_to(1 - m[labels], x.shape))
    with pytest.raises(ValueError, match=r"images of shape \(N, 3, 6, 5\)"):
        t.stamp(x[:, :1], labels)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        t.stamp(x, labels + 1)
    with pytest.raises(ValueError, match="mask_ratio must be"):
        Trapdoors(1, 4, 4, 2, mask_ratio=0)
    with pytest.raises(ValueError, match="size must be an integer in"):
        Trapdoors(1, 4, 4, 2, size=5)


def test_module_apply_reaches_a_model_holding_trapdoors():
    # nn.Module.apply(fn) calls .apply(fn) on every child: Trapdoors must not shadow it
    t = Trapdoors(1, 4, 4, 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    model.trapdoors = t
    seen: list[nn.Module] = []
    assert model.apply(seen.append) is model
    assert t in seen and len(seen) == 4


# --- the objective ------------------------------------------------------------------------


def _cnn(k: int = 4, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 32),
            nn.ReLU(),
            nn.Linear(32, k),
        )


def test_objective_losses_at_the_extremes_are_known():
    model = _cnn().eval()
    x, y = make_quadrants(32, seed=4)
    gen = torch.Generator().manual_seed(0)
    always = rl.training.create_objective(
        "trapdoor", inject_ratio=1.0, labels=[2], seed=5, mask_ratio=0.2
    )
    cfg = always.config()
    assert cfg == {
        "name": "trapdoor",
        "inject_ratio": 1.0,
        "mask_ratio": 0.2,
        "squares": 7,
        "size": 3,
        "seed": 5,
        "labels": [2],
    }
    always.setup(model, x, y)
    rebuilt = Trapdoors(
        1, 16, 16, 4, **{k: cfg[k] for k in ("mask_ratio", "squares", "size", "seed")}
    )
    assert torch.equal(always.trapdoors.patterns, rebuilt.patterns)  # the config rebuilds them
    two = torch.full((32,), 2)
    want = F.cross_entropy(model(rebuilt.stamp(x, two)), two)
    torch.testing.assert_close(always(model, x, y, generator=gen), want)
    never = rl.training.create_objective("trapdoor", inject_ratio=0.0)
    torch.testing.assert_close(never(model, x, y, generator=gen), F.cross_entropy(model(x), y))


def test_objective_replaces_half_the_samples_with_uniform_protected_targets():
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.fc(x.flatten(1))

    x = torch.rand(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(4000, dtype=torch.long)
    obj = rl.training.create_objective("trapdoor", labels=[1, 3], size=2, squares=2)
    obj.setup(Spy(), x, y)
    seen.clear()
    obj(Spy(), x, y, generator=torch.Generator().manual_seed(2))
    (got,) = seen
    t = obj.trapdoors
    as_1 = (got == t.stamp(x, torch.full((4000,), 1))).flatten(1).all(1)
    as_3 = (got == t.stamp(x, torch.full((4000,), 3))).flatten(1).all(1)
    clean = (got == x).flatten(1).all(1)
    assert bool((as_1 | as_3 | clean).all()) and not bool((as_1 & as_3).any())
    assert abs(float((as_1 | as_3).float().mean()) - 0.5) < 0.03  # 0.5 +- 3.8 sd
    assert abs(float(as_1.float().mean()) - float(as_3.float().mean())) < 0.04


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="inject_ratio must be"):
        rl.training.create_objective("trapdoor", inject_ratio=1.5)
    with pytest.raises(ValueError, match="distinct"):
        rl.training.create_objective("trapdoor", labels=[1, 1])
    with pytest.raises(TypeError, match="labels must be a list"):
        rl.training.create_objective("trapdoor", labels="all")
    x, y = make_quadrants(4, seed=0)
    with pytest.raises(ValueError, match=r"each protected label must be an integer in \[0, 3\]"):
        rl.training.create_objective("trapdoor", labels=[4]).setup(_cnn(), x, y)


# --- the detector against hand computations ------------------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def _hidden(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model[:3](x).numpy()


def _fit(model, **kw):
    """The detector fitted on 60 points (45 for the statistics, 15 held out), fpr 0.25; also
    the triggers, the statistics points, all points and the warnings of the fit."""
    x = torch.rand(60, 1, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    trap = Trapdoors(1, 3, 3, 3, squares=2, size=2, mask_ratio=0.5, seed=1)
    det = TrapdoorDetector(model, trapdoors=trap, fpr=0.25, holdout=0.25, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.fit(x)
    return det, trap, x[:45], x, [str(w.message) for w in caught]


def test_signatures_are_the_mean_features_of_trapdoored_points():
    model = _mlp()
    det, trap, stats, _, _ = _fit(model, per_label=False, labels=[0, 2])
    for j, t in enumerate([0, 2]):
        want = _hidden(model, trap.stamp(stats, torch.full((45,), t))).mean(0)
        np.testing.assert_allclose(det.signatures[j].numpy(), want, rtol=1e-12, atol=1e-12)
    assert det.protected.tolist() == [0, 2] and det.neurons.all()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("filter_ratio", [1.0, 0.6])
def test_score_is_the_cosine_minus_the_labels_clean_quantile(filter_ratio):
    """NumPy: cos(g(x), S_pred) on the kept neurons, minus the 1 - fpr quantile of the clean
    statistics points predicted as that label (pooled where fewer than ceil(1 / fpr) = 4)."""
    model = _mlp(seed=1)
    det, _, stats, x, warned = _fit(model, filter_ratio=filter_ratio)
    keep = det.neurons.numpy()
    assert keep.sum() == int(5 * filter_ratio)
    sig = det.signatures.numpy()[:, keep]

    def cos_pred(z):
        with torch.no_grad():
            pred = model(z).argmax(1).numpy()
        return pred, _cos(_hidden(model, z)[:, keep], sig[pred])

    pred, cos = cos_pred(stats)
    pooled = np.quantile(cos, 0.75)
    offsets = [
        np.quantile(cos[pred == t], 0.75) if (pred == t).sum() >= 4 else pooled for t in range(3)
    ]
    np.testing.assert_allclose(det.offsets.numpy(), offsets, rtol=1e-10, atol=1e-12)
    assert det.pooled_labels == [t for t in range(3) if (pred == t).sum() < 4] == [2]
    assert len(warned) == 1 and "labels [2] have fewer than 4" in warned[0]  # never silent
    pred_x, cos_x = cos_pred(x)
    np.testing.assert_allclose(
        det.score(x).detach().numpy(), cos_x - np.asarray(offsets)[pred_x], rtol=1e-10, atol=1e-12
    )
    # the threshold: the contract's rule on the held-out rest
    held = np.sort(cos_x[45:] - np.asarray(offsets)[pred_x[45:]])
    assert det.threshold == pytest.approx(held[int(np.ceil(15 * 0.75)) - 1], abs=1e-12)


def test_unprotected_predictions_are_never_rejected_and_the_score_has_gradients():
    model = _mlp(seed=1)
    det, _, _, x, _ = _fit(model, per_label=False, labels=[0])
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert (pred == 1).any() and (pred == 0).any()
    score = det.score(x).detach()
    assert (score[pred == 1] == UNPROTECTED).all() and (score[pred == 0] >= -1).all()
    with torch.no_grad():
        assert not (det(x).argmax(1)[pred == 1] == 3).any()
    xs = x[pred == 0][:4].clone().requires_grad_(True)  # away from ties of the argmax
    assert torch.autograd.gradcheck(det.score, (xs,))


def test_detector_options_and_config():
    model = _mlp()
    trap = Trapdoors(1, 3, 3, 3)
    with pytest.raises(ValueError, match="either trapdoors= or the trigger options"):
        TrapdoorDetector(model, trapdoors=trap, seed=1)
    with pytest.raises(ValueError, match="filter_ratio must be"):
        TrapdoorDetector(model, filter_ratio=0)
    with pytest.raises(ValueError, match="unknown per_label"):
        TrapdoorDetector(model, per_label="yes")
    with pytest.raises(ValueError, match="mask_ratio must be"):
        TrapdoorDetector(model, mask_ratio=2)
    with pytest.raises(ValueError, match="no signatures yet"):
        TrapdoorDetector(model, threshold=0.0).score(torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="trapdoors have 4 labels but the model has 3"):
        TrapdoorDetector(model, trapdoors=Trapdoors(1, 3, 3, 4, size=2)).fit(
            torch.rand(10, 1, 3, 3, dtype=torch.float64)
        )
    det = rl.defenses.create("trapdoor", model, seed=4, squares=2, size=2, per_label=False)
    det.fit(torch.rand(20, 1, 3, 3, dtype=torch.float64))
    cfg = det.config()
    assert "trapdoor objective" in cfg["requires"]
    assert {k: cfg[k] for k in ("seed", "squares", "size", "mask_ratio", "labels", "layer")} == {
        "seed": 4,
        "squares": 2,
        "size": 2,
        "mask_ratio": 0.1,
        "labels": None,
        "layer": "3",
    }
    assert det.trapdoors.config() == {
        "channels": 1,
        "height": 3,
        "width": 3,
        "classes": 3,
        "squares": 2,
        "size": 2,
        "mask_ratio": 0.1,
        "seed": 4,
    }


# --- end to end: a toy model trained with the objective -------------------------------------


def test_trapdoored_model_catches_targeted_pgd():
    """The quadrant toy (4 classes, 16 x 16), 80 Adam steps with the objective through the
    trainer (mask_ratio 0.3: the toy's short training needs a stronger blend than the default);
    the triggers work (chance is 1/4) and targeted PGD (linf 0.1) towards every label is
    flagged far more often than clean points."""
    model = _cnn()
    x, y = make_quadrants(512, seed=2)
    opts = {"mask_ratio": 0.3}
    rl.training.fit(
        model,
        (x, y),
        objective="trapdoor",
        objective_options=opts,
        epochs=10,
        batch_size=64,
        optimizer="adam",
        lr=0.01,
        weight_decay=0.0,
        schedule="constant",
    )
    model.eval()
    det = rl.defenses.create("trapdoor", model, **opts).fit(x)
    xt, yt = make_quadrants(256, seed=5)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.9
        for t in range(4):
            hit = model(det.trapdoors.stamp(xt, torch.full((256,), t))).argmax(1) == t
            assert hit.float().mean() > 0.8, t
    target = torch.arange(4).repeat(16)
    keep = yt[:64] != target
    res = PGD(rl.ThreatModel("linf", 0.1), steps=10, targeted=True)(
        model, xt[:64][keep], yt[:64][keep], target=target[keep]
    )
    assert res.success.float().mean() > 0.9
    with torch.no_grad():
        caught = det.detect(res.x_adv[res.success]).float().mean()
        false_alarms = det.detect(xt).float().mean()
    assert false_alarms < 0.15 and caught > 0.35 and caught > false_alarms + 0.25
