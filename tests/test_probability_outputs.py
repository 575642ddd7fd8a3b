"""A model whose outputs are probabilities, or logits at a huge temperature, must not look
robust (issue 26): the evaluation and the audit attack the logarithm of probabilities and
rescale saturated logits, and report within 2 points of PGD on the base model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from linear_oracle import exact_broken, train_linear
from robustlab.cli_args import build_parser
from robustlab.evaluation.outputs import OutputView

THREAT = rl.ThreatModel("linf", 0.18)  # about 50 % exact robust accuracy (test_apgd.py)
AUDIT = {"steps": 20, "queries": 300, "binarization_points": 5, "check_points": 48}


class SaturatedSoftmax(nn.Module):
    """``softmax(100 * logits)``: one-hot to float32 precision on most points. The base model
    sits under a name the audit does not take for a surrogate (no transfer attack helps)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.softmax(100 * self.net(x), dim=1)


class Temperature100(SaturatedSoftmax):
    """``100 * logits``: the cross-entropy's gradient underflows on most points."""

    def forward(self, x):
        return 100 * self.net(x)


class HandMadeSoftmax(SaturatedSoftmax):
    """Probabilities computed without a softmax call: only their clamped log is at hand."""

    def forward(self, x):
        e = (self.net(x) - self.net(x).amax(1, keepdim=True)).exp()
        return e / e.sum(1, keepdim=True)


@pytest.fixture(scope="module")
def linear():
    """The linear model, 200 points, and PGD-50's robust accuracy on its own logits (an upper
    bound of the exact robust accuracy, which is about 50 %)."""
    model, x, y = train_linear()
    x, y = x[:200], y[:200]
    ref = rl.evaluate(model, x, y, THREAT, attacks=[("pgd", {"steps": 50})]).robust_accuracy
    exact = 1 - exact_broken(model, x, y, "linf", THREAT.eps).float().mean().item()
    assert exact <= ref and 0.2 < exact < 0.8
    return model, x, y, ref


def _same_as_on_logits(wrapped, plain, pgd_on_logits):
    """At most 2 points above the same attacks on the base logits, and above PGD-50 there.
    (Below is allowed: the temperature can make the CE attacks stronger than on the base
    logits; a robust accuracy is never below the exact one, the cascade checks every point.)"""
    assert wrapped <= plain + 0.02
    assert wrapped <= pgd_on_logits + 0.02


@pytest.mark.parametrize("suite", ["fast", "pgd"])
def test_saturated_softmax_is_attacked_in_log_space(linear, suite):
    model, x, y, ref = linear
    res = rl.evaluate(SaturatedSoftmax(model), x, y, THREAT, suite=suite)
    plain = rl.evaluate(model, x, y, THREAT, suite=suite).robust_accuracy
    _same_as_on_logits(res.robust_accuracy, plain, ref)
    ad = res.record["adaptive"]
    assert ad["log_outputs"] is True and ad["auto"]["log_outputs"] is True
    assert ad["temperature"] > 1  # log_softmax(100 z) is saturated logits in turn
    assert "softmax" in ad["outputs_reason"]
    assert "softmax-output" in {f["name"] for f in res.flags}  # the flag stays


@pytest.mark.parametrize("suite", ["fast", "pgd"])
def test_temperature_100_logits_are_rescaled(linear, suite):
    model, x, y, ref = linear
    res = rl.evaluate(Temperature100(model), x, y, THREAT, suite=suite)
    plain = rl.evaluate(model, x, y, THREAT, suite=suite).robust_accuracy
    _same_as_on_logits(res.robust_accuracy, plain, ref)
    ad = res.record["adaptive"]
    assert ad["log_outputs"] is False and ad["temperature"] > 10
    assert "temperature" in ad["outputs_reason"]


