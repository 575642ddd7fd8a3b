"""evaluate(): cascade semantics, recomputed predictions, results schema, sanity flags."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robustlab as rl
from helpers import Noisy, Rounded, TinyCNN
from robustlab.attacks import Attack, AttackResult


def test_cascade_is_the_per_sample_worst_case(toy_model, toy_data):
    x, y = toy_data
    t = rl.ThreatModel("linf", 0.15)
    # deterministic attacks (no random start): each point's outcome is independent of batching
    specs = [("fgsm", {}), ("pgd", {"steps": 10, "random_start": False})]
    out = rl.evaluate(toy_model, x, y, t, attacks=specs, batch_size=100)
    clean = toy_model(x).argmax(1) == y
    fgsm = rl.attacks.create("fgsm", t)(toy_model, x, y).success
    pgd = rl.attacks.create("pgd", t, steps=10, random_start=False)(toy_model, x, y).success
    want = clean & ~fgsm & ~pgd
    assert torch.equal(out.robust, want)
    assert out.robust_accuracy == pytest.approx(want.float().mean().item())
    assert out.clean_accuracy == pytest.approx(clean.float().mean().item())
    first, second = out.per_attack
    assert first["attacked"] == int(clean.sum())
    assert first["broken"] == int((clean & fgsm).sum())
    assert second["attacked"] == int((clean & ~fgsm).sum())  # only still-robust points
    assert second["broken"] == int((clean & ~fgsm & pgd).sum())
    assert out.per_attack[-1]["robust_accuracy"] == out.robust_accuracy
    # the returned worst-case inputs are in the ball and fool the model where not robust
    assert t.contains(out.x_adv, x).all()
    pred = toy_model(out.x_adv).argmax(1)
    assert torch.equal(pred == y, out.robust)


def test_results_files_and_schema(tmp_path, toy_model, toy_data):
    out = rl.evaluate(
        toy_model,
        *toy_data,
        rl.ThreatModel("l2", 1.0),
        suite="quick",
        out=str(tmp_path),
        config={"note": "test"},
    )
    rec = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "clean_accuracy",
        "robust_accuracy",
        "threat",
        "suite",
        "n",
        "per_attack",
        "flags",
        "versions",
        "seed",
        "commit",
        "timings",
        "config",
    ):
        assert key in rec, key
    assert rec["suite"] == "quick" and rec["n"] == len(toy_data[0])
    assert rec["threat"] == {"norm": "l2", "eps": 1.0, "bounds": [0.0, 1.0]}
    assert 0 <= rec["robust_accuracy"] <= rec["clean_accuracy"] <= 1
    rows = [json.loads(s) for s in (tmp_path / "per_sample.jsonl").read_text().splitlines()]
    assert len(rows) == rec["n"]
    assert sum(r["robust"] for r in rows) / len(rows) == pytest.approx(rec["robust_accuracy"])
    assert all(r["broken_by"] == "clean" for r in rows if r["clean_pred"] != r["label"])
    assert all(r["distance"] <= 1.0 + 1e-5 for r in rows)
    assert rec["robust_accuracy"] == out.robust_accuracy
    md = (tmp_path / "summary.md").read_text()
    assert f"{100 * out.robust_accuracy:.2f}%" in md and "FLAGGED" not in md


class Liar(Attack):
    """Claims every point is broken but returns the clean inputs."""

    name = "liar"

    def __call__(self, model, x, y, *, target=None, generator=None):
        logits = model(x)
        return AttackResult(
            x_adv=x.clone(),
            success=torch.ones(len(x), dtype=torch.bool),
            loss=torch.zeros(len(x)),
            logits=logits,
        )


class OutOfBall(Attack):
    name = "out-of-ball"

    def perturb(self, model, x, y, generator):
        return (x + 2 * self.threat.eps).clamp(0, 1)


def test_predictions_are_recomputed_not_trusted(toy_model, toy_data):
    t = rl.ThreatModel("linf", 0.1)
    out = rl.evaluate(toy_model, *toy_data, t, attacks=[Liar(t)])
    assert out.robust_accuracy == out.clean_accuracy
    assert any(f["name"] == "prediction-mismatch" for f in out.flags)


def test_points_outside_the_ball_are_an_error_not_clipped(toy_model, toy_data):
    t = rl.ThreatModel("linf", 0.1)
    with pytest.raises(RuntimeError, match="outside the linf ball"):
        rl.evaluate(toy_model, *toy_data, t, attacks=[OutOfBall(t)])


class Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


@pytest.mark.parametrize(
    ("wrap", "flag"),
    [(Softmax, "softmax-output"), (Noisy, "randomised-output"), (Rounded, "masked-gradient")],
)
def test_flags(wrap, flag, toy_model, toy_data, tmp_path):
    out = rl.evaluate(
        wrap(toy_model), *toy_data, rl.ThreatModel("linf", 0.1), suite="quick", out=str(tmp_path)
    )
    assert flag in {f["name"] for f in out.flags}
    assert (tmp_path / "summary.md").read_text().startswith("# robustlab evaluation\n\n**FLAGGED")


def test_clean_model_raises_no_flags(toy_model, toy_data):
    assert rl.evaluate(toy_model, *toy_data, rl.ThreatModel("linf", 0.1), suite="quick").flags == []


def test_model_mode_and_caller_tensors_untouched(toy_data):
    model = TinyCNN().train()
    x, y = toy_data
    x0 = x.clone()
    rl.evaluate(model, x, y, rl.ThreatModel("linf", 0.1), suite="quick")
    assert model.training and torch.equal(x, x0)


def test_bad_arguments(toy_model, toy_data):
    x, y = toy_data
    t = rl.ThreatModel("linf", 0.1)
    with pytest.raises(ValueError, match="valid suites are"):
        rl.evaluate(toy_model, x, y, t, suite="strong")
    with pytest.raises(ValueError, match="out of range"):
        rl.evaluate(toy_model, x, y + 4, t)
    with pytest.raises(ValueError, match="outside the threat bounds"):
        rl.evaluate(toy_model, x * 2 - 1, y, t)
    with pytest.raises(ValueError, match="batch_size"):
        rl.evaluate(toy_model, x, y, t, batch_size=0)


def test_channels_last_copy_gives_the_same_answer_and_leaves_the_model_alone(toy_model, toy_data):
    t = rl.ThreatModel("linf", 0.15)
    specs = [("pgd", {"steps": 10, "random_start": False})]
    a = rl.evaluate(toy_model, *toy_data, t, attacks=specs, channels_last=True)
    b = rl.evaluate(toy_model, *toy_data, t, attacks=specs, channels_last=False)
    assert a.record["channels_last"] and not b.record["channels_last"]
    assert torch.equal(a.robust, b.robust)
    assert toy_model.conv.weight.is_contiguous()  # the caller's model was not converted
