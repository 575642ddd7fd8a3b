"""Trainer features of issue 23: hold-out selection with model_best, EMA and SWA weight
averages, AWP, augmentation and label smoothing, each against its definition on a case with a
known answer; exact resume with their state; the same result on one and on two processes.

Run as a script (``python test_trainer_features.py OUT``), this file is the worker of the
two-process test."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import robustlab as rl  # noqa: E402
from helpers import (  # noqa: E402
    assert_gloo_ended,
    launch,
    launch_env,
    launcher,
    make_quadrants,
    write_gloo_threads,
)
from robustlab import distributed  # noqa: E402
from robustlab.report.html import render_html  # noqa: E402
from robustlab.report.runs import load_run  # noqa: E402
from robustlab.training import TrainConfig, averaging, features  # noqa: E402
from robustlab.training.augment import Augment, flips_for  # noqa: E402
from robustlab.training.averaging import WeightAverage, ema_decay  # noqa: E402
from robustlab.training.awp import AWP  # noqa: E402
from robustlab.training.objectives.trades import trades_loss  # noqa: E402
from robustlab.training.selection import best_epoch, hold_out  # noqa: E402
from robustlab.training.split_loss import SPLITS, TrainStep  # noqa: E402

THREAT = rl.ThreatModel("linf", 0.1)


def _lenet() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return rl.models.create("lenet", num_classes=4, input_size=16)


def _flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


# --- EMA and SWA --------------------------------------------------------------------------------
def test_ema_follows_the_numpy_recurrence():
    model = nn.Linear(3, 2)
    avg = WeightAverage(model, "ema", decay=0.9)
    expected = _flat(model)
    g = torch.Generator().manual_seed(0)
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        avg.after_step(model)
        tau = min(0.9, (1 + t) / (10 + t))
        expected = tau * expected + (1 - tau) * _flat(model)
        np.testing.assert_allclose(_flat(avg.model), expected, rtol=1e-5, atol=1e-6)
    assert ema_decay(0, 0.995) == pytest.approx(0.1) and ema_decay(10_000, 0.995) == 0.995


def test_trainer_ema_is_the_average_of_its_steps(monkeypatch, toy_data):
    """The raw weights after every optimiser step, averaged by the recurrence from the initial
    weights, give the model the run ends with (and model.safetensors)."""
    seen, original = [], WeightAverage.after_step

    def record(self, model):
        seen.append(_flat(model))
        original(self, model)

    monkeypatch.setattr(averaging.WeightAverage, "after_step", record)
    model = _lenet()
    start = _flat(model)
    rl.training.fit(
        model,
        (toy_data[0][:128], toy_data[1][:128]),
        epochs=2,
        batch_size=32,
        lr=0.05,
        average="ema",
        ema_decay=0.8,
    )
    assert len(seen) == 8
    expected = start
    for t, w in enumerate(seen):
        tau = min(0.8, (1 + t) / (10 + t))
        expected = tau * expected + (1 - tau) * w
    np.testing.assert_allclose(_flat(model), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[-1], expected)  # the average, not the last raw weights


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def test_swa_is_the_mean_of_the_epochs_after_start_with_batchnorm_recomputed():
    torch.manual_seed(0)
    model = _ConvBN()
    avg = WeightAverage(model, "swa", start=1)
    x = torch.rand(16, 1, 6, 6)
    weights = []
    for epoch in (1, 2, 3, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape))
        weights.append(_flat(model))
        avg.end_epoch(model, epoch, [x])
        assert avg.ready == (epoch > 1) and avg.count == max(0, epoch - 1)
    np.testing.assert_allclose(_flat(avg.model), np.mean(weights[1:], axis=0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # one batch: the statistics of the averaged conv's outputs
        z = avg.model.conv(x)
    torch.testing.assert_close(avg.model.bn.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(avg.model.bn.running_var, z.var((0, 2, 3), unbiased=True))
    assert not torch.equal(model.bn.running_mean, avg.model.bn.running_mean)


# --- AWP ----------------------------------------------------------------------------------------
def _two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def test_awp_perturbation_is_gamma_times_weight_norm_along_the_gradient():
    model = _two_layer().train()
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    ref = copy.deepcopy(model)
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref[0].weight, ref[3].weight])
    buffers = [b.clone() for b in model.buffers()]
    v = AWP(gamma=0.01).perturbation(model, lambda: F.cross_entropy(model(x), y))
    assert [p for p, _ in v] == [model[0].weight, model[3].weight]  # no bias, no BatchNorm
    for (p, d), gl in zip(v, g, strict=True):
        torch.testing.assert_close(d, 0.01 * p.norm() / gl.norm() * gl)
        assert d.norm().item() == pytest.approx(0.01 * p.norm().item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    w = model[0].weight.detach().clone()
    AWP.apply(v, 1.0)
    torch.testing.assert_close(model[0].weight, w + v[0][1])
    AWP.apply(v, -1.0)
    torch.testing.assert_close(model[0].weight, w)


def test_awp_step_applies_the_gradient_at_w_plus_v_to_w(toy_data):
    """One SGD step of pgd-at with AWP: w <- w - lr * grad CE(f_{w+v}(x'), y), x' crafted at w
    and v = gamma ||w|| g / ||g|| from the gradient g at w."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = toy_data[0][:32], toy_data[1][:32]
    ref = copy.deepcopy(model)
    opts = {"steps": 1, "random_start": False}
    rl.training.fit(
        model,
        (x, y),
        objective="pgd-at",
        threat=THREAT,
        objective_options=opts,
        epochs=1,
        batch_size=32,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        awp=True,
        awp_gamma=0.02,
        awp_warmup=0,
    )
    pgd = rl.training.create_objective("pgd-at", **opts)
    x_adv = pgd.adversarial(ref, x, y, THREAT, torch.Generator().manual_seed(0))
    g = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), [ref[1].weight, ref[3].weight])
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for w, gl in zip([moved[1].weight, moved[3].weight], g, strict=True):
            w.add_(0.02 * w.norm() / gl.norm() * gl)
    g2 = torch.autograd.grad(F.cross_entropy(moved(x_adv), y), list(moved.parameters()))
    plain = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), list(ref.parameters()))
    for p, p0, gp in zip(model.parameters(), ref.parameters(), g2, strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * gp)
    assert not torch.allclose(g2[0], plain[0])  # AWP changed the step


