"""The trainer's after-step hooks (the objective's and the model's), the hold-out feedback to
the objective, curriculum judging the hold-out, and Parseval networks' retraction against its
formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.models.lipschitz import PARSEVAL_BETA, ParsevalRetraction, parseval_layers
from robustlab.models.lipschitz import apply as apply_lipschitz
from robustlab.training.objectives.natural import Natural

THREAT = rl.ThreatModel("linf", 0.1)


def _model(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return rl.models.create("lenet", num_classes=4, input_size=16, **kw)


# --- Objective.after_step -----------------------------------------------------------------
def test_after_step_follows_every_optimiser_step(toy_data, monkeypatch):
    events = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(
        torch.optim.SGD, "step", lambda self, *a: events.append("step") or step(self)
    )
    monkeypatch.setattr(Natural, "after_step", lambda self: events.append("after"))
    rl.training.fit(_model(), toy_data, objective="natural", epochs=2, batch_size=64)
    assert events == ["step", "after"] * (2 * 4)  # 2 passes x 4 batches of 256 points


# --- Objective.record_validation ----------------------------------------------------------
def test_record_validation_gets_the_holdout_only(toy_data, monkeypatch):
    calls = []
    monkeypatch.setattr(Natural, "record_validation", lambda self, m: calls.append(dict(m)))
    val = (toy_data[0][:20], toy_data[1][:20])
    hist = rl.training.fit(
        _model(),
        toy_data,
        objective="natural",
        threat=THREAT,
        epochs=3,
        batch_size=64,
        val_split=32,
        val_every=2,
        val=val,
    )
    assert calls[0] == {"holdout_n": 32}  # announced before training
    # checks after passes 2 and 3 (every 2, and the last), with the log's hold-out values
    want = [
        {k: v for k, v in rec.items() if k.startswith("holdout_")}
        for rec in hist
        if "holdout_robust_acc" in rec
    ]
    assert calls[1:] == want and len(want) == 2
    assert all("val_clean_acc" not in c for c in calls)  # the watched test set stays out
    calls.clear()
    rl.training.fit(_model(), toy_data, objective="natural", epochs=1, batch_size=64, val=val)
    assert calls == []  # no hold-out, no call


# --- curriculum on the hold-out -----------------------------------------------------------
def test_curriculum_judges_the_holdout_when_there_is_one():
    obj = rl.training.create_objective("curriculum", max_steps=3, threshold=0.5, patience=None)
    obj.record_validation({"holdout_n": 10})
    obj.begin_epoch(0, 9)
    obj.record(100, 100)  # training batches all correct: ignored with a hold-out
    obj.record_validation({"holdout_robust_acc": 0.3, "holdout_n": 10})
    obj.begin_epoch(1, 9)
    assert obj.lesson == 0
    obj.record(0, 100)  # training batches all wrong: ignored too
    obj.record_validation({"holdout_robust_acc": 0.5, "holdout_n": 10})
    obj.begin_epoch(2, 9)
    assert obj.lesson == 1
    # without a hold-out the training batches decide, as before
    plain = rl.training.create_objective("curriculum", max_steps=3, threshold=0.5, patience=None)
    plain.begin_epoch(0, 9)
    plain.record(100, 100)
    plain.begin_epoch(1, 9)
    assert plain.lesson == 1


def test_curriculum_patience_counts_holdout_checks_and_resumes():
    obj = rl.training.create_objective("curriculum", max_steps=3, patience=1)
    obj.record_validation({"holdout_robust_acc": 0.5})
    obj.begin_epoch(1, 9)
    for e in range(2, 5):  # epochs without a check judge nothing
        obj.record(0, 100)
        obj.begin_epoch(e, 9)
    assert (obj.lesson, obj.stale) == (0, 0)
    obj.record_validation({"holdout_robust_acc": 0.4})
    again = rl.training.create_objective("curriculum", max_steps=3, patience=1)
    again.load_state_dict(obj.state_dict())  # the pending check survives a resume
    again.begin_epoch(5, 9)
    assert again.lesson == 1
    old = rl.training.create_objective("curriculum", max_steps=3, patience=1)
    old.load_state_dict({"schedule": torch.tensor([2.0, 0.5, 1.0, 3.0, 4.0], dtype=torch.float64)})
    assert (old.lesson, old.holdout, old.pending) == (2, False, -1.0)  # a state saved before


def test_curriculum_in_a_run_with_a_holdout(toy_data):
    """threshold 0 is reached by any accuracy: the lesson rises after each check only, and
    the training log says which lesson each pass trained in."""
    lessons = []
    obj_cls = rl.training.OBJECTIVES.get("curriculum")
    begin = obj_cls.begin_epoch

    def spy(self, epoch, epochs):
        begin(self, epoch, epochs)
        lessons.append(self.lesson)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(obj_cls, "begin_epoch", spy)
        history = rl.training.fit(
            _model(),
            toy_data,
            objective="curriculum",
            threat=THREAT,
            epochs=4,
            batch_size=128,
            val_split=16,
            val_every=2,
            overfit_probe="off",
            objective_options={"max_steps": 2, "threshold": 0.0, "patience": None},
        )
    assert lessons == [0, 0, 1, 1]  # the first check ends pass 2
    assert [r["lesson"] for r in history] == lessons
    plain = rl.training.fit(_model(), toy_data, objective="pgd-at", threat=THREAT, epochs=1,
                            batch_size=128, overfit_probe="off",
                            objective_options={"steps": 1})  # fmt: skip
    assert "lesson" not in plain[0]  # an objective without a log of its own adds nothing


# --- Parseval networks --------------------------------------------------------------------
def test_parseval_retraction_by_hand():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    ParsevalRetraction(layer, beta=0.1)()
    # singular values s -> s + beta s (1 - s^2): 2 -> 1.4, 0.5 -> 0.5375
    assert torch.allclose(layer.weight, torch.tensor([[1.4, 0.0], [0.0, 0.5375]]))
    conv = nn.Conv2d(3, 4, 3)
    w = conv.weight.detach().double().flatten(1).numpy() * 3
    with torch.no_grad():
        conv.weight.mul_(3)
    ParsevalRetraction(conv)()
    want = (1 + PARSEVAL_BETA) * w - PARSEVAL_BETA * w @ w.T @ w
    np.testing.assert_allclose(
        conv.weight.detach().flatten(1).double().numpy(), want, rtol=1e-5, atol=1e-7
    )

    def gap(m):
        return float(np.linalg.norm(m @ m.T - np.eye(len(m))))

    assert gap(want) < gap(w)  # towards orthogonal rows (4 rows of 27 entries)


def test_trainer_runs_the_models_retraction_after_each_step(toy_data, monkeypatch):
    model = _model(lipschitz="parseval")
    layers = parseval_layers(model)
    assert (
        len(layers) == len([m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]) > 0
    )
    start = [m.weight.detach().double().flatten(1).numpy().copy() for m in layers]
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: None)  # only the hook moves
    rl.training.fit(model, toy_data, objective="natural", epochs=1, batch_size=64)
    for m, w in zip(layers, start, strict=True):
        for _ in range(4):  # 4 optimiser steps
            w = (1 + PARSEVAL_BETA) * w - PARSEVAL_BETA * w @ w.T @ w
        np.testing.assert_allclose(
            m.weight.detach().flatten(1).double().numpy(), w, rtol=1e-4, atol=1e-6
        )


def test_parseval_round_trips_and_leaves_frozen_weights_alone(tmp_path):
    torch.manual_seed(0)
    model = rl.models.create("smallcnn", input_size=16, lipschitz="parseval")
    assert len(parseval_layers(model)) == 7  # 4 convs, 3 linears
    rl.models.save(model, tmp_path / "p.safetensors", meta={})
    loaded = rl.models.load(tmp_path / "p.safetensors")
    assert loaded.robustlab_arch["kwargs"]["lipschitz"] == "parseval"
    assert len(parseval_layers(loaded)) == 7
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[1].weight.requires_grad_(False)  # a fixed layer is not the optimiser's to move
    apply_lipschitz(net, "parseval")
    assert parseval_layers(net) == [net[0]]
