"""``rl.benchmark``: a model of the user's own (a class in a ``.py`` file written here, not a
robustlab model) on data of the user's own (an ``.npz`` written here), in one line, to a run
folder the report renders; the same robust accuracy as ``rl.evaluate`` on the same model,
points and seed; bad arguments refused with the fix, before any attack runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import robustlab as rl
from robustlab import models

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))
"""
ATTACKS = [("pgd", {"steps": 3}), ("fgsm", {})]
EPS = 0.05
NORMALIZE = "0.5/0.25"


class Setup:
    """The user's files: ``net.py``, ``net.safetensors`` (weights), ``test.npz`` (8 images
    1x8x8, uint8, labelled as the model predicts them, with class names); and the same model
    and data built by hand, for ``rl.evaluate``."""

    def __init__(self, root: Path) -> None:
        self.net = root / "net.py"
        self.net.write_text(NET)
        self.spec = f"{self.net}:Net"
        torch.manual_seed(0)
        state = models.from_spec(self.spec, width=4).state_dict()
        self.weights = root / "net.safetensors"
        save_file(state, str(self.weights))
        self.model = models.from_spec(self.spec, weights=self.weights, normalize=NORMALIZE, width=4)
        pixels = torch.randint(
            0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
        self.x = pixels.float() / 255
        with torch.no_grad():
            self.y = self.model(self.x).argmax(1)
        self.npz = root / "test.npz"
        np.savez(self.npz, x=pixels.numpy(), y=self.y.numpy(), classes=np.array(["a", "b", "c"]))

    def reference(self, seed: int = 0) -> rl.EvalResult:
        return rl.evaluate(
            self.model, self.x, self.y, rl.ThreatModel("linf", EPS), attacks=ATTACKS, seed=seed
        )


@pytest.fixture
def user(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def _config(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["config"]


def test_a_spec_with_weights_on_an_npz_file_gives_the_result_of_evaluate(user, tmp_path):
    out = tmp_path / "runs" / "mine"
    res = rl.benchmark(
        user.spec,
        user.npz,
        threat=f"linf:{EPS}",
        n=8,
        device="cpu",
        out=out,
        seed=3,
        weights=user.weights,
        normalize=NORMALIZE,
        model_options={"width": 4},
        attacks=ATTACKS,
    )
    ref = user.reference(seed=3)
    assert ref.clean_accuracy == 1.0 and 0 < ref.robust_accuracy < 1, "a test that can fail"
    assert res.robust_accuracy == ref.robust_accuracy
    assert torch.equal(res.robust, ref.robust) and torch.equal(res.x_adv, ref.x_adv)
    cfg = _config(out)
    assert cfg["name"] == "Net"
    assert cfg["model"] == f"{user.net.resolve()}:Net" and cfg["model_options"] == {"width": 4}
    assert cfg["weights"] == str(user.weights.resolve())
    assert cfg["weights_sha256"] == hashlib.sha256(user.weights.read_bytes()).hexdigest()
    assert cfg["normalize"] == {"mean": [0.5], "std": [0.25]}
    assert (
        cfg["parameters"]
        == sum(p.numel() for p in user.model.parameters())
        == 4 * 9 + 4 + 64 * 3 + 3
    )
    assert cfg["dataset"] == cfg["data"] == str(user.npz.resolve())
    assert cfg["classes"] == ["a", "b", "c"] and cfg["n"] == 8 and cfg["device"] == "cpu"
    for name in ("per_sample.jsonl", "summary.md"):
        assert (out / name).is_file()


def test_a_module_on_tensors_under_the_users_name_renders_in_the_report(user, tmp_path):
    out = tmp_path / "runs" / "mine"
    res = rl.benchmark(
        user.model,
        (user.x, user.y),
        threat=rl.ThreatModel("linf", EPS),
        n=None,
        device="auto",
        out=out,
        name="my-net",
        attacks=ATTACKS,
    )
    assert torch.equal(res.robust, user.reference().robust)
    cfg = _config(out)
    assert cfg["name"] == "my-net" and cfg["model"].endswith(".Net")
    assert cfg["normalize"] == {"mean": [0.5], "std": [0.25]}  # the Normalized wrapper's
    assert len(cfg["weights_sha256"]) == 64 and cfg["weights"] is None
    assert cfg["dataset"] == "<arrays>" and cfg["classes"] is None
    run = rl.report.load_run(out)
    assert run.evaluations and not run.skipped
    html = rl.report.render_html([run])
    assert "my-net" in html and cfg["weights_sha256"] in html
    assert "| my-net |" in rl.report.leaderboard_markdown([run])  # the name the user gave


def test_a_checkpoint_of_the_users_model_needs_trust(user, tmp_path):
    ckpt = models.save(user.model, tmp_path / "ckpt" / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"trust_code=True"):
        rl.benchmark(ckpt, user.npz, threat=f"linf:{EPS}", n=8, out=None, attacks=ATTACKS)
    out = tmp_path / "run"
    res = rl.benchmark(
        str(ckpt), user.npz, threat=f"linf:{EPS}", n=8, out=out, trust_code=True, attacks=ATTACKS
    )
    assert torch.equal(res.robust, user.reference().robust)
    cfg = _config(out)
    sidecar = json.loads(ckpt.with_suffix(".json").read_text())
    assert cfg["name"] == "tiny" and cfg["checkpoint"] == str(ckpt.resolve())
    assert cfg["weights_sha256"] == sidecar["sha256"]
    assert cfg["architecture"] == f"{user.net.resolve()}:Net"
    assert cfg["normalize"] == {"mean": [0.5], "std": [0.25]}


def test_a_finished_run_is_replaced_only_with_overwrite(user, tmp_path):
    out = tmp_path / "run"
    args = dict(threat=f"linf:{EPS}", n=4, out=out, attacks=[("fgsm", {})])
    rl.benchmark(user.model, user.npz, **args)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rl.benchmark(user.model, user.npz, **args)
    res = rl.benchmark(user.model, user.npz, overwrite=True, name="again", **args)
    assert _config(out)["name"] == "again" and res.record["n"] == 4


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"threat": "linf"}, ValueError, r"threat must be .*'NORM:EPS' such as 'linf:8/255'"),
        ({"threat": "linf:eight"}, ValueError, r"cannot parse eps 'eight'"),
        ({"threat": "l5:0.1"}, ValueError, r"unknown norm 'l5'; valid norms are: linf, l2, l1"),
        ({"threat": 0.1}, TypeError, r"threat must be a robustlab.ThreatModel or 'NORM:EPS'"),
        ({"device": "tpu"}, ValueError, r"unknown device 'tpu'; use 'auto', 'cpu'"),
        ({"device": "cuda:99"}, ValueError, r"'cuda:99' is not available.*use device='cpu'"),
        ({"n": 0}, ValueError, r"n must be an integer >= 1, got 0"),
        ({"n": 9}, ValueError, r"n=9 but .*test.npz holds only 8 images"),
        ({"seed": 1.5}, TypeError, r"seed must be an integer"),
        ({"name": " "}, ValueError, r"name must be a non-empty string"),
        ({"data": "no-such-data"}, FileNotFoundError, r"neither a registered data set \(cifar10"),
        ({"data": 42}, TypeError, r"data must be a registered data set name"),
        ({"resize": (8, 8)}, ValueError, r"resize applies to a folder of images only"),
        ({"weights": "w.safetensors"}, ValueError, r"weights apply to a model spec"),
        ({"model": 42}, TypeError, r"model must be an nn.Module, a robustlab checkpoint"),
        ({"model": "no_such_file.py:Net"}, FileNotFoundError, r"model file 'no_such_file.py'"),
        ({"steps": 3}, TypeError, r"unknown option\(s\) \['steps'\]; .*'attacks', 'batch_size'"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(user, tmp_path, change, error, message):
    args = (
        dict(
            model=user.model,
            data=user.npz,
            threat=f"linf:{EPS}",
            n=8,
            out=tmp_path / "r",
            attacks=ATTACKS,
        )
        | change
    )
    with pytest.raises(error, match=message):
        rl.benchmark(**args)
    assert not (tmp_path / "r").exists()


def test_a_model_that_does_not_fit_the_data_is_refused_before_any_attack(user, tmp_path):
    rgb = models.from_spec(user.spec, in_channels=3)
    with pytest.raises(ValueError, match=r"the model refuses inputs of shape \(2, 1, 8, 8\)"):
        rl.benchmark(rgb, user.npz, threat=f"linf:{EPS}", n=8, out=tmp_path / "r")
    five = models.from_spec(user.spec, num_classes=5)
    with pytest.raises(ValueError, match=r"returns 5 logits per example but num_classes is 3"):
        rl.benchmark(five, user.npz, threat=f"linf:{EPS}", n=8, out=tmp_path / "r")
    two = models.from_spec(user.spec, num_classes=2)
    y = torch.full((8,), 2)
    with pytest.raises(ValueError, match=r"out of range: max label 2 but the model has 2"):
        rl.benchmark(two, (user.x, y), threat=f"linf:{EPS}", n=8, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
