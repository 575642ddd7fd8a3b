"""The audit: it passes a plain adversarially trained tiny model, flags gradient masking,
hidden randomness and a forward outside autograd, adapts its attacks to each, and writes the
evaluation's schema."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import Noisy, Rounded, TinyCNN, make_quadrants
from robustlab.cli import main

# The toy classes differ by +0.4 in one quadrant: linf 0.2 is half of it, where the natural
# toy model falls to ~10% while an adversarially trained one can hold below it.
THREAT = rl.ThreatModel("linf", 0.2)
AT_THREAT = rl.ThreatModel("linf", 0.15)
FAST = {"steps": 20, "queries": 300, "binarization_points": 5, "check_points": 48}


@pytest.fixture(scope="module")
def at_model():
    """A TinyCNN adversarially trained (PGD-3, linf 0.15) on the toy task."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
        x, y = make_quadrants(256, seed=5)
        pgd = rl.attacks.create("pgd", AT_THREAT, steps=3)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            x_adv = pgd.craft(model, x, y, g)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x_adv), y).backward()
            opt.step()
    return model.eval()


def _flags(res):
    return {c["name"] for c in res.checks if c["status"] == "FLAG"}


def test_adversarially_trained_model_passes(at_model, toy_data):
    x, y = toy_data[0][:96], toy_data[1][:96]
    res = rl.audit(at_model, x, y, AT_THREAT, **FAST)
    assert res.clean_accuracy > 0.9 and res.robust_accuracy > 0.5
    assert _flags(res) == set(), res.checks
    assert res.passed
    names = [c["name"] for c in res.checks]
    assert names == [
        "iterative-beats-single-step",
        "adaptive-matches-naive",
        "white-box-beats-black-box",
        "white-box-beats-transfer",
        "monotone-in-eps",
        "unbounded-attack-succeeds",
        "convergence",
        "randomness",
        "gradients",
        "binarization-test",
    ]
    skipped = {c["name"] for c in res.checks if c["status"] == "SKIP"}
    assert skipped == {"white-box-beats-transfer"}  # no surrogate for a bare model


def test_masked_gradients_are_flagged_and_beaten(toy_model, toy_data):
    x, y = toy_data[0][:96], toy_data[1][:96]
    masked = Rounded(toy_model, levels=3)  # a hidden 2-bit quantiser
    res = rl.audit(masked, x, y, THREAT, **FAST)
    flagged = _flags(res)
    assert {"gradients", "adaptive-matches-naive"} <= flagged
    aud = res.record["audit"]
    assert aud["naive_robust_accuracy"] > res.robust_accuracy + 0.2  # naive PGD is fooled
    assert "masked-gradient" in {f["name"] for f in res.flags}
    assert "audit:gradients" in {f["name"] for f in res.flags}
    assert not res.passed


def test_declared_stage_gets_bpda_and_transfer(toy_model, toy_data):
    x, y = toy_data[0][:96], toy_data[1][:96]
    defended = rl.defenses.create("bit-depth", toy_model, bits=2)
    res = rl.audit(defended, x, y, THREAT, **FAST)
    aud = res.record["audit"]
    assert aud["adaptive"]["bpda"] and aud["adaptive"]["bpda_stages"] == ["stage"]
    assert aud["surrogate"]  # the undefended base model
    assert (
        "BPDA used through stage"
        in next(c for c in res.checks if c["name"] == "gradients")["evidence"]
    )
    transfer = next(a for a in res.record["per_attack"] if a["config"]["name"] == "transfer")
    assert transfer["attacked"] >= 0
    bare = rl.evaluate(toy_model, x, y, THREAT, attacks=[("pgd", {"steps": 20})])
    assert res.robust_accuracy <= bare.robust_accuracy + 0.1  # no better than undefended


