"""The classic minimum-norm attacks (DeepFool, L-BFGS-B, EAD) on cases with a known answer:
DeepFool's one exact step on affine classifiers, EAD's shrinkage and first ISTA step by hand,
and L-BFGS-B and EAD against the exact minimal norms of the linear-model oracle (DeepFool's
oracle cases are in ``test_minimum_norm.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from linear_oracle import exact_min_norm, train_linear
from robustlab import ThreatModel, attacks
from robustlab.attacks.deepfool import STEP_SLACK
from robustlab.attacks.ead import shrink

F64 = torch.float64


class Affine(nn.Module):
    """Logits ``W flatten(x) + b`` (K = len(b)), in float64."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w.to(F64))
        self.register_buffer("b", b.to(F64))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.T + self.b


def binary(n: int = 6, seed: int = 0) -> tuple[Affine, Tensor, Tensor, Tensor]:
    """Two classes with logit difference ``f = w.x + b`` (logits ``[0, f]``), ``n`` points
    (n, 1, 4, 4) near 0.5 with ``|f|`` in [0.1, 0.5] on both sides, their labels and ``f``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g, dtype=F64)
    x = 0.5 + 0.05 * torch.randn(n, 1, 4, 4, generator=g, dtype=F64)
    target = (0.1 + 0.4 * torch.rand(n, generator=g, dtype=F64)) * (-1) ** torch.arange(n)
    b = target[0] - x[0].flatten() @ w  # one bias; move the points along w to hit each f
    x = x + ((target - (x.flatten(1) @ w + b)) / w.dot(w))[:, None, None, None] * w.reshape(4, 4)
    model = Affine(torch.stack([torch.zeros(16, dtype=F64), w]), torch.stack([0 * b, b]))
    f = x.flatten(1) @ w + b
    return model, x, (f > 0).long(), f


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("overshoot", [0.02, 0.0])
def test_deepfool_exact_in_one_step_on_an_affine_binary_classifier(norm, overshoot):
    model, x, y, f = binary()
    w = model.w[1]
    atk = attacks.create("deepfool", ThreatModel(norm, 10.0), steps=1, overshoot=overshoot)
    res = atk(model, x, y)
    # the boundary's distance |w.x + b| / ||w||_q (q = 2 for l2, 1 for linf), 1e-4 beyond it
    dual = w.norm() if norm == "l2" else w.abs().sum()
    dist = (f.abs() / dual + STEP_SLACK) * (1 + overshoot)
    u = w / w.norm() if norm == "l2" else w.sign()
    want = x - (f.sign()[:, None] * dist[:, None] * u).reshape(x.shape)  # towards the boundary
    assert torch.allclose(res.x_adv, want, atol=1e-12, rtol=0)
    assert torch.allclose(res.min_norm, dist, atol=1e-12, rtol=0)
    assert torch.allclose(atk.threat.distance(res.x_adv, x), dist, atol=1e-12, rtol=0)
    f_adv = res.x_adv.flatten(1) @ w + model.b[1]
    assert (f_adv.sign() == -f.sign()).all() and res.success.all()  # on the other side


def three_class(candidates: int) -> tuple[Tensor, Tensor]:
    """DeepFool on a 3-class affine model at x = (0.5, 0.5): the runner-up class 2
    (logit -0.4) lies 0.2 away, class 1 (logit -1) only 0.1; returns (x_adv, min_norm)."""
    model = Affine(
        torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 2.0]]), torch.tensor([0.0, -6.0, -1.4])
    )
    x = torch.full((1, 1, 1, 2), 0.5, dtype=F64)
    res = attacks.create("deepfool", ThreatModel("l2", 1.0), candidates=candidates)(
        model, x, torch.tensor([0])
    )
    return res.x_adv.flatten(), res.min_norm


def test_deepfool_candidates_are_the_top_classes_by_clean_logits():
    x_adv, m = three_class(candidates=2)  # only the runner-up: the farther boundary
    d2 = (0.2 + STEP_SLACK) * 1.02
    assert torch.allclose(x_adv, torch.tensor([0.5, 0.5 + d2], dtype=F64))
    assert m.item() == pytest.approx(d2)
    x_adv, m = three_class(candidates=3)  # all classes: the closest boundary
    d1 = (0.1 + STEP_SLACK) * 1.02
    assert torch.allclose(x_adv, torch.tensor([0.5 + d1, 0.5], dtype=F64))
    assert m.item() == pytest.approx(d1)


def test_ead_shrinkage_by_hand():
    x = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.1], dtype=F64)
    z = torch.tensor([0.9, 0.6, 0.2, 0.75, 0.25, 1.4, -0.4], dtype=F64)
    # z - x = 0.4 > beta: z - beta; |0.1| <= beta: x; -0.3 < -beta: z + beta; +-0.25 = beta
    # (the boundary, exact in binary): x; 0.5 above 0.9: 1.15, clipped to 1; -0.5 below 0.1:
    # -0.15, clipped to 0
    want = torch.tensor([0.65, 0.5, 0.45, 0.5, 0.5, 1.0, 0.0], dtype=F64)
    assert torch.allclose(shrink(z, x, 0.25, 0.0, 1.0), want, atol=1e-15)
    assert torch.equal(shrink(z, x, 0.0, 0.0, 1.0), z.clamp(0, 1))  # beta 0: the box only
    want = torch.tensor([0.65, 0.5, 0.45, 0.5, 0.5, 1.15, -0.15], dtype=F64)  # a wider box
    assert torch.allclose(shrink(z, x, 0.25, -0.2, 1.5), want, atol=1e-15)


@pytest.mark.parametrize("fista", [True, False])
def test_ead_first_step_by_hand(fista):
    """One iteration from x: the hinge ``max(z_y - z_other, 0) = -f`` has gradient ``-w``, the
    l2 term none, so ``x_1 = S_beta(x + lr c w)`` coordinate by coordinate."""
    model, x, y, f = binary()
    keep = y == 0
    x, y, w = x[keep], y[keep], model.w[1]
    c, lr, beta = 5.0, 0.01, 0.01
    atk = attacks.create(
        "ead",
        ThreatModel("l1", 100.0),
        steps=1,
        search_steps=1,
        initial_const=c,
        lr=lr,
        beta=beta,
        fista=fista,
    )
    res = atk(model, x, y)
    want = x.clone().flatten(1)
    for i in range(len(want)):
        for j in range(16):
            z = x.flatten(1)[i, j].item() + lr * c * w[j].item()
            d = z - x.flatten(1)[i, j].item()
            if d > beta:
                want[i, j] = min(z - beta, 1.0)
            elif d < -beta:
                want[i, j] = max(z + beta, 0.0)
    assert res.success.all()
    assert torch.allclose(res.x_adv.flatten(1), want, atol=1e-12, rtol=0)
    assert torch.allclose(res.min_norm, (want - x.flatten(1)).abs().sum(1), atol=1e-12)


@pytest.fixture(scope="module")
def linear():
    """The oracle's linear model on 60 of its points, with their exact minimal l2 and l1."""
    model, x, y = train_linear(seed=0)
    x, y = x[:60], y[:60]
    return model, x, y, {n: exact_min_norm(model, x, y, n).float() for n in ("l2", "l1")}


