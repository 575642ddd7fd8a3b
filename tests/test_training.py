"""Trainer: schedules, objectives, checkpoints, JSONL log and exact resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import robustlab as rl
from helpers import TinyCNN, make_quadrants
from robustlab.training import lr_at


def test_schedules():
    assert lr_at("constant", 0.1, 3.3, 10) == 0.1
    assert lr_at("piecewise", 0.1, 4.99, 10) == 0.1
    assert lr_at("piecewise", 0.1, 5.0, 10) == pytest.approx(0.01)
    assert lr_at("piecewise", 0.1, 7.9, 10) == pytest.approx(0.01)
    assert lr_at("piecewise", 0.1, 8.0, 10) == pytest.approx(0.001)
    assert lr_at("cosine", 0.1, 0, 10) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 5, 10) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 10, 10) == pytest.approx(0.0)
    assert lr_at("cyclic", 0.2, 4, 10) == pytest.approx(0.2)
    assert lr_at("cyclic", 0.2, 2, 10) == pytest.approx(0.1)
    assert lr_at("cyclic", 0.2, 10, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="valid schedules"):
        lr_at("linear", 0.1, 0, 1)


def test_objectives_registered():
    assert {"natural", "pgd-at"} <= set(rl.training.objectives())
    with pytest.raises(ValueError, match="valid objectives are"):
        rl.training.fit(TinyCNN(), make_quadrants(8), objective="tradez")


def test_pgd_at_makes_a_model_more_robust(toy_data):
    x, y = make_quadrants(512, seed=5)
    threat = rl.ThreatModel("linf", 0.18)
    accs = {}
    for objective in ("natural", "pgd-at"):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same initial weights for both
            model = TinyCNN()
        rl.training.fit(
            model,
            (x, y),
            objective=objective,
            threat=threat,
            epochs=8,
            batch_size=64,
            optimizer="adam",
            lr=0.01,
            schedule="cosine",
            weight_decay=0.0,
            objective_options={"steps": 5} if objective == "pgd-at" else {},
        )
        accs[objective] = rl.attacks.create("pgd", threat, steps=20)(model, *toy_data)
    # measured over init seeds 0-3: natural 0.20-0.45, pgd-at 0.54-0.68 (gap >= 0.22)
    gap = accs["pgd-at"].robust_accuracy - accs["natural"].robust_accuracy
    assert gap > 0.15, {k: v.robust_accuracy for k, v in accs.items()}


def test_fit_writes_checkpoint_and_log(tmp_path, toy_data):
    with pytest.raises(ValueError, match="models.create"):
        rl.training.fit(TinyCNN(), toy_data, epochs=1, out=tmp_path)
    model = rl.models.create("lenet", num_classes=4, input_size=16)
    before = torch.get_rng_state()
    hist = rl.training.fit(
        model,
        toy_data,
        objective="natural",
        epochs=3,
        batch_size=32,
        optimizer="adam",
        lr=0.01,
        out=tmp_path,
        val=toy_data,
        seed=3,
        val_attack={"name": "fgsm"},
        threat=rl.ThreatModel("linf", 0.1),
    )
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    lines = [json.loads(s) for s in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == json.loads(json.dumps(hist))
    assert {"train_loss", "lr", "train_time_s", "val_clean_acc", "val_robust_acc"} <= set(lines[0])
    assert lines[-1]["val_clean_acc"] > 0.9


def test_models_checkpoint_meta(tmp_path, toy_data):
    model = rl.models.create("lenet", num_classes=4, input_size=16)
    rl.training.fit(
        model,
        toy_data,
        objective="pgd-at",
        threat=rl.ThreatModel("linf", 0.1),
        epochs=1,
        batch_size=128,
        out=tmp_path,
        objective_options={"steps": 1},
        dataset="toy",
    )
    m = rl.models.load(tmp_path / "model.safetensors")
    meta = m.robustlab_meta
    assert meta["epoch"] == 1 and meta["objective"] == "pgd-at" and meta["dataset"] == "toy"
    assert meta["threat"] == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}
    x = toy_data[0][:4]
    torch.testing.assert_close(m(x), model.eval()(x))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


class Crash(Exception):
    pass


def _crash_after(epoch: int):
    def callback(rec):
        if rec["epoch"] == epoch:
            raise Crash

    return callback


@pytest.mark.parametrize("drop", [0.0, 0.5])  # dropout draws from the global RNG
def test_resume_after_a_crash_is_exact(tmp_path, toy_data, drop):
    kw = dict(
        objective="pgd-at",
        threat=rl.ThreatModel("linf", 0.1),
        batch_size=32,
        lr=0.02,
        objective_options={"steps": 2},
        schedule="cosine",
        epochs=3,
    )

    def make():  # the same initial weights each time
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return rl.models.create("smallcnn", num_classes=4, input_size=16, drop=drop)

    rl.training.fit(make(), toy_data, out=tmp_path / "full", **kw)
    with pytest.raises(Crash):
        rl.training.fit(make(), toy_data, out=tmp_path / "part", callback=_crash_after(1), **kw)
    assert len((tmp_path / "part/train_log.jsonl").read_text().splitlines()) == 1
    rl.training.fit(make(), toy_data, out=tmp_path / "part", resume=True, **kw)
    a = _weights(tmp_path / "full/model.safetensors")
    b = _weights(tmp_path / "part/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_overwrites(tmp_path, toy_data):
    kw = dict(objective="natural", batch_size=64, epochs=1)
    model = rl.models.create("lenet", num_classes=4, input_size=16)
    rl.training.fit(model, toy_data, out=tmp_path, **kw)
    with pytest.raises(FileExistsError, match="--resume"):
        rl.training.fit(model, toy_data, out=tmp_path, **kw)
    with pytest.raises(ValueError, match="lr"):
        rl.training.fit(model, toy_data, out=tmp_path, resume=True, **(kw | {"lr": 0.5}))
    with pytest.raises(FileNotFoundError, match="without --resume"):
        rl.training.fit(model, toy_data, out=tmp_path / "new", resume=True, **kw)


RECIPE = """
[data]
dataset = "fashion-mnist"
val_n = 64
[model]
arch = "smallcnn"
[threat]
norm = "linf"
eps = "0.1"
[train]
objective = "pgd-at"
epochs = 3
batch_size = 32
optimizer = "sgd"
lr = 0.05
schedule = "piecewise"
seed = 7
[objective]
steps = 3
[val_attack]
name = "pgd"
steps = 3
"""


def _train_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "robustlab",
        "train",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


FREE_AT = {
    'objective = "pgd-at"': 'objective = "free-at"',
    "epochs = 3": "epochs = 6",
    "steps = 3\n[val": "replays = 2\n[val",
}


@pytest.mark.parametrize("objective", ["pgd-at", "free-at"])
def test_kill_and_resume_gives_identical_weights(tmp_path, fake_fmnist, objective):
    """Kill a CLI training run (SIGKILL) after its first epoch, resume it, and compare with an
    uninterrupted run: the weights must be identical (free-at: its carried perturbation is
    part of the checkpoint)."""
    env = os.environ | {
        "ROBUSTLAB_DATA": str(fake_fmnist),
        "ROBUSTLAB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cfg = tmp_path / "recipe.toml"
    recipe = RECIPE
    if objective == "free-at":
        for a, b in FREE_AT.items():
            assert a in recipe
            recipe = recipe.replace(a, b)
    cfg.write_text(recipe)
    subprocess.run(_train_cmd(cfg, tmp_path / "full"), env=env, check=True, timeout=300)

    proc = subprocess.Popen(_train_cmd(cfg, tmp_path / "killed"), env=env)
    log = tmp_path / "killed/train_log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = len(log.read_text().splitlines())
    assert epochs_done < 3, "the run finished before the kill: make the epochs longer"
    subprocess.run(
        _train_cmd(cfg, tmp_path / "killed", "--resume"), env=env, check=True, timeout=300
    )
    a = _weights(tmp_path / "full/model.safetensors")
    b = _weights(tmp_path / "killed/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_log = (tmp_path / "full/train_log.jsonl").read_text().splitlines()
    resumed_log = log.read_text().splitlines()
    strip = lambda s: {k: v for k, v in json.loads(s).items() if not k.endswith("_s")}  # noqa: E731
    assert [strip(s) for s in full_log] == [strip(s) for s in resumed_log]