def test_hidden_randomness_gets_eot_and_repeats(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    torch.manual_seed(0)
    res = rl.audit(
        Noisy(toy_model),
        x,
        y,
        THREAT,
        eot=2,
        steps=5,
        queries=50,
        binarization_points=0,
        check_points=16,
    )
    assert "randomness" in _flags(res)
    ad = res.record["audit"]["adaptive"]
    assert ad["randomised"] and ad["eot"] == 2 and ad["repeats"] == 10
    assert res.record["repeats"] == 10
    assert next(c for c in res.checks if c["name"] == "binarization-test")["status"] == "SKIP"


class OutsideAutograd(nn.Module):
    """A forward through NumPy: no gradient path at all, nothing declared."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.from_numpy(np.asarray(x.detach().numpy())))


def test_forward_outside_autograd_uses_gradient_free_and_transfer(toy_model, toy_data):
    x, y = toy_data[0][:48], toy_data[1][:48]
    model = OutsideAutograd(toy_model)
    res = rl.audit(model, x, y, THREAT, surrogate=copy.deepcopy(toy_model), **FAST)
    assert "gradients" in _flags(res)
    assert "no-gradient" in {f["name"] for f in res.flags}
    ran = [a["config"]["name"] for a in res.record["per_attack"] if not a.get("skipped")]
    assert "transfer" in ran and "square" in ran and "apgd-ce" not in ran
    bare = rl.evaluate(toy_model, x, y, THREAT, attacks=[("pgd", {"steps": 20})])
    assert res.robust_accuracy <= bare.robust_accuracy + 0.1  # transfer carries PGD over


def test_results_use_the_evaluation_schema(at_model, toy_data, tmp_path):
    x, y = toy_data[0][:32], toy_data[1][:32]
    res = rl.audit(at_model, x, y, AT_THREAT, out=tmp_path, **(FAST | {"check_points": 16}))
    rec = json.loads((tmp_path / "results.json").read_text())
    plain = rl.evaluate(at_model, x, y, AT_THREAT, attacks=[("pgd", {"steps": 1})]).record
    assert set(plain) <= set(rec)
    assert rec["suite"] == "audit" and rec["robust_accuracy"] == res.robust_accuracy
    assert [c["name"] for c in rec["audit"]["checks"]] == [c["name"] for c in res.checks]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# robustlab audit") and "| check | verdict | evidence |" in summary
    assert len((tmp_path / "per_sample.jsonl").read_text().splitlines()) == 32


def test_bad_options(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    with pytest.raises(ValueError, match="steps"):
        rl.audit(toy_model, x, y, THREAT, steps=0)
    with pytest.raises(ValueError, match="binarization_points"):
        rl.audit(toy_model, x, y, THREAT, binarization_points=-1)
    with pytest.raises(TypeError, match="surrogate"):
        rl.audit(toy_model, x, y, THREAT, surrogate="model.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        rl.audit(lambda t: t, x, y, THREAT)


def test_cli_audit_of_a_defense(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    args = [
        "audit",
        str(ckpt),
        "--eps",
        "0.1",
        "--defense",
        "jpeg",
        "--defense-option",
        "quality=50",
        "--n-points",
        "8",
        "--steps",
        "3",
        "--queries",
        "20",
        "--binarization",
        "0",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "# robustlab audit" in out and "| gradients | **FLAG** |" in out
    rec = json.loads((tmp_path / "a" / "results.json").read_text())
    assert rec["config"]["defense"] == {"name": "jpeg", "quality": 50}
    assert rec["audit"]["adaptive"]["bpda"] and rec["audit"]["surrogate"]
    assert main(["audit", str(ckpt), "--eps", "0.1", "--defense", "nope", "--n-points", "4"]) == 2
    assert "nope" in capsys.readouterr().err


def test_base_model_that_takes_other_inputs_is_no_surrogate(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    torch.manual_seed(0)
    base = rl.models.create("smallcnn", num_classes=4, input_size=16, in_channels=16)
    therm = rl.defenses.create("thermometer", base.eval(), levels=16)
    res = rl.audit(therm, x, y, THREAT, steps=3, queries=20, binarization_points=0, check_points=8)
    transfer = next(c for c in res.checks if c["name"] == "white-box-beats-transfer")
    assert transfer["status"] == "SKIP" and not res.record["audit"]["surrogate"]
    assert res.record["audit"]["adaptive"]["bpda_stages"] == ["stage"]
