"""Progress and logs: the training bar over the whole run, TensorBoard scalars that mirror
train_log.jsonl (also across a resume), the evaluation's bar and its eval_log.jsonl events."""

from __future__ import annotations

import json
import sys

import pytest
import tqdm.auto

import robustlab as rl
from helpers import FlakyPGD, Interrupt, TinyCNN
from robustlab.evaluation import record as record_mod

THREAT = rl.ThreatModel("linf", 0.1)
VAL_ATTACK = {"name": "pgd", "steps": 2}
LOG_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_time_s",
    "val_clean_acc",
    "val_robust_acc",
    "val_attack",
    "val_n",
    "val_time_s",
}
TAGS = {
    "train/loss": "train_loss",
    "train/lr": "lr",
    "val/clean_accuracy": "val_clean_acc",
    "val/robust_accuracy": "val_robust_acc",
}


@pytest.fixture
def bars(monkeypatch) -> list:
    """Every tqdm bar the library creates, each with ``seen``: (n, total, desc, postfix) at
    every postfix change. The bars are real: they still write to stderr."""
    made: list = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            self.seen: list[tuple] = []
            super().__init__(*args, **kwargs)
            made.append(self)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
            super().set_postfix(ordered_dict, refresh, **kwargs)
            self.seen.append((self.n, self.total, self.desc, self.postfix))

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    return made


def _lenet():
    return rl.models.create("lenet", num_classes=4, input_size=16)


def _fit(model, data, **kw):
    opts = {
        "epochs": 2,
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 0.01,
        "threat": THREAT,
        "val": (data[0][:64], data[1][:64]),
        "val_attack": VAL_ATTACK,
        "seed": 1,
    }
    return rl.training.fit(model, data, **(opts | kw))


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- training -------------------------------------------------------------------------------
def test_training_bar_spans_every_pass_and_shows_robust_accuracy(toy_data, bars, capfd):
    # free-at with 2 replays: epochs=3 is 2 passes over 4 batches of 64
    hist = _fit(
        TinyCNN(),
        toy_data,
        objective="free-at",
        objective_options={"replays": 2},
        epochs=3,
        progress=True,
    )
    assert len(hist) == 2 and len(bars) == 1
    bar = bars[0]
    assert (bar.total, bar.n) == (2 * 4, 2 * 4)
    # before the first validation: no accuracy; afterwards the last epoch's
    assert "val_robust" not in bar.seen[0][3]
    robust = f"val_robust={100 * hist[-1]['val_robust_acc']:.1f}%"
    assert robust in bar.seen[-1][3] and "epoch=2/2" in bar.seen[-1][3]
    during = [p for n, _, _, p in bar.seen if 4 < n < 8]  # epoch 2's batches: epoch 1's values
    assert during and all(f"val_robust={100 * hist[0]['val_robust_acc']:.1f}%" in p for p in during)
    err = capfd.readouterr().err
    assert "8/8" in err and robust in err


def test_resumed_run_bar_starts_where_it_stands(tmp_path, toy_data, bars):
    _fit(_lenet(), toy_data, out=tmp_path, tensorboard=False)
    _fit(_lenet(), toy_data, out=tmp_path, tensorboard=False, epochs=3, resume=True, progress=True)
    (bar,) = bars
    assert bar.seen[0][:2] == (2 * 4, 3 * 4)  # initial, total
    assert bar.n == bar.total == 3 * 4


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_mirrors(scalars, log):
    assert set(scalars) == set(TAGS) | {"time/epoch_s"}
    for tag, key in TAGS.items():
        assert [s for s, _ in scalars[tag]] == [r["epoch"] for r in log], tag  # once each
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in log], rel=1e-6)
    assert [v for _, v in scalars["time/epoch_s"]] == pytest.approx(
        [r["train_time_s"] + r["val_time_s"] for r in log], rel=1e-6
    )


def test_tensorboard_mirrors_the_log_and_resume_adds_no_duplicate_steps(tmp_path, toy_data):
    hist = _fit(_lenet(), toy_data, out=tmp_path)  # tensorboard=None: on, it is installed
    log = _log(tmp_path / "train_log.jsonl")
    assert log == hist and [set(r) for r in log] == [LOG_KEYS] * 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    _assert_mirrors(_scalars(tmp_path / "tensorboard"), log)
    hist = _fit(_lenet(), toy_data, out=tmp_path, epochs=3, resume=True)
    log = _log(tmp_path / "train_log.jsonl")
    assert log == hist and [r["epoch"] for r in log] == [1, 2, 3]
    _assert_mirrors(_scalars(tmp_path / "tensorboard"), log)