def _close_to_exact(res, exact: Tensor, threat: ThreatModel, bound: float) -> Tensor:
    """The checks of test_minimum_norm.py: min_norm never below the exact minimum, its median
    ratio to it at most ``bound``, and the eps contract. Returns the ratios."""
    m = res.min_norm
    assert (m >= exact * (1 - 1e-4) - 1e-6).all()
    solved = (exact > 0) & torch.isfinite(exact)
    assert torch.isfinite(m[solved]).all()
    ratio = m[solved] / exact[solved]
    assert ratio.median() <= bound
    assert torch.equal(m <= threat.eps + threat.tolerance(), res.success)
    return ratio


def test_lbfgs_reaches_the_exact_minimal_l2(linear):
    # measured: median ratio 1.0008, max 1.012 on these 60 points (1.5 s)
    model, x, y, exact = linear
    threat = ThreatModel("l2", 1.07)
    res = attacks.create("lbfgs", threat)(model, x, y)
    _close_to_exact(res, exact["l2"], threat, 1.005)
    assert threat.contains(res.x_adv, x).all()


def test_lbfgs_targeted_reaches_its_targets(linear):
    model, x, y, _ = linear
    x, y = x[:20], y[:20]
    target = (y + 1) % 4
    res = attacks.create("lbfgs", ThreatModel("l2", 10.0), targeted=True, steps=50)(
        model, x, y, target=target
    )
    assert res.success.all() and torch.equal(model(res.x_adv).argmax(1), target)


def test_ead_close_to_the_exact_minimal_l1_and_its_decision_rules(linear):
    """Both rules pick from the same iterates (the rule changes no step): the L1 rule's point
    is never larger in l1, the EN rule's never larger in elastic-net distance."""
    # measured medians of min_norm / exact: 1.082 (EN rule), 1.080 (L1 rule): beta = 1e-2
    # trades l1 for l2, so EAD is not an exact l1 minimiser
    model, x, y, exact = linear
    threat = ThreatModel("l1", 5.6)
    opts = {"steps": 300, "search_steps": 6}
    en = attacks.create("ead", threat, **opts)(model, x, y)
    l1 = attacks.create("ead", threat, decision_rule="l1", **opts)(model, x, y)
    for res in (en, l1):
        _close_to_exact(res, exact["l1"], threat, 1.10)
        assert threat.contains(res.x_adv, x).all()
    both = torch.isfinite(en.min_norm) & (en.min_norm <= threat.eps) & (l1.min_norm <= threat.eps)
    assert (l1.min_norm[both] <= en.min_norm[both] + 1e-6).all()
    assert (l1.min_norm[both] < en.min_norm[both] - 1e-4).any()  # the rules differ somewhere

    def elastic(res):
        d = (res.x_adv - x).flatten(1)
        return 1e-2 * d.abs().sum(1) + d.pow(2).sum(1)

    assert (elastic(en)[both] <= elastic(l1)[both] + 1e-6).all()


@pytest.mark.parametrize(
    ("name", "norm", "opts", "match"),
    [
        ("deepfool", "l2", {"candidates": 1}, "candidates"),
        ("deepfool", "l2", {"overshoot": -0.1}, "overshoot"),
        ("deepfool", "linf", {"steps": 0}, "steps"),
        ("lbfgs", "l2", {"initial_const": 0}, "initial_const"),
        ("lbfgs", "l2", {"search_steps": 0}, "search_steps"),
        ("ead", "l1", {"beta": -1e-3}, "beta"),
        ("ead", "l1", {"decision_rule": "l2"}, r"unknown decision_rule 'l2'.*en, l1"),
        ("ead", "l1", {"lr": 0}, "lr"),
        ("ead", "l1", {"kappa": -1}, "kappa"),
        ("deepfool", "l1", {}, r"supports the norms l2, linf"),
        ("lbfgs", "linf", {}, r"supports the norms l2"),
        ("ead", "l2", {}, r"supports the norms l1"),
    ],
)
def test_bad_options_and_norms(name, norm, opts, match):
    with pytest.raises(ValueError, match=match):
        attacks.create(name, ThreatModel(norm, 1.0), **opts)
