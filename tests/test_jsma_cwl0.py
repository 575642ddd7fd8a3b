"""JSMA and C&W-l0 on cases with a known answer: JSMA's pair choice by hand on a 4-feature,
3-class model, both attacks on a linear model whose minimal number of pixels is known, and
both never below the exact minimal l0 of the linear-model oracle (exact for a linear model:
the fewest pixels whose best box changes overtake ``y``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linear_oracle import train_linear
from robustlab import ThreatModel, attacks
from robustlab.attacks._min_norm import ConstantSearch
from robustlab.attacks.jsma import MAX_FEATURES, best_pair

F64 = torch.float64
CW_FAST = {"steps": 100, "initial_const": 1.0, "largest_const": 1e3}


class Affine(nn.Module):
    """Logits ``W flatten(x) + b``, in float64."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=F64))
        self.register_buffer("b", torch.as_tensor(b, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).to(self.w.dtype) @ self.w.T + self.b


# 4 features, 3 classes; target 0. Gradients of the logits: g_t = W[0] = [1, .8, .5, -.2],
# g_o = W[1] + W[2] = [.9, -1.5, -.9, .4]. Pairs (alpha, beta, -alpha*beta):
# (0,1) 1.8, -.6, 1.08 | (0,2) 1.5, 0: no | (0,3) .8, 1.3: no | (1,2) 1.3, -2.4, 3.12 |
# (1,3) .6, -1.1, .66 | (2,3) .3, -.5, .15  ->  (1, 2), not the two largest alphas (0, 1)
W3 = [[1.0, 0.8, 0.5, -0.2], [0.5, -1.0, -0.5, 0.3], [0.4, -0.5, -0.4, 0.1]]
B3 = [0.0, 0.5, 0.0]  # at x = 0.1 everywhere the logits are [.21, .43, -.04]: class 1


def test_best_pair_by_hand():
    w = torch.tensor(W3, dtype=F64)
    g_t, g_o = w[0][None], (w[1] + w[2])[None]
    every = torch.ones(1, 4, dtype=torch.bool)
    p, q, found = best_pair(g_t, g_o, every, increase=True)
    assert (int(p), int(q), bool(found)) == (1, 2, True)
    # feature 1 used already: (0,2) has beta = 0, (0,3) beta > 0, so (2, 3) with .15
    p, q, found = best_pair(g_t, g_o, torch.tensor([[True, False, True, True]]), True)
    assert (int(p), int(q), bool(found)) == (2, 3, True)
    # decreasing (alpha < 0, beta > 0) on the negated gradients: the same pair
    p, q, _ = best_pair(-g_t, -g_o, every, increase=False)
    assert (int(p), int(q)) == (1, 2)
    # no qualifying pair: every alpha <= 0
    assert not best_pair(-g_t.abs(), g_o, every, increase=True)[2].any()


@pytest.mark.parametrize("logits", [True, False])
def test_jsma_one_step_by_hand(logits):
    model = Affine(W3, B3)
    x = torch.full((1, 1, 2, 2), 0.1, dtype=F64)
    w = torch.tensor(W3, dtype=F64)
    if logits:
        want = (1, 2)
    else:  # softmax: d p_0 / dx = p_0 (W_0 - p @ W) and the others' sum is its negative, so
        p = F.softmax(model(x), 1)[0]  # the choice is the two largest of W_0 - p @ W
        g = w[0] - p @ w
        want = tuple(sorted(g.topk(2).indices.tolist()))
    atk = attacks.create("jsma", ThreatModel("l0", 4), gamma=0.5, logits=logits, targeted=True)
    res = atk(model, x, torch.tensor([1]), target=torch.tensor([0]))  # gamma d / 2 = 1 step
    expect = x.flatten(1).clone()
    expect[0, list(want)] = 1.0
    assert torch.equal(res.x_adv.flatten(1), expect)
    assert res.success.all() and res.min_norm.tolist() == [2.0]


def two_pixel_model(channels: int = 1) -> tuple[Affine, Tensor, Tensor, list[int]]:
    """Two classes, logits ``[-f, f] / 2`` (JSMA-Z needs the other logit to move), 16 pixels:
    ``f`` needs the two heavy features (weight 1, from 0.2 to 1: +0.8 each) to reach 0 from
    -1.2; the 14 light ones (0.01) add 0.112 at most. With 3 channels the heavy features are
    two channels of pixel 5: one pixel."""
    d = 16 * channels
    heavy = [5, 10] if channels == 1 else [5, 16 + 5]
    wf = torch.full((d,), 0.01, dtype=F64)
    wf[heavy] = 1.0
    x = torch.full((1, channels, 4, 4), 0.2, dtype=F64)
    b = -(x.flatten() @ wf) - 1.2
    model = Affine(torch.stack([-wf, wf]) / 2, torch.stack([-b, b]) / 2)
    return model, x, torch.tensor([0]), heavy


@pytest.mark.parametrize(
    ("name", "opts"), [("jsma", {}), ("jsma", {"logits": True}), ("cw-l0", CW_FAST)]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_known_minimal_pixels(name, opts, channels):
    model, x, y, heavy = two_pixel_model(channels)
    need = 2 if channels == 1 else 1
    res = attacks.create(name, ThreatModel("l0", need), **opts)(model, x, y)
    assert res.success.all() and res.min_norm.tolist() == [float(need)]
    changed = (res.x_adv != x).flatten(1)[0].nonzero().squeeze(1).tolist()
    if name == "jsma":
        assert changed == heavy  # JSMA moves features: exactly the two heavy ones
    else:
        assert set(heavy) <= set(changed)


def exact_min_l0(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(N,) the fewest pixels (one channel) whose changes within [0, 1] let a class j != y
    overtake y on the linear ``model``: the top-k best per-pixel gains of some j reach the
    margin (inf if no k does)."""
    w, b = model.fc.weight.double(), model.fc.bias.double()
    xf = x.flatten(1).double()
    best = torch.full((len(x),), float("inf"), dtype=F64)
    for j in range(w.shape[0]):
        a = w[j][None] - w[y]
        margin = -(xf * a).sum(1) - (b[j] - b[y])
        gain = torch.where(a > 0, a * (1 - xf), a * (0 - xf)).sort(1, descending=True).values
        reach = gain.cumsum(1) >= margin[:, None]
        k = torch.where(reach.any(1), reach.float().argmax(1).double() + 1, float("inf"))
        best = torch.where(j != y, torch.minimum(best, k), best)
    return torch.where(model(x).argmax(1) != y, 0.0, best)


@pytest.mark.parametrize(
    ("name", "opts", "bound"), [("jsma", {"gamma": 1.0}, 1.5), ("cw-l0", CW_FAST, 1.5)]
)
def test_never_below_the_exact_minimal_l0(name, opts, bound):
    model, x, y = train_linear(seed=0)
    x, y = x[:24], y[:24]
    exact = exact_min_l0(model, x, y).float()
    res = attacks.create(name, ThreatModel("l0", 8), **opts)(model, x, y)
    m = res.min_norm
    assert (m >= exact).all()  # the pixel count of a real adversarial point
    solved = (exact > 0) & torch.isfinite(exact)
    assert solved.sum() >= 20 and torch.isfinite(m[solved]).all()
    assert (m[solved] / exact[solved]).median() <= bound
    assert torch.equal(m <= 8, res.success)


def test_jsma_targets_and_untargeted_steering(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    target = (y + 2) % 4
    atk = attacks.create("jsma", ThreatModel("l0", 60), targeted=True, logits=True)
    res = atk(toy_model, x, y, target=target)
    assert torch.equal(res.success, toy_model(res.x_adv).argmax(1) == target)
    assert res.success.float().mean() >= 0.75
    runner = attacks.create("jsma", ThreatModel("l0", 60), untargeted_target="runner-up")
    assert runner(toy_model, x, y).success.float().mean() >= 0.75


def test_constant_search_doubling_mode():
    search = ConstantSearch(torch.zeros(3), 1e-3, 0, last_at_upper=False, factor=2.0, bisect=False)
    search.update(torch.tensor([0, 2]), torch.tensor([False, True]))
    assert search.const.tolist() == pytest.approx([2e-3, 1e-3, 1e-3])


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("jsma", {"theta": 0}, "theta"),
        ("jsma", {"theta": 2}, "theta"),
        ("jsma", {"gamma": 0}, "gamma"),
        ("jsma", {"untargeted_target": "best"}, "untargeted"),
        ("cw-l0", {"const_factor": 1}, "const_factor"),
        ("cw-l0", {"largest_const": 0}, "largest"),
        ("cw-l0", {"kappa": -1}, "kappa"),
        ("cw-l0", {"steps": 0}, "steps"),
    ],
)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        attacks.create(name, ThreatModel("l0", 3), **opts)


@pytest.mark.parametrize("name", ["jsma", "cw-l0"])
def test_l0_only(name):
    with pytest.raises(ValueError, match="l0"):
        attacks.create(name, ThreatModel("l2", 1.0))


def test_jsma_refuses_inputs_too_large_for_the_pair_search():
    side = int(MAX_FEATURES**0.5) + 1
    model = Affine(torch.zeros(2, side * side, dtype=F64), torch.tensor([1.0, 0.0]))
    x = torch.full((1, 1, side, side), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="pgd-l0"):
        attacks.create("jsma", ThreatModel("l0", 3))(model, x, torch.tensor([0]))