# --- selection ----------------------------------------------------------------------------------
def test_hold_out_is_a_fixed_part_of_the_training_data():
    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    (xt, yt), (xv, yv) = hold_out(x, y, 10)
    assert len(xv) == 10 and len(xt) == 90
    assert set(yv.tolist()).isdisjoint(yt.tolist()) and sorted([*yv, *yt]) == list(range(100))
    assert torch.equal(hold_out(x, y, 0.1)[1][1], yv)  # a fraction, the same draw
    assert hold_out(x, y, 0)[1] is None
    with pytest.raises(ValueError, match="leaving none"):
        hold_out(x, y, 100)


def test_best_epoch_on_scripted_values_and_model_best(monkeypatch, tmp_path, toy_data):
    """Validation returns a scripted sequence; model_best is the earliest epoch of the best
    hold-out robust accuracy, with that epoch's weights; every other epoch is checked with
    val_every=... and the last always."""
    script = iter([0.20, 0.50, 0.40, 0.50, 0.10])
    calls = []

    def scripted(model, x, y, threat, attack, **kw):
        calls.append(len(x))
        return {"val_clean_acc": 0.9, "val_robust_acc": next(script)}

    monkeypatch.setattr(features, "evaluate_epoch", scripted)
    saved = {}

    def keep(rec):
        saved[rec["epoch"]] = load_file(str(tmp_path / "run/model.safetensors"))

    history = rl.training.fit(
        _lenet(),
        toy_data,
        objective="natural",
        threat=THREAT,
        epochs=5,
        batch_size=64,
        lr=0.05,
        val_split=32,
        keep_best=True,
        out=tmp_path / "run",
        callback=keep,
    )
    assert calls == [32] * 5  # the hold-out only: 32 training examples
    assert [r["holdout_robust_acc"] for r in history] == [0.2, 0.5, 0.4, 0.5, 0.1]
    assert [r["best_epoch"] for r in history] == [1, 2, 2, 2, 2]
    best = json.loads((tmp_path / "run/model_best.json").read_text())
    assert best["epoch"] == 2 and best["selected_by"] == {"holdout_robust_acc": 0.5}
    weights = load_file(str(tmp_path / "run/model_best.safetensors"))
    assert all(torch.equal(weights[k], saved[2][k]) for k in weights)
    assert not all(torch.equal(weights[k], saved[5][k]) for k in weights)
    log = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert log[1]["holdout_n"] == 32 and "holdout_robust_acc" in log[0]
    assert best_epoch(history, "holdout_robust_acc") == (2, 0.5)


def test_val_every_skips_validation_between_checks(monkeypatch, toy_data):
    calls = []
    monkeypatch.setattr(
        features,
        "evaluate_epoch",
        lambda m, x, y, *a, **k: calls.append(1) or {"val_clean_acc": 1.0},
    )
    history = rl.training.fit(
        _lenet(), toy_data, epochs=3, batch_size=128, val_split=0.1, val_every=2
    )
    assert ["holdout_clean_acc" in r for r in history] == [False, True, True]
    assert len(calls) == 2