@pytest.mark.parametrize("wrapper", [SaturatedSoftmax, Temperature100])
def test_audit_of_saturated_outputs_is_honest(linear, wrapper):
    model, x, y, ref = linear
    res = rl.audit(wrapper(model), x[:96], y[:96], THREAT, **AUDIT)
    plain = rl.audit(model, x[:96], y[:96], THREAT, **AUDIT).robust_accuracy
    pgd = rl.evaluate(model, x[:96], y[:96], THREAT, attacks=[("pgd", {"steps": 50})])
    _same_as_on_logits(res.robust_accuracy, plain, pgd.robust_accuracy)
    ad = res.record["audit"]["adaptive"]
    assert ad["log_outputs"] is (wrapper is SaturatedSoftmax) and ad["temperature"] > 1
    assert res.record["adaptive"]["log_outputs"] is ad["log_outputs"]
    grad = next(c for c in res.checks if c["name"] == "gradients")
    if wrapper is SaturatedSoftmax:  # the flags stay, and say what the attacks saw instead
        assert grad["status"] == "FLAG" and ad["outputs_reason"] in grad["evidence"]


def test_the_view_keeps_the_model_in_eval_mode(linear):
    """The attacks restore the mode of the view they get after each call, and with it the
    model's: a fresh view in training mode would leave a BatchNorm in training mode, and the
    model's own predictions on the attacks' points would be wrong."""
    model, x, y, _ = linear
    net = nn.Sequential(model, nn.BatchNorm1d(4)).eval()  # identity in eval mode only
    res = rl.evaluate(SaturatedSoftmax(net).eval(), x, y, THREAT, suite="fast")
    plain = rl.evaluate(net, x, y, THREAT, suite="fast").robust_accuracy
    assert res.robust_accuracy == pytest.approx(plain, abs=0.02)
    view = OutputView(net, log=True)
    assert not view.training


def test_log_outputs_can_be_forced_off(linear):
    """Forced off, the attacks see the raw probabilities: the number looks robust, as it did
    before the switch existed; the record says it was the caller's choice."""
    model, x, y, ref = linear
    res = rl.evaluate(SaturatedSoftmax(model), x, y, THREAT, suite="fast", log_outputs=False)
    ad = res.record["adaptive"]
    assert ad["log_outputs"] is False and ad["auto"]["log_outputs"] is False
    assert res.robust_accuracy > ref + 0.2
    with pytest.raises(TypeError, match="log_outputs"):
        rl.evaluate(model, x, y, THREAT, suite="fast", log_outputs="yes")


def test_ordinary_logits_are_attacked_as_they_are(linear):
    model, x, y, ref = linear
    res = rl.evaluate(model, x, y, THREAT, attacks=[("pgd", {"steps": 50})])
    ad = res.record["adaptive"]
    assert ad["log_outputs"] is False and ad["temperature"] == 1.0
    assert ad["outputs_reason"] is None and res.robust_accuracy == ref


def test_probabilities_without_a_softmax_call_use_the_clamped_log(linear):
    model, x, y, _ = linear
    res = rl.evaluate(
        HandMadeSoftmax(model), x[:64], y[:64], THREAT, attacks=[("pgd", {"steps": 5})]
    )
    ad = res.record["adaptive"]
    assert ad["log_outputs"] is True and "clamped" in ad["outputs_reason"]


def test_the_view_keeps_the_prediction_and_declarations(linear):
    model, x, _, _ = linear
    view = OutputView(SaturatedSoftmax(model), log=True, temperature=37.0)
    with torch.no_grad():
        z, base = view(x) * 37.0, 100 * model(x)
    assert torch.equal(z.argmax(1), base.argmax(1))
    # log_softmax(100 z): the logits up to a per-row constant, also where softmax is one-hot
    assert torch.allclose(z - z.amax(1, keepdim=True), base - base.amax(1, keepdim=True), atol=1e-3)
    assert view.exact  # the log came from the model's own softmax call


def test_cli_switch():
    parser = build_parser()
    base = ["--eps", "0.1", "model.safetensors"]
    for cmd in ("evaluate", "audit"):
        assert parser.parse_args([cmd, *base]).log_outputs is None
        assert parser.parse_args([cmd, *base, "--log-outputs"]).log_outputs is True
        assert parser.parse_args([cmd, *base, "--no-log-outputs"]).log_outputs is False
