"""The bookkeeping of ``benchmarks/training_features.py`` on scripted values: the EMA decay of
a horizon, the curve summary (best epoch, gap), the CPU cost per epoch and its ratio to plain
PGD-AT, the verdict on robust overfitting and the rendered table."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import training_features as tf  # noqa: E402


def _history(curve: list[float]) -> list[dict]:
    return [
        {
            "epoch": i + 1,
            "holdout_robust_acc": v,
            "holdout_clean_acc": v + 0.2,
            "train_time_s": 10.0 + i,
            "val_time_s": 1.0,
            "best_epoch": 2,
        }
        for i, v in enumerate(curve)
    ]


def test_ema_decay_has_the_asked_horizon():
    # 800 images in batches of 32: 25 steps per epoch; 2 epochs = 50 steps = 1 / (1 - decay)
    assert tf.ema_decay_for(2.0, 800, 32) == pytest.approx(0.98)
    assert tf.ema_decay_for(1.0, 801, 32) == pytest.approx(1 - 1 / 26)  # a last, short batch


def test_curve_summary_takes_the_earliest_best_and_the_gap_in_points():
    got = tf.curve_summary(_history([0.2, 0.5, 0.5, 0.4]))
    assert (got["best_epoch"], got["best_val"], got["final_val"]) == (2, 0.5, 0.4)
    assert got["gap_points"] == pytest.approx(10.0)
    assert got["clean_curve"] == pytest.approx([0.4, 0.7, 0.7, 0.6])


def test_cpu_times_keep_the_last_record_of_an_epoch(tmp_path):
    path = tmp_path / "cpu.jsonl"
    lines = [
        {"epoch": 1, "cpu_s": 5.0, "val_cpu_s": 1.0},
        {"epoch": 1, "cpu_s": 7.0, "val_cpu_s": 2.0},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert tf.cpu_times(path) == {1: lines[1]}
    assert tf.cpu_times(tmp_path / "none.jsonl") == {}


def test_rows_cost_is_the_median_training_cpu_and_keep_best_pays_the_check(monkeypatch):
    monkeypatch.setattr(
        tf, "evaluated", lambda out, weights, *test: {"test_clean": 0.8, "test_pgd20": 0.5}
    )

    def cpu(train: float, val: float) -> dict[int, dict[str, float]]:
        return {e: {"epoch": e, "cpu_s": train + val + e % 2, "val_cpu_s": val} for e in (1, 2, 3)}

    runs = {
        "plain": (Path("p"), _history([0.3, 0.5, 0.4]), cpu(10.0, 2.0)),
        "awp": (Path("a"), _history([0.3, 0.4, 0.45]), cpu(15.0, 2.0)),
    }
    rows = tf.make_rows(runs, {"plain": {}, "awp": {"awp": True}}, (None, None))
    by = {r["row"]: r for r in rows}
    assert list(by) == ["pgd-at", "+ keep_best", "+ AWP"]
    assert by["pgd-at"]["train_cpu_s"] == pytest.approx(11.0)  # median of 10, 11, 10 (+ e % 2)
    assert by["pgd-at"]["x_plain"] == pytest.approx(1.0)
    assert by["+ keep_best"]["x_plain"] == pytest.approx(13.0 / 11.0)  # the check counted
    assert by["+ keep_best"]["chosen_epoch"] == 2 and "chosen_epoch" not in by["pgd-at"]
    assert by["+ AWP"]["x_plain"] == pytest.approx(16.0 / 11.0)
    assert by["+ AWP"]["gap_points"] == pytest.approx(0.0)
    text = tf.render({"settings": vars(tf.parse_args([])), "machine": {}, "rows": rows})
    assert "| + AWP | model.safetensors | 3 | 45.0% | 45.0% | 0.0 |" in text
    assert "\nplain  30 50 40\n" in text and "\nawp    30 40 45\n" in text


@pytest.mark.parametrize(("final", "appeared"), [(0.40, True), (0.49, False)])
def test_verdict_weighs_the_gap_against_the_holdout_noise(final, appeared):
    plain = {"row": "pgd-at", "best_val": 0.5, "final_val": final, "best_epoch": 5}
    plain["gap_points"] = 100 * (0.5 - final)
    text = tf.verdict([plain], 500)  # noise: 100 sqrt(2 * 0.25 / 500) = 3.2 points
    assert "3.2 points" in text
    assert ("Robust overfitting appeared" in text) is appeared


def test_every_run_starts_from_the_same_weights(monkeypatch, tmp_path):
    """Whatever the global RNG holds, every run's model starts from the weights of cfg.seed
    (one row against another is then the feature, not another initialisation)."""
    starts = []

    class Recorder:  # stands in for Trainer: records the initial weights, runs one epoch
        def __init__(self, model, data, cfg, *, threat, out, callback):
            starts.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            self.features = types.SimpleNamespace(validate=lambda *a, **k: None)
            self.out, self.callback = out, callback

        def run(self, resume):
            self.out.mkdir(parents=True)
            rec = {"epoch": 1, "train_loss": 1.0, "holdout_robust_acc": 0.5}
            self.callback(rec)
            return [rec]

    monkeypatch.setattr(tf, "Trainer", Recorder)
    monkeypatch.setattr(tf, "CACHE_DIR", tmp_path)
    cfg = tf.config_for(tf.parse_args([]), {})
    data = (torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    for name, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        out, history, cpu = tf.train_run(name, cfg, data, lambda msg: None)
        assert history[0]["epoch"] == 1 and list(cpu) == [1] and (out / "done.json").exists()
    assert torch.equal(starts[0], starts[1])
