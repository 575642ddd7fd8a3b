"""The margin-decomposition attack (Ma et al. 2023) on a model with imbalanced margin gradients,
its loss and step-size schedule, and the temperature option of the losses (Carlini & Wagner
2016) on a distilled-like model whose softmax saturates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab import ThreatModel, attacks
from robustlab.attacks import md
from robustlab.attacks.losses import cross_entropy, cw_margin, dlr, tempered


class Imbalanced(nn.Module):
    """Two classes on the mean ``m`` of the input: ``z_0 = 2 - 3 exp(40 (m - 0.75))`` (the
    true class of the tests: saturated, its gradient ~1e-4 of the other's at ``m = 0.5``),
    ``z_1 = -m``. The margin ``z_1 - z_0`` grows as ``m`` falls near 0.5 (its gradient is
    ``z_1``'s), yet class 1 wins only for ``m`` > 0.748: at ``x = 0.5`` the point ``x + 0.3``
    of the linf ball is adversarial, the margin's ascent leads away from it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([2 - 3 * torch.exp(40 * (m - 0.75)), -m], 1)


def imbalanced_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (0.5 + 0.01 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, torch.zeros(n, dtype=torch.long)


# the linf ball of radius 0.3 and the l2 ball containing it (64 values: 0.3 * 8)
BALLS = [ThreatModel("linf", 0.3), ThreatModel("l2", 2.4)]


def test_the_toy_model_has_imbalanced_gradients():
    x, y = imbalanced_batch()
    model = Imbalanced()
    xg = x.clone().requires_grad_()
    z = model(xg)
    (g0,) = torch.autograd.grad(z[:, 0].sum(), xg, retain_graph=True)
    (g1,) = torch.autograd.grad(z[:, 1].sum(), xg)
    assert (g0.abs() < 1e-2 * g1.abs()).all() and (g0 != 0).all()
    assert (z.argmax(1) == y).all()  # clean: correct
    with torch.no_grad():  # the known answer: the ball's corner x + 0.3 is adversarial
        assert (model(x + 0.3).argmax(1) != y).all()


@pytest.mark.parametrize("threat", BALLS, ids=lambda t: t.norm)
def test_margin_attacks_fail_where_md_first_stage_succeeds(threat):
    x, y = imbalanced_batch()
    model = Imbalanced()
    for name, opts in [
        ("pgd", {"loss": "cw-margin", "steps": 50, "restarts": 2}),
        ("pgd", {"loss": "ce", "steps": 50}),
        ("apgd-ce", {"steps": 50}),
        ("md", {"change_point": 0}),
    ]:  # MD's runs on the margin alone
        res = attacks.create(name, threat, **opts)(model, x, y)
        assert res.robust_accuracy == 1.0, (name, opts)
    for name in ("md", "md-mt"):
        res = attacks.create(name, threat)(model, x, y)
        assert res.success.all(), name
        assert (res.loss > 0).all()  # the C&W margin: positive iff broken


def _recorder(log: list, name: str, fn):
    def term(logits, y, t):
        log.append((name, None if t is None else t.tolist()))
        return fn(logits, y, t)

    return term


def test_md_schedule_is_the_papers(monkeypatch):
    """Each step's loss and step length, recorded as the loop uses them: per random start a
    run on ``-z_y`` and one on ``z_max`` for ``change_point`` steps, the margin after; sign
    steps of ``2 eps (1 + cos(pi j / P)) / 2``, ``j`` counted from each stage's start,
    ``P = steps - change_point``."""
    log: list = []
    for name, fn in list(md.TERMS.items()):
        monkeypatch.setitem(md.TERMS, name, _recorder(log, name, fn))
    sizes: list[float] = []
    steepest = ThreatModel.steepest_step

    def recorded(self, grad, step_size, **kw):
        sizes.append(step_size)
        return steepest(self, grad, step_size, **kw)

    monkeypatch.setattr(ThreatModel, "steepest_step", recorded)
    x, y = imbalanced_batch(3)
    threat = ThreatModel("linf", 0.01)  # too small to break any point: every step runs
    res = attacks.create("md", threat, steps=6, change_point=2, restarts=2)(Imbalanced(), x, y)
    assert not res.success.any()
    run0, run1 = ["true"] * 2 + ["margin"] * 4, ["other"] * 2 + ["margin"] * 4
    assert [n for n, _ in log] == (run0 + run1) * 2
    cosine = [0.02 * (1 + math.cos(math.pi * j / 4)) / 2 for j in (0, 1, 0, 1, 2, 3)]
    assert sizes == pytest.approx(cosine * 4)


def test_md_default_schedule():
    atk = attacks.create("md", ThreatModel("linf", 8 / 255))
    assert (atk.steps, atk.change_point, atk.step_size) == (50, 20, pytest.approx(16 / 255))
    sizes = md.step_sizes(1.0, 50, 20)
    assert sizes[0] == sizes[20] == 1.0 and sizes[21] == pytest.approx(sizes[1])
    assert sizes[49] == pytest.approx((1 + math.cos(math.pi * 29 / 30)) / 2)
    assert [md.term_at(i, r, 20) for r in (0, 1) for i in (0, 19, 20, 49)] == [
        "true",
        "true",
        "margin",
        "margin",
        "other",
        "other",
        "margin",
        "margin",
    ]


class Fixed(nn.Module):
    """Three classes, logits ``(2, 0, 1) + 0.01 m``: clean class 0, then class 2, then 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([2.0, 0.0, 1.0]) + 0.01 * x.flatten(1).mean(1, keepdim=True)


def test_md_mt_targets_the_most_likely_wrong_classes_in_turn(monkeypatch):
    log: list = []
    for name, fn in list(md.TERMS.items()):
        monkeypatch.setitem(md.TERMS, name, _recorder(log, name, fn))
    x, y = imbalanced_batch(2)
    atk = attacks.create("md-mt", ThreatModel("linf", 0.01), k=5, steps=2, change_point=1)
    assert not atk(Fixed(), x, y).success.any()
    # k capped at classes - 1 = 2; per target: run 0 (true, margin), run 1 (other, margin)
    assert [n for n, _ in log] == ["true", "margin", "other", "margin"] * 2
    assert [t for _, t in log] == [[2, 2]] * 4 + [[1, 1]] * 4


def test_md_config_and_bad_options():
    linf = ThreatModel("linf", 0.1)
    cfg = attacks.create("md-mt", linf, k=3, restarts=2, steps=10).config()
    assert cfg == {
        "name": "md-mt",
        "loss": "cw-margin",
        "targeted": False,
        "steps": 10,
        "step_size": pytest.approx(0.2),
        "restarts": 2,
        "change_point": 4,
        "k": 3,
        "runs": 2,
    }
    for opts, match in [
        (
            {"change_point": 11, "steps": 10},
            r"change_point must be an integer "
            r"in \[0, 10\], got 11",
        ),
        ({"change_point": -1}, "change_point must be"),
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"step_size": 0}, "step_size must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            attacks.create("md", linf, **opts)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        attacks.create("md-mt", linf, k=0)
    with pytest.raises(ValueError, match="supports the norms linf, l2"):
        attacks.create("md", ThreatModel("l1", 1.0))


# --- the temperature option ----------------------------------------------------------------


class Scaled(nn.Module):
    """``factor`` times the logits of ``inner``: a distilled network (trained at temperature
    ``factor``, deployed at 1) in miniature."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.inner(x)


@pytest.mark.parametrize(("name", "opts"), [("pgd", {"steps": 10}), ("apgd-ce", {"steps": 20})])
def test_temperature_attacks_a_saturated_softmax(name, opts, toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    model = Scaled(toy_model, 1000.0)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    assert (grad == 0).all()  # float32 softmax saturated: the CE gradient underflows to 0
    threat = ThreatModel("linf", 0.3)
    plain = attacks.create(name, threat, loss="ce", **opts)
    assert plain(model, x, y).robust_accuracy == 1.0
    hot = attacks.create(name, threat, loss="ce", temperature=1000, **opts)
    assert hot(model, x, y).robust_accuracy == 0.0
    assert hot.config()["temperature"] == 1000.0
    assert "temperature" not in plain.config()  # T = 1: the configs of before, unchanged


def test_tempered_is_the_loss_of_the_scaled_logits():
    g = torch.Generator().manual_seed(0)
    z, y = 50 * torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])
    for fn in (cross_entropy, cw_margin, dlr):
        for targeted in (False, True):
            assert torch.allclose(tempered(fn, 100.0)(z, y, targeted), fn(z / 100, y, targeted))
        assert tempered(fn, 1.0) is fn


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "100", True])
@pytest.mark.parametrize("name", ["pgd", "apgd-ce"])
def test_bad_temperature(name, bad):
    with pytest.raises(ValueError, match="temperature must be"):
        attacks.create(name, ThreatModel("linf", 0.1), temperature=bad)
