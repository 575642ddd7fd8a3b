"""Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017): the search on a linear
binary classifier, where one direction fools every point and the smallest universal radius is
known; the evaluation's fooling rate recomputed from ``v``, whatever the search reports; ``v``
in the ball and ``clip(x + v)`` in the box on a small non-linear model; bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab.evaluation.universal as universal
from helpers import make_quadrants
from robustlab import ThreatModel
from robustlab.attacks.deepfool import STEP_SLACK
from robustlab.attacks.uap import apply, universal_perturbation
from robustlab.evaluation.universal import evaluate_universal

F64 = torch.float64
OVERSHOOT = 0.02


class Affine(nn.Module):
    """Two classes, logits ``[0, w.flatten(x) + b]``, in float64."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w.to(F64))
        self.b = b

    def forward(self, x: Tensor) -> Tensor:
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(f), f], 1)


def one_direction(n: int = 12, seed: int = 0) -> tuple[Affine, Tensor, Tensor, Tensor]:
    """An affine binary model and ``n`` points (n, 1, 4, 4) near 0.5, all of class 1 with
    ``f = w.x + b`` in [0.05, 0.3]: moving against ``w`` fools them all. Returns the model,
    the points, their labels and ``f``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g, dtype=F64)
    x = 0.5 + 0.03 * torch.randn(n, 1, 4, 4, generator=g, dtype=F64)
    f_want = 0.05 + 0.25 * torch.rand(n, generator=g, dtype=F64)
    b = 0.0
    x = x + ((f_want - x.flatten(1) @ w) / w.dot(w))[:, None, None, None] * w.reshape(4, 4)
    model = Affine(w, b)
    return model, x, torch.ones(n, dtype=torch.long), x.flatten(1) @ w + b


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_finds_the_one_direction_that_fools_every_point(norm):
    model, x, y, f = one_direction()
    w = model.w
    dual = w.norm() if norm == "l2" else w.abs().sum()  # ||w||_q, q the dual norm
    u = w / w.norm() if norm == "l2" else w.sign()  # the unit direction that lowers f fastest
    smallest = (f.max() / dual).item()  # the smallest universal radius: max_i f_i / ||w||_q
    threat = ThreatModel(norm, 0.2)
    v, history = universal_perturbation(
        model,
        x,
        y,
        threat,
        delta=0.0,
        overshoot=OVERSHOOT,
        generator=torch.Generator().manual_seed(3),
    )
    radius = threat.distance(v[None], torch.zeros_like(v)[None]).item()
    # along -u only, with a radius between the smallest universal one and its overshoot
    assert torch.allclose(v.flatten(), -radius * u, atol=1e-12, rtol=0)
    assert smallest < radius <= (smallest + STEP_SLACK) * (1 + OVERSHOOT) + 1e-12
    fooled = apply(v, x, threat).flatten(1) @ w < 0
    assert fooled.all()
    assert history[-1]["fooling_rate"] == 1.0 and "fooling rate" in history[-1]["stop"]
    # fewer DeepFool updates than points: a point fooled by v already is skipped
    assert 1 <= sum(h["updates"] for h in history) < len(x)


def test_the_ball_caps_v_and_the_search_stops_after_max_passes():
    model, x, y, f = one_direction()
    w = model.w
    eps = 0.5 * (f.max() / w.norm()).item()  # too small to fool the farthest point
    threat = ThreatModel("l2", eps)
    v, history = universal_perturbation(model, x, y, threat, delta=0.0, max_passes=2)
    assert threat.distance(v[None], torch.zeros_like(v)[None]).item() == pytest.approx(eps)
    assert torch.allclose(v.flatten(), -eps * w / w.norm(), atol=1e-9, rtol=0)
    want = ((f - eps * w.norm()) < 0).double().mean().item()
    assert 0 < want < 1 and history[-1]["fooling_rate"] == pytest.approx(want)
    assert len(history) == 2 and history[-1]["stop"] == "max_passes (2) reached"


def test_the_search_stops_after_a_pass_without_an_update():
    model, x, y, _ = one_direction(n=6)
    model.w.zero_()  # constant logits [0, b]: DeepFool finds no step anywhere
    model.b = 1.0
    v, history = universal_perturbation(model, x, y, ThreatModel("linf", 0.1), max_passes=5)
    assert torch.equal(v, torch.zeros_like(v)) and len(history) == 1
    assert history[0]["updates"] == 0 and history[0]["deepfool_failed"] == 6
    assert "without an update" in history[0]["stop"]


def test_evaluation_reports_held_out_fooling_rate_recomputed_from_v():
    model, x, y, f = one_direction(n=24)
    rank = f.argsort()
    fit, test = rank[0:17:2], rank[1::2]  # the test set holds the 7 largest f
    threat = ThreatModel("linf", 0.2)
    rec = evaluate_universal(model, x[fit], y[fit], x[test], y[test], threat, delta=0.0)
    v = rec["v_norm"] * -model.w.sign()  # along -sign(w) (test above)
    want = ((f[test] + v @ model.w) < 0).double().mean().item()
    assert 0 < want < 1 and rec["fooling_rate"] == pytest.approx(want)
    assert rec["perturbed_accuracy"] == pytest.approx(1 - want)
    assert rec["clean_accuracy"] == 1.0 and rec["fit_fooling_rate"] == 1.0
    assert rec["kind"] == "universal-perturbation" and rec["n"] == 12 and rec["n_fit"] == 9
    assert 0 < rec["v_norm"] <= 0.2 and rec["passes"] == len(rec["history"]) >= 1
    assert rec["flags"] == []
    assert json.loads(json.dumps(rec))["fooling_rate"] == rec["fooling_rate"]  # data, as is


def test_a_wrong_history_does_not_change_the_reported_figures(monkeypatch):
    model, x, y, _ = one_direction(n=16)
    threat = ThreatModel("linf", 0.2)

    def boasting(model, x, y, threat, **options):  # v = 0, yet it claims to fool everything
        return torch.zeros_like(x[0]), [{"pass": 1, "fooling_rate": 1.0, "stop": "claimed"}]

    monkeypatch.setattr(universal, "universal_perturbation", boasting)
    rec = evaluate_universal(model, x[:8], y[:8], x[8:], y[8:], threat)
    assert rec["fooling_rate"] == 0.0 and rec["fit_fooling_rate"] == 0.0
    assert rec["perturbed_accuracy"] == rec["clean_accuracy"] == 1.0
    assert rec["search_fit_fooling_rate"] == 1.0
    assert [fl["name"] for fl in rec["flags"]] == ["search-disagrees"]


def test_evaluation_refuses_v_outside_the_ball(monkeypatch):
    model, x, y, _ = one_direction(n=8)
    threat = ThreatModel("l2", 0.1)

    def too_big(model, x, y, threat, **options):
        return torch.full_like(x[0], 0.1), [{"pass": 1, "fooling_rate": 1.0}]

    monkeypatch.setattr(universal, "universal_perturbation", too_big)
    with pytest.raises(RuntimeError, match="norm 0.4 > eps 0.1"):
        evaluate_universal(model, x[:4], y[:4], x[4:], y[4:], threat)


def test_evaluation_flags_test_points_that_were_fitted_on():
    model, x, y, _ = one_direction(n=8)
    rec = evaluate_universal(model, x, y, x[:3], y[:3], ThreatModel("linf", 0.2))
    assert [fl["name"] for fl in rec["flags"]] == ["overlap"]
    assert "3 of the 3 test points" in rec["flags"][0]["message"]


class Quadrants(nn.Module):
    """A fixed non-linear classifier of the quadrant images: logit k is
    ``10 tanh(3 (mean of quadrant k - 0.5))``."""

    def forward(self, x: Tensor) -> Tensor:
        q = F.avg_pool2d(x, x.shape[-1] // 2).flatten(1)
        return 10 * torch.tanh(3 * (q - 0.5))


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_v_in_the_ball_and_x_plus_v_in_the_box_on_a_non_linear_model(norm, eps):
    model = Quadrants().train()
    x, y = make_quadrants(24, seed=5, size=8)
    x[:, :, 0], x[:, :, -1] = 1.0, 0.0  # rows on the bounds: x + v leaves the box there
    x0 = x.clone()
    threat = ThreatModel(norm, eps)
    options = {"max_passes": 2, "deepfool_steps": 5, "seed": 1}
    rec = evaluate_universal(model, x[:16], y[:16], x[16:], y[16:], threat, **options)
    assert model.training and torch.equal(x, x0)  # mode restored, inputs untouched
    v, history = universal_perturbation(model, x[:16], y[:16], threat, **options)
    assert v.shape == x.shape[1:]
    assert threat.distance(v[None], torch.zeros_like(v)[None]).item() <= eps + 1e-6
    assert rec["v_norm"] == pytest.approx(eps, rel=1e-4)  # the ball binds: the projection ran
    assert ((x + v < 0) | (x + v > 1)).any()  # the box binds too
    assert threat.contains(apply(v, x, threat), x).all()
    # deterministic given the seed: the same v, and the search's figures are the recomputed ones
    model.eval()
    fooled = (model(apply(v, x[:16], threat)).argmax(1) != model(x[:16]).argmax(1)).double()
    assert rec["fit_fooling_rate"] == history[-1]["fooling_rate"] == fooled.mean().item() > 0
    assert rec["passes"] == len(history) == 2 and rec["flags"] == []


@pytest.mark.parametrize(
    ("threat", "options", "match"),
    [
        (ThreatModel("linf", 0.0), {}, "eps must be > 0"),
        (ThreatModel("l1", 1.0), {}, "supports the norms l2, linf"),
        (ThreatModel("linf", 0.1), {"delta": 1.0}, "delta"),
        (ThreatModel("linf", 0.1), {"max_passes": 0}, "max_passes"),
        (ThreatModel("linf", 0.1), {"overshoot": -1.0}, "overshoot"),
        (ThreatModel("linf", 0.1), {"deepfool_steps": 0}, "deepfool_steps"),
    ],
)
def test_bad_options_get_clear_errors(threat, options, match):
    model, x, y, _ = one_direction(n=4)
    with pytest.raises(ValueError, match=match):
        universal_perturbation(model, x, y, threat, **options)


def test_empty_or_mismatched_inputs_get_clear_errors():
    model, x, y, _ = one_direction(n=4)
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match="x is empty"):
        universal_perturbation(model, x[:0], y[:0], threat)
    with pytest.raises(ValueError, match="x is empty"):
        evaluate_universal(model, x, y, x[:0], y[:0], threat)
    with pytest.raises(ValueError, match="must share one shape"):
        evaluate_universal(model, x, y, x.flatten(1), y, threat)
    with pytest.raises(ValueError, match="labels out of range"):
        universal_perturbation(model, x, y + 1, threat)
