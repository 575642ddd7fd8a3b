"""The audit of smoothed and denoised models: the transfer check runs from the defense's base
model, a smoothed classifier gets SmoothAdv and EPGD (their own noise draws, no EOT on top) and
an eps sweep with EPGD on the CW margin, and a transfer check that cannot run says why."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.defenses import Smoothing
from robustlab.defenses.denoise import Denoised
from robustlab.models.dncnn import Denoiser

# the module (``robustlab.evaluation.audit`` is also the name of the function it exports)
audit_module = importlib.import_module("robustlab.evaluation.audit")

THREAT = rl.ThreatModel("l2", 0.5)
TINY = {"steps": 4, "queries": 30, "check_points": 4, "binarization_points": 0}


@pytest.fixture
def data():
    """A tiny linear classifier on 1x8x8 inputs, 8 points labelled by it (clean accuracy 1)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
        x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = base(x).argmax(1)
    return base, x, y


def _check(res, name):
    return next(c for c in res.checks if c["name"] == name)


def _ran(res):
    return {a["config"]["name"]: a for a in res.record["per_attack"] if not a.get("skipped")}


def _spy_sweep(monkeypatch):
    """Record the attacks and results of the audit's eps sweep."""
    seen = {}

    def sweep(*args, **kwargs):
        seen["attacks"] = kwargs["attacks"]
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    real = audit_module.eps_sweep
    monkeypatch.setattr(audit_module, "eps_sweep", sweep)
    return seen


def test_smoothing_gets_transfer_smoothadv_epgd_and_a_margin_sweep(data, monkeypatch):
    base, x, y = data
    smooth = Smoothing(base, sigma=0.25, samples=4).eval()
    seen = _spy_sweep(monkeypatch)
    torch.manual_seed(0)
    res = rl.audit(smooth, x, y, THREAT, eot=2, **TINY)
    assert _check(res, "white-box-beats-transfer")["status"] in ("PASS", "FLAG")
    ran = _ran(res)
    assert {"transfer", "smoothadv", "epgd", "nattack", "square"} <= set(ran)
    assert res.record["audit"]["smoothed"] and res.record["audit"]["surrogate"]
    for name in ("smoothadv", "epgd"):  # m draws of their own per step, no EOT on top
        cfg = ran[name]["config"]
        assert cfg["samples"] == 8 and cfg["steps"] == 4 and "eot_samples" not in cfg, cfg
        assert cfg["sigma"] is None  # the smoothing module's own sigma and noise
    assert ran["apgd-ce"]["config"]["eot_samples"] == 2  # the audit's EOT for the others
    names = [a["config"]["name"] for a in res.record["per_attack"]]
    assert names.index("epgd") < names.index("square")  # white-box before black-box
    assert [a for a, _ in seen["attacks"]] == ["epgd"]
    for r in seen["result"].results:  # the sweep ran EPGD on the margin, without EOT
        cfg = r.per_attack[0]["config"]
        assert cfg["name"] == "epgd" and cfg["loss"] == "cw-margin", cfg
        assert "eot_samples" not in cfg and cfg["samples"] == 8
    assert len(res.record["audit"]["eps_curve"]) == len(audit_module.EPS_FACTORS)


def test_denoised_model_gets_the_transfer_check(data):
    base, x, y = data
    with torch.random.fork_rng():
        torch.manual_seed(1)
        denoised = Denoised(base, Denoiser(1, depth=2, width=4)).eval()
    res = rl.audit(denoised, x, y, THREAT, **TINY)
    check = _check(res, "white-box-beats-transfer")
    assert check["status"] in ("PASS", "FLAG"), check
    assert "transfer" in _ran(res) and res.record["audit"]["surrogate"]
    assert not res.record["audit"]["smoothed"] and "smoothadv" not in _ran(res)


def test_a_transfer_check_that_cannot_run_says_why(data):
    base, x, y = data
    res = rl.audit(base, x, y, THREAT, **TINY)
    check = _check(res, "white-box-beats-transfer")
    assert check["status"] == "SKIP"
    assert "no `base` or `model` module" in check["evidence"]
    assert "surrogate=" in check["evidence"]
    assert "transfer" not in _ran(res)


def test_a_base_model_that_does_not_take_the_inputs_is_no_surrogate(data):
    base, x, _ = data
    wrong = Smoothing(nn.Sequential(nn.Flatten(), nn.Linear(10, 3)), samples=2)
    surrogate, why = audit_module._default_surrogate(wrong, x[:2])
    assert surrogate is None and "does not take the inputs" in why
    assert audit_module._default_surrogate(Smoothing(base), x[:2]) == (base, "")