def test_tensorboard_off_missing_or_misused(tmp_path, toy_data, monkeypatch):
    _fit(_lenet(), toy_data, out=tmp_path / "off", epochs=1, tensorboard=False)
    assert (tmp_path / "off" / "train_log.jsonl").exists()
    assert not (tmp_path / "off" / "tensorboard").exists()
    with pytest.raises(ValueError, match="pass out="):
        _fit(TinyCNN(), toy_data, tensorboard=True)
    with pytest.raises(TypeError, match="True, False or None"):
        _fit(_lenet(), toy_data, out=tmp_path / "bad", tensorboard="yes")
    for name in ("tensorboard", "torch.utils.tensorboard"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        _fit(_lenet(), toy_data, out=tmp_path / "required", tensorboard=True)
    assert not (tmp_path / "required").exists()  # refused before anything was written
    _fit(_lenet(), toy_data, out=tmp_path / "auto", epochs=1)  # None: quietly off
    assert (tmp_path / "auto" / "train_log.jsonl").exists()
    assert not (tmp_path / "auto" / "tensorboard").exists()


# --- evaluation -----------------------------------------------------------------------------
ATTACKS = [("fgsm", {}), ("pgd", {"steps": 5, "early_stop": True})]
EVAL_THREAT = rl.ThreatModel("linf", 0.2)  # fgsm breaks about half the points, pgd more


def test_eval_log_matches_the_results(tmp_path, toy_model, toy_data):
    res = rl.evaluate(
        toy_model, *toy_data, EVAL_THREAT, attacks=ATTACKS, batch_size=64, out=tmp_path
    )
    rec = json.loads((tmp_path / "results.json").read_text())
    start, *attacks, end = _log(tmp_path / "eval_log.jsonl")
    assert start == {
        "event": "start",
        "time": start["time"],
        "n": 256,
        "suite": "custom",
        "threat": EVAL_THREAT.to_dict(),
        "attacks": ["1:fgsm", "2:pgd"],
        "resumed": False,
    }
    assert len(attacks) == len(rec["per_attack"]) == 2
    keys = ("attack", "attacked", "broken", "robust_accuracy", "time_s")
    for line, want in zip(attacks, rec["per_attack"], strict=True):
        assert set(line) == {"event", "elapsed_s", *keys}
        assert line["event"] == "attack" and {k: line[k] for k in keys} == {
            k: want[k] for k in keys
        }
    assert attacks[0]["attacked"] > attacks[1]["attacked"] > 0  # fgsm broke some points
    assert 0 < attacks[0]["elapsed_s"] <= attacks[1]["elapsed_s"] <= end["total_s"]
    assert set(end) == {"event", "clean_accuracy", "robust_accuracy", "total_s"}
    assert end["robust_accuracy"] == rec["robust_accuracy"] == res.robust_accuracy
    assert end["clean_accuracy"] == rec["clean_accuracy"]
    assert attacks[-1]["robust_accuracy"] == rec["robust_accuracy"]


def test_resumed_evaluation_appends_to_its_log(tmp_path, toy_model, toy_data, monkeypatch):
    monkeypatch.setattr(record_mod, "_SAVE_EVERY_S", 0.0)  # save after every batch
    want = rl.evaluate(toy_model, *toy_data, EVAL_THREAT, attacks=ATTACKS, batch_size=40)
    with pytest.raises(Interrupt):
        rl.evaluate(
            toy_model,
            *toy_data,
            EVAL_THREAT,
            batch_size=40,
            out=tmp_path,
            attacks=[("fgsm", {}), FlakyPGD(EVAL_THREAT, 3, **ATTACKS[1][1])],
        )
    before = (tmp_path / "eval_log.jsonl").read_text()
    assert [e["event"] for e in map(json.loads, before.splitlines())] == ["start", "attack"]
    rl.evaluate(toy_model, *toy_data, EVAL_THREAT, attacks=ATTACKS, batch_size=40, out=tmp_path)
    after = (tmp_path / "eval_log.jsonl").read_text()
    assert after.startswith(before)  # appended, nothing rewritten
    start, attack, end = map(json.loads, after[len(before) :].splitlines())
    assert start["resumed"] and attack["attack"] == "2:pgd" and end["event"] == "end"
    assert attack["broken"] == want.per_attack[1]["broken"]
    assert end["robust_accuracy"] == want.robust_accuracy


def test_eval_bar_counts_attack_steps_and_shows_robust_accuracy(toy_model, toy_data, bars, capfd):
    # issue 16: the unit is one attack step on one point (fgsm 1, pgd 5), not a batch
    res = rl.evaluate(
        toy_model, *toy_data, EVAL_THREAT, attacks=ATTACKS, batch_size=64, progress=True
    )
    (bar,) = bars
    work = [units * a["attacked"] for units, a in zip([1, 5], res.per_attack, strict=True)]
    assert bar.n == bar.total == sum(work)
    totals = [t for _, t, _, _ in bar.seen]
    assert totals[0] == (1 + 5) * work[0]  # first estimate: every attack on every clean point
    assert totals == sorted(totals, reverse=True)  # an upper bound that only falls
    assert totals[-1] == sum(work) < totals[0]
    assert bar.desc.startswith("2:pgd") and bar.seen[0][2].startswith("1:fgsm")
    assert bar.postfix == f"robust={100 * res.robust_accuracy:.2f}%"
    err = capfd.readouterr().err  # what a user sees: the attack and its robust accuracy
    assert "1:fgsm" in err and "2:pgd" in err and "robust=100.00%" in err


def test_no_progress_prints_nothing(tmp_path, toy_model, toy_data, capfd):
    _fit(TinyCNN(), toy_data, epochs=1)
    rl.evaluate(toy_model, *toy_data, EVAL_THREAT, attacks=ATTACKS[:1], batch_size=64, out=tmp_path)
    assert capfd.readouterr() == ("", "")