# --- resume -------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def _crash_after(epoch):
    def callback(rec):
        if rec["epoch"] == epoch:
            raise Crash

    return callback


@pytest.mark.parametrize(
    "features",
    [
        {"average": "ema", "awp": True, "awp_warmup": 0},
        {
            "average": "swa",
            "swa_start": 0,
            "val_split": 32,
            "keep_best": True,
            "augment": True,
            "flip": True,
            "label_smoothing": 0.1,
        },
    ],
    ids=["ema-awp", "swa-best-augment"],
)
def test_resume_is_exact_with_the_features_state(tmp_path, toy_data, features):
    def make():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return rl.models.create("resnet20", num_classes=4, input_size=16)

    data = (toy_data[0][:64], toy_data[1][:64])
    kw = dict(
        objective="pgd-at",
        threat=THREAT,
        batch_size=32,
        lr=0.02,
        epochs=2,
        objective_options={"steps": 1},
        schedule="cosine",
        val_attack={"name": "pgd", "steps": 1},
        **features,
    )
    rl.training.fit(make(), data, out=tmp_path / "full", **kw)
    with pytest.raises(Crash):
        rl.training.fit(make(), data, out=tmp_path / "part", callback=_crash_after(1), **kw)
    rl.training.fit(make(), data, out=tmp_path / "part", resume=True, **kw)
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("full", "part"))
        keys = [k for k in a if not k.startswith("rng.")]
        assert any(k.startswith("extra.average.") for k in a) or name == "model.safetensors"
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in keys), name
    if features.get("keep_best"):
        a, b = (load_file(str(tmp_path / r / "model_best.safetensors")) for r in ("full", "part"))
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- augmentation -------------------------------------------------------------------------------
def test_crop_and_flip_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    aug = Augment(pad=1, flip=True, fill=0.0)
    out = aug.apply(x, torch.tensor([[0, 2]]), torch.tensor([False]))
    padded = F.pad(x, (1, 1, 1, 1))
    assert torch.equal(out, padded[:, :, 0:4, 2:6])
    assert out[0, 0, 0].tolist() == [0, 0, 0, 0] and out[0, 0, 1].tolist() == [1, 2, 3, 0]
    flipped = aug.apply(x, torch.tensor([[1, 1]]), torch.tensor([True]))
    assert torch.equal(flipped, x.flip(-1))
    xs = torch.rand(6, 3, 5, 5)
    offsets, flips = aug.draw(6, torch.Generator().manual_seed(3))
    assert offsets.shape == (6, 2) and int(offsets.min()) >= 0 and int(offsets.max()) <= 2
    again = aug.draw(6, torch.Generator().manual_seed(3))
    assert torch.equal(offsets, again[0]) and torch.equal(flips, again[1])
    out = aug.apply(xs, offsets, flips)
    assert out.shape == xs.shape
    for i in range(6):
        crop = F.pad(xs[i : i + 1], (1, 1, 1, 1))[
            ..., offsets[i, 0] : offsets[i, 0] + 5, offsets[i, 1] : offsets[i, 1] + 5
        ]
        assert torch.equal(out[i : i + 1], crop.flip(-1) if flips[i] else crop)
    assert not Augment(pad=0, flip=False).draw(50, torch.Generator())[1].any()


def test_flip_follows_the_data_set_unless_asked():
    assert flips_for(None, "cifar10") and flips_for(None, "cifar100")
    assert not flips_for(None, "fashion-mnist") and not flips_for(None, "mnist")
    assert flips_for(True, "fashion-mnist") and not flips_for(False, "cifar10")
    assert not flips_for(None, None)
    with pytest.raises(ValueError, match="augment = true"):
        TrainConfig(flip=True).validate()


def test_augmented_training_sees_crops(monkeypatch, toy_data):
    seen = []
    original = Augment.apply

    def spy(self, x, offsets, flips):
        out = original(self, x, offsets, flips)
        seen.append((self, out))
        return out

    monkeypatch.setattr(Augment, "apply", spy)
    rl.training.fit(
        _lenet(),
        toy_data,
        epochs=1,
        batch_size=128,
        augment=True,
        crop_pad=2,
        dataset="fashion-mnist",
    )
    assert len(seen) == 2 and seen[0][0] == Augment(2, False, 0.0)
    assert seen[0][1].shape == (128, 1, 16, 16)
    zeros = (seen[0][1] == 0).float().mean()  # the padding shows
    assert zeros > 0.1 > (toy_data[0] == 0).float().mean()


