"""Verification by bound propagation (robustlab.defenses.verify) and ``robustlab certify
--method``: verified accuracy never exceeds the empirical robust accuracy on the same points,
a violation is raised, and the CLI writes both into one results file the report shows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import make_quadrants
from robustlab import cli
from robustlab.defenses.verify import Verification, annotate, check_below_empirical, verify
from robustlab.evaluation import evaluate
from robustlab.models.layers import Normalize


@pytest.fixture(scope="module")
def chain_model() -> nn.Module:
    """A small ReLU chain trained on the quadrant images (16x16, 4 classes)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            Normalize(0.3, 0.2),
            nn.Conv2d(1, 4, 4, stride=4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.ReLU(),
            nn.Linear(16, 4),
        )
        x, y = make_quadrants(256, seed=2)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_verified_points_survive_the_attacks(chain_model, method):
    x, y = make_quadrants(48, seed=5)
    threat = rl.ThreatModel("linf", 0.02)
    ver = verify(chain_model, x, y, threat, method)
    res = evaluate(chain_model, x, y, threat, attacks=[("pgd", {"steps": 20})])
    assert 0 < ver.accuracy <= res.robust_accuracy  # not vacuous: some points are verified
    assert not (ver.certified & ~res.robust).any()
    assert torch.equal(ver.certified, ver.min_margin > 0) and ver.margins.shape == (48, 3)
    check_below_empirical(ver, res.robust)


def test_a_verified_point_broken_by_an_attack_is_a_bug():
    ver = Verification("ibp", torch.tensor([[1.0], [-1.0]]), torch.tensor([True, False]))
    with pytest.raises(RuntimeError, match="1 point.*verified by ibp.*point 0.*bug"):
        check_below_empirical(ver, torch.tensor([False, False]))
    record, rows = {}, [{}, {}]
    annotate(ver, record, rows, torch.tensor([True, False]))
    assert record["verified_accuracy"] == 0.5 and record["verification"]["method"] == "ibp"
    assert rows == [
        {"verified": True, "margin_lower_bound": 1.0},
        {"verified": False, "margin_lower_bound": -1.0},
    ]


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def test_verify_checks_its_arguments(chain_model):
    x, y = make_quadrants(4, seed=6)
    with pytest.raises(ValueError, match="unknown verification method 'lp'"):
        verify(chain_model, x, y, rl.ThreatModel("linf", 0.1), "lp")
    with pytest.raises(ValueError, match="unknown norm for verification"):
        verify(chain_model, x, y, rl.ThreatModel("l1", 0.1))
    with pytest.raises(ValueError, match="labels out of range"):
        verify(chain_model, x, y + 4, rl.ThreatModel("linf", 0.1))
    with pytest.raises(ValueError, match="not the chain of its modules"):  # functional relu
        verify(_FunctionalRelu(), x, y, rl.ThreatModel("linf", 0.1))
    chain_model.train()
    verify(chain_model, x, y, rl.ThreatModel("l2", 0.1))
    assert chain_model.training  # the mode is given back


def test_cli_certify_method_ibp_end_to_end(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    args = [
        "certify",
        str(ckpt),
        "--eps",
        "0.001",
        "--n-points",
        "6",
        "--suite",
        "quick",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli.main([*args, "--method", "ibp", "--out", str(tmp_path / "v")]) == 0
    rec = json.loads((tmp_path / "v" / "results.json").read_text())
    assert rec["verification"]["method"] == "ibp" and rec["n"] == 6
    assert rec["verified_accuracy"] <= rec["robust_accuracy"] <= rec["clean_accuracy"]
    rows = [json.loads(r) for r in (tmp_path / "v" / "per_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["verified"], bool) for r in rows)
    assert "verified accuracy (ibp" in (tmp_path / "v" / "summary.md").read_text()
    report = tmp_path / "r.html"
    assert cli.main(["report", str(tmp_path / "v"), "-o", str(report)]) == 0
    assert "verified accuracy (ibp)" in report.read_text()
    assert cli.main([*args, "--method", "crown", "--out", str(tmp_path / "c")]) == 2
    assert "MaxPool2d" in capsys.readouterr().err  # lenet pools: IBP only
    assert cli.main(["certify", str(ckpt), "--method", "ibp", "--device", "cpu"]) == 2
    assert "needs --eps" in capsys.readouterr().err
