"""Objectives with a teacher or a special head: distillation, mmc, rst."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import NUM_CLASSES, TinyCNN, make_quadrants
from robustlab import models
from robustlab.models.heads import MMCHead, mmc_centers
from robustlab.training.objectives import create

KW = {"num_classes": NUM_CLASSES, "input_size": 16}


def _model(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyCNN()


def _noisy_quadrants(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_quadrants plus pixel noise: a natural model stays unsaturated on it."""
    x, y = make_quadrants(n, seed=seed)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100))
    return (x + 0.3 * noise).clamp(0, 1), y


def _fit(model: nn.Module, data, objective: str, **options) -> nn.Module:
    rl.training.fit(
        model,
        data,
        objective=objective,
        objective_options=options,
        epochs=4,
        batch_size=64,
        optimizer="adam",
        lr=0.01,
        weight_decay=0.0,
        schedule="constant",
    )
    return model.eval()


# --- distillation ---------------------------------------------------------------------------


def test_distillation_teacher_stage_is_cross_entropy_at_temperature(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    model = _model(0)
    obj = create("distillation", temperature=7.0)
    z = model(x) / 7.0
    by_hand = (torch.logsumexp(z, 1) - z[torch.arange(16), y]).mean()
    torch.testing.assert_close(obj(model, x, y), by_hand)
    assert not obj.needs_threat and obj.config() == {
        "name": "distillation",
        "temperature": 7.0,
        "teacher": None,
    }


def test_distillation_student_loss_is_soft_cross_entropy(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    student, teacher = _model(0).train(), _model(1).train()
    obj = create("distillation", temperature=3.0, teacher=teacher)
    loss = obj(student, x, y)
    with torch.no_grad():
        t = teacher.eval()(x) / 3.0
    q = t.exp() / t.exp().sum(1, keepdim=True)
    s = student(x) / 3.0
    by_hand = -(q * (s - torch.logsumexp(s, 1, keepdim=True))).sum(1).mean()
    torch.testing.assert_close(loss, by_hand)
    teacher.train()
    obj(student, x, y).backward()
    assert teacher.training and student.training  # modes restored
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained
    assert all(p.grad is not None for p in student.parameters())
    assert obj.config()["teacher"] == "<module>"
    with pytest.raises(ValueError, match="same classes"):
        create("distillation", teacher=nn.Sequential(nn.Flatten(), nn.Linear(256, 3)))(
            student, x, y
        )


def test_distilled_student_at_t1_masks_gradients():
    data, (xt, yt) = _noisy_quadrants(512, 5), _noisy_quadrants(256, 1)
    T = 100.0
    natural = _fit(_model(0), data, "natural")
    teacher = _fit(_model(1), data, "distillation", temperature=T)
    student = _fit(_model(2), data, "distillation", temperature=T, teacher=teacher)

    def grad_norm(f) -> float:  # median over samples of ||d CE(f(x), y) / dx||
        xx = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(f(xx), yt, reduction="sum"), xx)
        return g.flatten(1).norm(dim=1).median().item()

    assert (student(xt).argmax(1) == yt).float().mean() > 0.9
    # measured: natural ~1e-3, student at T = 1 ~1e-14, student at T ~0.1
    assert grad_norm(student) < 1e-3 * grad_norm(natural)
    assert grad_norm(lambda v: student(v) / T) > 1e3 * grad_norm(student)


def test_distillation_teacher_checkpoint_is_loaded_lazily_and_frozen(tmp_path, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    teacher = models.create("lenet", **KW)
    path = models.save(teacher, tmp_path / "teacher" / "model.safetensors")
    obj = create("distillation", teacher=str(path))
    assert obj.config()["teacher"] == str(path)
    json.dumps(obj.config())
    student = models.create("lenet", **KW)
    obj.setup(student, x, y)
    loaded = obj._teacher
    assert loaded is not None and not any(p.requires_grad for p in loaded.parameters())
    assert loaded not in list(student.modules())
    expected = create("distillation", teacher=teacher)(student, x, y)
    torch.testing.assert_close(obj(student, x, y), expected)
    missing = create("distillation", teacher=tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        missing(student, x, y)
    with pytest.raises(TypeError, match="path"):
        create("distillation", teacher=3)
    with pytest.raises(ValueError, match="temperature"):
        create("distillation", temperature=0)


# --- mmc ------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3, 10, 100])
def test_mmc_centers_are_a_regular_simplex(classes):
    mu = mmc_centers(classes, classes + 4, c_mm=10.0)
    gram = mu @ mu.T
    expected = torch.full_like(gram, -10.0 / (classes - 1)).fill_diagonal_(10.0)
    torch.testing.assert_close(gram, expected, atol=1e-9, rtol=0)
    assert torch.equal(mu[:, classes - 1 :], torch.zeros_like(mu[:, classes - 1 :]))
    assert torch.equal(mu, mmc_centers(classes, classes + 4, c_mm=10.0))  # deterministic
    with pytest.raises(ValueError, match="feature dimension"):
        mmc_centers(classes, classes - 2, 10.0)


def test_mmc_head_replaces_the_classifier():
    model = models.create("lenet", head="mmc", head_options={"c_mm": 4.0}, **KW)
    head = model.classifier[4]
    assert isinstance(head, MMCHead) and head.dense.in_features == 84
    assert "classifier.4.centers" in model.state_dict()
    assert all(p is not head.centers for p in model.parameters())  # a buffer, never trained
    assert model.robustlab_arch["kwargs"]["head_options"] == {"c_mm": 4.0, "feature_dim": 84}
    torch.testing.assert_close(head.centers.square().sum(1), torch.full((4,), 4.0))
    with pytest.raises(ValueError, match="feature_dim"):
        models.create("lenet", num_classes=100, head="mmc")  # 84 features < 99
    models.create("lenet", num_classes=100, head="mmc", head_options={"feature_dim": 99})
    with pytest.raises(ValueError, match="unknown head"):
        models.create("lenet", head="cosine")


def test_mmc_loss_by_hand_and_training(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    model = models.create("lenet", head="mmc", **KW)
    head = model.classifier[4]
    feats = []
    handle = head.dense.register_forward_hook(lambda m, i, o: feats.append(o))
    loss = create("mmc")(model, x, y)
    handle.remove()
    z, mu = feats[0], head.centers
    torch.testing.assert_close(loss, 0.5 * (z - mu[y]).square().sum(1).mean())
    dist = (z[:, None, :] - mu[None]).square().sum(-1)
    torch.testing.assert_close(model(x), -dist, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="head='mmc'"):
        create("mmc")(TinyCNN(), x, y)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = models.create("lenet", head="mmc", **KW)
    _fit(model, make_quadrants(512, seed=5), "mmc")
    assert (model(toy_data[0]).argmax(1) == toy_data[1]).float().mean() > 0.9


# --- rst ------------------------------------------------------------------------------------


def test_rst_pseudo_labels_only_the_pool(toy_data, toy_model, caplog):
    x, y = toy_data
    y_before = y.clone()
    for teacher, good in ((toy_model, True), (_model(3), False)):
        obj = create("rst", teacher=teacher, labeled=100, base="pgd-at")
        with caplog.at_level(logging.INFO, logger="robustlab.training.objectives.rst"):
            x2, y2 = obj.setup(_model(0), x, y)
        assert torch.equal(y, y_before) and x2 is x  # the caller's labels are untouched
        with torch.no_grad():
            preds = teacher.eval()(x[100:]).argmax(1)
        assert torch.equal(y2[:100], y[:100]) and torch.equal(y2[100:], preds)
        errors = int((preds != y[100:]).sum())
        assert obj.pseudo_label_errors == errors
        assert obj.pseudo_label_accuracy == pytest.approx(1 - errors / 156)
        assert (obj.pseudo_label_accuracy > 0.95) == good
        assert "156 pseudo-labels" in caplog.text
    with pytest.raises(ValueError, match="at most 256"):
        create("rst", teacher=toy_model, labeled=300, base="pgd-at").setup(toy_model, x, y)
    with pytest.raises(ValueError, match="labeled"):
        create("rst", teacher=toy_model)


def test_rst_delegates_to_its_base(tmp_path, toy_data, toy_model):
    x, y = toy_data[0][:16], toy_data[1][:16]
    threat = rl.ThreatModel("linf", 0.1)
    path = models.save(models.create("lenet", **KW), tmp_path / "model.safetensors")
    obj = create("rst", teacher=path, labeled=8, base="pgd-at", base_options={"steps": 2})
    assert obj.config() == {
        "name": "rst",
        "teacher": str(path),
        "labeled": 8,
        "base": "pgd-at",
        "base_options": {"steps": 2, "step_size": None, "random_start": True},
    }
    student = copy.deepcopy(toy_model)
    loss = obj(student, x, y, threat=threat, generator=torch.Generator().manual_seed(1))
    base = create("pgd-at", steps=2)
    expected = base(student, x, y, threat=threat, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, expected)
    default = create("rst", teacher=path, labeled=8)
    assert default.config()["base"] == "trades" and default.base.config()["beta"] == 6.0

    calls = []

    class Spy:
        def begin_epoch(self, epoch, epochs):
            calls.append(("begin_epoch", epoch, epochs))

        def after_backward(self):
            calls.append(("after_backward",))

        def state_dict(self):
            return {"delta": torch.ones(1)}

        def load_state_dict(self, state):
            calls.append(("load_state_dict", sorted(state)))

    obj.base = Spy()
    obj.begin_epoch(2, 5)
    obj.after_backward()
    obj.load_state_dict(obj.state_dict())
    assert calls == [("begin_epoch", 2, 5), ("after_backward",), ("load_state_dict", ["delta"])]


def test_rst_trains_through_fit_on_the_pseudo_labels(toy_data):
    class AlwaysZero(nn.Module):  # a teacher that labels the whole pool as class 0
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.one_hot(torch.zeros(len(x), dtype=torch.long), NUM_CLASSES).float()

    model = _model(0)
    rl.training.fit(
        model,
        toy_data,
        objective="rst",
        threat=rl.ThreatModel("linf", 0.05),
        epochs=2,
        batch_size=64,
        optimizer="adam",
        lr=0.01,
        objective_options={
            "teacher": AlwaysZero(),
            "labeled": 16,
            "base": "pgd-at",
            "base_options": {"steps": 1},
        },
    )
    # trained on the pseudo-labels (the fit calls setup), not on the hidden true labels
    assert (model.eval()(toy_data[0]).argmax(1) == 0).float().mean() > 0.9