# --- label smoothing and the split objectives ---------------------------------------------------
def test_label_smoothing_equals_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 5, (10,))
    obj = rl.training.create_objective("natural")
    gen = torch.Generator().manual_seed(0)
    loss = TrainStep(model, obj, SPLITS["natural"], 0.2)(x, y, None, gen)
    z = model(x)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, label_smoothing=0.2))
    logp = F.log_softmax(z, 1)
    by_hand = (0.8 * -logp.gather(1, y[:, None]).squeeze(1) - 0.2 * logp.mean(1)).mean()
    torch.testing.assert_close(loss, by_hand)
    trades = rl.training.create_objective("trades", beta=3.0, steps=1)
    x_adv = torch.clamp(x + 0.05, 0, 1)
    got = TrainStep(model, trades, SPLITS["trades"], 0.2).outer(x, x_adv, y)
    clean = model(x)
    want = (
        trades_loss(clean, model(x_adv), y, 3.0)
        - F.cross_entropy(clean, y)
        + F.cross_entropy(clean, y, label_smoothing=0.2)
    )
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="label_smoothing.*not 'mart'"):
        TrainConfig(objective="mart", label_smoothing=0.1).validate()


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split_objective_is_the_objective(name):
    """outer(craft(...)) is the objective's own loss: the same value, the same BatchNorm
    updates, the same generator draws."""
    torch.manual_seed(0)
    model = rl.models.create("resnet20", num_classes=3, input_size=8).train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    obj = rl.training.create_objective(name, **({} if name == "natural" else {"steps": 2}))
    twin = copy.deepcopy(model)
    want = obj(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(1))
    got = TrainStep(twin, obj, SPLITS[name])(x, y, THREAT, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def test_feature_settings_are_refused_clearly(toy_data):
    with pytest.raises(ValueError, match="keep_best .* val_split"):
        TrainConfig(keep_best=True).validate()
    with pytest.raises(ValueError, match="awp wraps the objectives pgd-at, trades, mart"):
        TrainConfig(objective="natural", awp=True, awp_warmup=0).validate()
    with pytest.raises(ValueError, match="AWP would never run"):
        TrainConfig(objective="pgd-at", awp=True, epochs=5).validate()
    with pytest.raises(ValueError, match="pass out="):
        rl.training.fit(_lenet(), toy_data, val_split=8, keep_best=True)


# --- report -------------------------------------------------------------------------------------
def test_report_shows_the_hold_out_curve_and_the_best_epoch(tmp_path):
    rows = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 1.0 / e,
            "train_time_s": 1.0,
            "holdout_clean_acc": 0.8,
            "holdout_robust_acc": r,
            "holdout_n": 32,
            "best_epoch": b,
        }
        for e, r, b in ((1, 0.3, 1), (2, 0.45, 2), (3, 0.4, 2))
    ]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = render_html([load_run(tmp_path)])
    assert "Best epoch on the hold-out of the training data: 2 (robust 45.00%" in page
    assert "hold-out robust (selects model_best)" in page and "best hold-out epoch (2)" in page
    rows[-1].pop("best_epoch")
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Best epoch on the hold-out" not in render_html([load_run(tmp_path)])


# --- two processes ------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    world = distributed.init_from_env()[0] if distributed.launched() else distributed.World()
    model = _lenet()
    x, y = make_quadrants(99, seed=0)  # 79 to train on: the last global batch (15) splits 8 / 7
    history = rl.training.fit(
        model,
        (x, y),
        objective="pgd-at",
        threat=THREAT,
        objective_options={"steps": 1, "random_start": False},
        epochs=2,
        batch_size=32,
        lr=0.05,
        schedule="cosine",
        val_split=20,
        keep_best=True,
        average="ema",
        awp=True,
        awp_warmup=0,
        augment=True,
        flip=True,
        label_smoothing=0.1,
        val_attack={"name": "pgd", "steps": 1},
        out=out / "run",
    )
    if world.main:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(out / "weights.safetensors"),
        )
        (out / "history.json").write_text(json.dumps(history))
    distributed.shutdown(world)
    write_gloo_threads(out, world.rank)


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="this PyTorch build has no gloo backend",
)
def test_two_processes_equal_one_with_ema_awp_and_augmentation(tmp_path):
    """EMA, AWP (its gradient summed over the ranks), augmentation drawn for the global batch,
    the hold-out and label smoothing: two gloo processes end where one does."""
    results = []
    for procs in (1, 2):
        out = tmp_path / str(procs)
        out.mkdir()
        proc = launch([*launcher(procs), __file__, str(out)], launch_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        if procs > 1:
            assert_gloo_ended(out)
        results.append(
            (
                load_file(str(out / "weights.safetensors")),
                json.loads((out / "history.json").read_text()),
            )
        )
    (w1, h1), (w2, h2) = results
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(h1, h2, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["holdout_robust_acc"] == b["holdout_robust_acc"]
        assert a["weights"] == b["weights"] == "ema"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
