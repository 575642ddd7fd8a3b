"""BPDA and EOT, and the evaluation that applies them by itself (and lets the caller force
them): a quantiser's gradient comes back through BPDA, EOT's gradient variance falls with its
draws, a declared non-differentiable stage gets BPDA, a randomised model EOT and repeated
predictions, a detector's rejections count as defended."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import Noisy
from robustlab.attacks.bpda import BPDA, bpda, nondifferentiable_stages, straight_through
from robustlab.attacks.eot import expected_grad
from robustlab.defenses.preprocess import Preprocessed, Transform
from robustlab.evaluation.checks import shattered_gradient

LINF = rl.ThreatModel("linf", 0.25)


class Quantise(Transform):
    """x -> round(x): zero gradient almost everywhere, declared as such."""

    robustlab_differentiable = False

    def transform(self, x):
        return x.round()


def _grad(model, x, y):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        F.cross_entropy(model(xg), y, reduction="sum"), xg, allow_unused=True
    )
    return g


def test_straight_through_value_and_gradient():
    x = torch.rand(3, 5, requires_grad=True)
    out = straight_through(x.detach().round(), 2 * x)
    assert torch.equal(out, x.detach().round())
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="shape"):
        straight_through(torch.zeros(3), torch.zeros(4))


def test_bpda_on_a_quantiser_recovers_the_gradient(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    defended = Preprocessed(toy_model, Quantise())
    g = _grad(defended, x, y)
    assert g is None or float(g.abs().max()) == 0.0  # the quantiser masks the gradient
    assert nondifferentiable_stages(defended) == ["stage"]
    with bpda(defended):
        g = _grad(defended, x, y)
        with torch.no_grad():
            assert torch.equal(defended(x), toy_model(x.round()))  # forward unchanged
    assert float(g.abs().max()) > 0
    # identity BPDA: the gradient of the model at the quantised point, applied to x
    assert torch.allclose(g, _grad(toy_model, x.round(), y))
    assert defended.stage.robustlab_bpda is False  # switched back after the block


def test_bpda_module_wraps_code_outside_autograd(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]

    def numpy_round(t):
        return torch.from_numpy(np.round(t.numpy()))

    model = nn.Sequential(BPDA(numpy_round), toy_model)
    g = _grad(model, x, y)
    assert torch.allclose(g, _grad(toy_model, x.round(), y))
    soft = nn.Sequential(BPDA(numpy_round, approximation=lambda t: 3 * t), toy_model)
    assert torch.allclose(_grad(soft, x, y), 3 * g)
    with pytest.raises(TypeError, match="callable"):
        BPDA(3)


def test_eot_gradient_variance_falls_with_samples(toy_model, toy_data):
    x, y = toy_data[0][:4], (toy_data[1][:4] + 1) % 4  # wrong labels: large gradients
    model = Noisy(toy_model, sigma=0.3)

    def loss_fn(xx):
        logits = model(xx)
        return F.cross_entropy(logits, y, reduction="none"), logits

    torch.manual_seed(0)
    spread = {}
    for s in (1, 4, 16):
        grads = torch.stack([expected_grad(loss_fn, x, s)[2] for _ in range(12)])
        spread[s] = float(grads.var(0).sum())
    assert spread[4] < spread[1] / 2 and spread[16] < spread[4] / 2  # ~1/S


def test_attack_bpda_option(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    defended = Preprocessed(toy_model, Quantise())
    naive = rl.attacks.create("pgd", LINF, steps=10)
    adaptive = rl.attacks.create("pgd", LINF, steps=10, bpda=True)
    assert adaptive.config()["bpda"] is True and "bpda" not in naive.config()
    r_naive, r_adapt = naive(defended, x, y), adaptive(defended, x, y)
    assert r_adapt.success.sum() > r_naive.success.sum()
    assert defended.stage.robustlab_bpda is False
    with pytest.raises(ValueError, match="no gradients"):
        rl.attacks.create("square", LINF, bpda=True)
    with pytest.raises(TypeError, match="bpda"):
        rl.attacks.create("pgd", LINF, bpda="yes")


def test_evaluation_uses_bpda_on_declared_stages(toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    defended = Preprocessed(toy_model, Quantise())
    auto = rl.evaluate(defended, x, y, LINF, attacks=[("pgd", {"steps": 10})])
    assert auto.record["adaptive"]["bpda"] is True
    assert auto.record["adaptive"]["bpda_stages"] == ["stage"]
    assert auto.record["attacks"][0]["bpda"] is True
    forced_off = rl.evaluate(defended, x, y, LINF, attacks=[("pgd", {"steps": 10})], bpda=False)
    assert "bpda" not in forced_off.record["attacks"][0]
    assert auto.robust_accuracy < forced_off.robust_accuracy
    # an Attack object runs as built
    built = rl.evaluate(defended, x, y, LINF, attacks=[rl.attacks.create("pgd", LINF, steps=10)])
    assert "bpda" not in built.record["attacks"][0]
    # a plain model: nothing to adapt
    plain = rl.evaluate(toy_model, x, y, LINF, attacks=[("pgd", {"steps": 10})])
    assert plain.record["adaptive"]["bpda"] is False and plain.record["adaptive"]["eot"] == 1


def test_evaluation_uses_eot_and_repeats_on_a_randomised_model(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    res = rl.evaluate(Noisy(toy_model), x, y, LINF, attacks=[("pgd", {"steps": 2})])
    assert res.record["adaptive"]["randomised"] is True
    assert res.record["attacks"][0]["eot_samples"] == 20
    assert res.record["repeats"] == 10
    forced = rl.evaluate(
        Noisy(toy_model), x, y, LINF, attacks=[("pgd", {"steps": 2})], eot=3, repeats=1
    )
    assert forced.record["attacks"][0]["eot_samples"] == 3 and forced.record["repeats"] == 1
    with pytest.raises(ValueError, match="eot"):
        rl.evaluate(toy_model, x, y, LINF, eot=0)
    with pytest.raises(TypeError, match="bpda"):
        rl.evaluate(toy_model, x, y, LINF, bpda="auto")


class AlwaysReject(nn.Module):
    """A detector (last output = rejection) that rejects inputs far from the clean data."""

    robustlab_reject = True

    def __init__(self, model, clean):
        super().__init__()
        self.model, self.clean = model, clean

    def forward(self, x):
        z = self.model(x)
        moved = (x - self.clean[: len(x)]).flatten(1).abs().amax(1) > 0.01
        reject = torch.where(moved, z.amax(1) + 1, z.amin(1) - 1)
        return torch.cat([z, reject[:, None]], 1)


def test_rejected_adversarial_inputs_count_as_defended(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    det = AlwaysReject(toy_model, x)
    big = rl.ThreatModel("linf", 0.5)  # breaks the bare model everywhere
    assert rl.evaluate(toy_model, x, y, big, attacks=[("pgd", {"steps": 10})]).robust_accuracy == 0
    res = rl.evaluate(det, x, y, big, attacks=[("pgd", {"steps": 10})], channels_last=False)
    # every perturbed input is rejected, so nothing is broken
    assert res.clean_accuracy == res.robust_accuracy == 1.0
    atk = rl.attacks.create("pgd", big, steps=10)
    assert not atk(det, x, y).success.any()  # the attack's own success agrees


def test_shattered_gradient_check(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    assert shattered_gradient(toy_model, x, y) is None

    class Shattered(nn.Module):  # a sawtooth in front of the model: gradients blind
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x + 0.02 * torch.sin(3000 * x))

    flag = shattered_gradient(Shattered(toy_model), x, y)
    assert flag is not None and flag["name"] == "shattered-gradient"
    assert flag["prediction_error_median"] > 0.5


def test_cli_evaluate_applies_and_forces_bpda(fake_fmnist, tmp_path, monkeypatch):
    from robustlab.cli import main

    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    base = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--attack",
        "pgd",
        "--steps",
        "2",
        "--n-points",
        "8",
        "--quiet",
        "--defense",
        "bit-depth",
        "--defense-option",
        "bits=2",
    ]
    for extra, expected in (([], True), (["--no-bpda"], False)):
        out = tmp_path / f"e{len(extra)}"
        assert main(base + extra + ["--out", str(out)]) == 0
        rec = json.loads((out / "results.json").read_text())
        assert rec["adaptive"]["bpda"] is expected
        assert rec["adaptive"]["auto"]["bpda"] is (not extra)
    assert main(base + ["--eot", "3", "--out", str(tmp_path / "eot")]) == 0
    rec = json.loads((tmp_path / "eot" / "results.json").read_text())
    assert rec["attacks"][0]["eot_samples"] == 3


def test_cli_fits_a_detector_on_training_points_unless_given_its_threshold(
    fake_fmnist, tmp_path, monkeypatch
):
    from robustlab.cli import main

    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    base = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--attack",
        "pgd",
        "--steps",
        "1",
        "--n-points",
        "4",
        "--quiet",
        "--defense",
        "feature-squeezing",
        "--fit-n",
        "32",
    ]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a" / "results.json").read_text())
    assert rec["config"]["defense"]["fit"] == {"split": "train", "n": 32}
    assert rec["adaptive"]["rejects"] is True
    assert main(base + ["--defense-option", "threshold=0.5", "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rec["config"]["defense"] == {"name": "feature-squeezing", "threshold": 0.5}


def test_forced_log_outputs_never_change_the_verdict_on_a_point():
    """The attacks may see a view of the model (here the clamped log of outputs that are all
    negative: every row the same, so the view predicts class 0 everywhere), but every point is
    judged by the model's own prediction: never robust accuracy below the exact one."""
    from linear_oracle import exact_broken, train_linear

    class Shifted(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) - 1e3

    model, x, y = train_linear()
    x, y, threat = x[:100], y[:100], rl.ThreatModel("linf", 0.18)
    exact = 1 - exact_broken(model, x, y, "linf", threat.eps).float().mean().item()
    res = rl.evaluate(
        Shifted(model), x, y, threat, attacks=[("pgd", {"steps": 5})], log_outputs=True
    )
    assert res.record["adaptive"]["log_outputs"] is True
    assert res.record["adaptive"]["auto"]["log_outputs"] is False
    assert res.robust_accuracy >= exact
    assert "prediction-mismatch" in {f["name"] for f in res.flags}  # the view misreported


def test_cli_forces_log_outputs(fake_fmnist, tmp_path, monkeypatch):
    from robustlab.cli import main

    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    base = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--attack",
        "pgd",
        "--steps",
        "2",
        "--n-points",
        "8",
        "--quiet",
    ]
    for extra, expected in (([], False), (["--log-outputs"], True)):
        out = tmp_path / f"e{len(extra)}"
        assert main(base + extra + ["--out", str(out)]) == 0
        rec = json.loads((out / "results.json").read_text())
        assert rec["adaptive"]["log_outputs"] is expected
        assert rec["adaptive"]["auto"]["log_outputs"] is (not extra)
