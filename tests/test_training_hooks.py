"""The trainer's side of the objective hooks: replays, carried state across a resume, the
catastrophic-overfitting probe, bf16 autocast and channels_last."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import robustlab as rl
from robustlab.training import probe as probe_mod

THREAT = rl.ThreatModel("linf", 0.1)


def _model(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return rl.models.create("lenet", num_classes=4, input_size=16, **kw)


def test_replays_make_fewer_passes_with_as_many_steps(toy_data, monkeypatch):
    steps = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: steps.append(1) or step(self))
    hist = rl.training.fit(
        _model(),
        toy_data,
        objective="free-at",
        threat=THREAT,
        objective_options={"replays": 3},
        epochs=5,
        batch_size=64,
        overfit_probe="off",
    )
    assert [r["epoch"] for r in hist] == [1, 2]  # ceil(5 / 3) passes
    assert [r["epochs_equivalent"] for r in hist] == [3, 6]
    assert len(steps) == 2 * 4 * 3  # passes x batches x replays


class Crash(Exception):
    pass


def test_free_at_resume_after_crash_is_exact(tmp_path, toy_data):
    """free-at carries its perturbation across minibatches and epochs: a run that crashes after
    its first pass and resumes must end with the uninterrupted run's weights."""
    kw = dict(
        objective="free-at",
        threat=THREAT,
        objective_options={"replays": 2},
        epochs=6,
        batch_size=48,
        lr=0.02,
        schedule="cosine",
        overfit_probe="off",
    )

    def crash(rec):
        if rec["epoch"] == 1:
            raise Crash

    rl.training.fit(_model(), toy_data, out=tmp_path / "full", **kw)
    with pytest.raises(Crash):
        rl.training.fit(_model(), toy_data, out=tmp_path / "part", callback=crash, **kw)
    state = load_file(str(tmp_path / "part/train_state.safetensors"))
    assert "extra.objective.delta" in state  # the carried perturbation is in the checkpoint
    rl.training.fit(_model(), toy_data, out=tmp_path / "part", resume=True, **kw)
    a = load_file(str(tmp_path / "full/model.safetensors"))
    b = load_file(str(tmp_path / "part/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _scripted_probe(monkeypatch, values):
    it = iter(values)
    monkeypatch.setattr(probe_mod.OverfitProbe, "measure", lambda self, model, gen: next(it))


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_overfit_probe_restores_the_last_good_epoch(tmp_path, toy_data, monkeypatch, action):
    _scripted_probe(monkeypatch, [0.8, 0.7, 0.3, 0.75])  # epoch 3 collapses
    weights = {}

    def keep(rec):
        weights[rec["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    model = _model()
    hist = rl.training.fit(
        model,
        toy_data,
        objective="fast-at",
        threat=THREAT,
        epochs=4,
        batch_size=64,
        lr=0.02,
        overfit_probe=action,
        callback=keep,
        out=tmp_path,
    )
    assert [r["probe_robust_acc"] for r in hist][:3] == [0.8, 0.7, 0.3]
    assert hist[2]["overfit"] == ("stopped" if action == "stop" else "rolled back")
    assert all(torch.equal(weights[3][k], weights[2][k]) for k in weights[2])  # restored
    if action == "stop":
        assert len(hist) == 3
        again = rl.training.fit(
            _model(),
            toy_data,
            objective="fast-at",
            threat=THREAT,
            epochs=4,
            batch_size=64,
            lr=0.02,
            overfit_probe=action,
            out=tmp_path,
            resume=True,
        )
        assert len(again) == 3  # a stopped run stays stopped
    else:
        assert len(hist) == 4 and "overfit" not in hist[3]
        assert not all(torch.equal(weights[4][k], weights[3][k]) for k in weights[3])


def test_overfit_probe_is_on_by_default_for_single_step_objectives(toy_data):
    kw = dict(threat=THREAT, epochs=1, batch_size=128)
    assert "probe_robust_acc" in rl.training.fit(_model(), toy_data, objective="fast-at", **kw)[0]
    assert (
        "probe_robust_acc"
        not in rl.training.fit(
            _model(), toy_data, objective="pgd-at", objective_options={"steps": 1}, **kw
        )[0]
    )
    with pytest.raises(ValueError, match="overfit_probe must be one of"):
        rl.training.fit(_model(), toy_data, objective="fast-at", overfit_probe="yes", **kw)


def test_probe_detects_a_collapse_of_pgd_accuracy(toy_model, toy_data):
    x, y = toy_data
    probe = probe_mod.OverfitProbe("stop", x[:64], y[:64], rl.ThreatModel("linf", 0.3))
    weak = probe.measure(toy_model, torch.Generator().manual_seed(0))
    strong = probe_mod.OverfitProbe("stop", x[:64], y[:64], rl.ThreatModel("linf", 0.01))
    assert strong.measure(toy_model, torch.Generator().manual_seed(0)) > weak + 0.2
    assert probe.collapsed(0.1, 0.5) and not probe.collapsed(0.4, 0.5)
    assert not probe.collapsed(0.0, None)


def test_bf16_and_channels_last(toy_data):
    model = _model()
    hist = rl.training.fit(
        model,
        toy_data,
        objective="pgd-at",
        threat=THREAT,
        epochs=2,
        batch_size=64,
        objective_options={"steps": 2},
        precision="bf16",
        channels_last=True,
        optimizer="adam",
        lr=0.01,
    )
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in hist)
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="precision must be one of"):
        rl.training.fit(_model(), toy_data, precision="fp8")


def test_in_memory_teacher_run_checkpoints_and_resumes(tmp_path, toy_data):
    kw = dict(
        objective="distillation",
        epochs=2,
        batch_size=128,
        out=tmp_path,
        objective_options={"teacher": _model().eval(), "temperature": 2.0},
    )
    with pytest.raises(Crash):
        rl.training.fit(_model(), toy_data, callback=lambda r: (_ for _ in ()).throw(Crash), **kw)
    rl.training.fit(_model(), toy_data, resume=True, **kw)
    meta = rl.models.load(tmp_path / "model.safetensors").robustlab_meta
    assert meta["objective_config"]["teacher"] == "<module>" and meta["epoch"] == 2
    assert meta["train_config"]["objective_options"]["temperature"] == 2.0
