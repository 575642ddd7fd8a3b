"""Bad input gets a clear error naming the problem and the fix (DESIGN.md, "Bad input").

Wrong shape, non-float dtype, values outside the bounds, NaN, labels out of range, bad eps,
unknown names, missing or corrupt checkpoints: each must raise ``ValueError``, ``TypeError``
or ``FileNotFoundError`` with an actionable message, never an ``IndexError``, an
``AssertionError`` or a ``RuntimeError`` from inside torch; a call that succeeds returns a
valid result. Explicit cases first, then Hypothesis tests that throw malformed tensors and
arguments at ``attack(...)``, ``evaluate(...)`` and ``models.load(...)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import robustlab as rl
from helpers import TinyCNN, make_quadrants
from robustlab import ThreatModel, attacks
from robustlab._validate import check_inputs, probe_model

CLEAR = (ValueError, TypeError)
LINF = ThreatModel("linf", 0.1)
K = 4  # TinyCNN's classes
NAMES = attacks.names()
#: the budget of the slowest attacks in the random calls (their options are valid; the bad
#: values drawn here still reach them, after these)
CHEAP_OPTIONS = {
    "cw-l2": {"steps": 50, "search_steps": 3},
    "ead": {"steps": 50, "search_steps": 3},
    "lbfgs": {"steps": 10, "search_steps": 3},
    "cw-l0": {"steps": 20, "initial_const": 1.0, "largest_const": 10.0},
    "substitute": {"rounds": 2, "epochs": 2},
    "sparse-rs": {"n_queries": 300},
    "pgd-l0": {"steps": 10, "restarts": 1},
    "vmi-fgsm": {"samples": 4},
    "md": {"steps": 10, "change_point": 4},
    "md-mt": {"steps": 10, "change_point": 4, "k": 2},
}
L2 = ThreatModel("l2", 1.0)
L1 = ThreatModel("l1", 4.0)
L0 = ThreatModel("l0", 3)


def make(name: str, **opts) -> attacks.Attack:
    """Attack ``name`` on linf eps 0.1, else l2 eps 1, l1 eps 4 or l0 3 pixels, the first norm
    it supports; transfer gets a surrogate."""
    norms = attacks.ATTACKS.get(name).norms
    threat = next(t for t in (LINF, L2, L1, L0) if t.norm in norms)
    if name == "transfer":
        opts.setdefault("surrogate", fresh().eval())
    if name in ("epgd", "smoothadv"):  # on a plain model they need the noise scale
        opts.setdefault("sigma", 0.05)
    return attacks.create(name, threat, **opts)


def fresh() -> nn.Module:
    """A new TinyCNN, built without consuming the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN()


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid batch for TinyCNN: x (n, 1, 16, 16) in [0, 1], y (n,) int64 in 0..3."""
    return make_quadrants(n, seed=0)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """An untrained TinyCNN built without touching the global RNG (shared by Hypothesis)."""
    return fresh().eval()


def _set(t: torch.Tensor, value: float | int) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


# --- the tables of bad batches, shared by attacks, evaluate and fit --------------------------
BAD_X = [
    ("numpy", lambda x: x.numpy(), TypeError, r"x must be a torch\.Tensor.*torch\.as_tensor"),
    ("list", lambda x: x.tolist(), TypeError, r"x must be a torch\.Tensor"),
    (
        "uint8",
        lambda x: (x * 255).round().to(torch.uint8),
        ValueError,
        r"floating-point.*uint8.*x\.float\(\) / 255",
    ),
    ("int64", lambda x: (x * 255).long(), ValueError, r"floating-point.*int64.*x\.float\(\)"),
    ("bool", lambda x: x > 0.5, ValueError, r"floating-point.*torch\.bool"),
    ("complex", lambda x: x.to(torch.complex64), ValueError, r"complex64.*real"),
    ("float8", lambda x: x.to(torch.float8_e4m3fn), ValueError, r"float32.*float8"),
    ("1-D", lambda x: x.flatten(), ValueError, r"batched.*unsqueeze"),
    ("0-d", lambda x: x[0, 0, 0, 0], ValueError, r"batched.*got shape \(\)"),
    ("empty batch", lambda x: x[:0], ValueError, r"empty \(N = 0\)"),
    ("zero channels", lambda x: x[:, :0], ValueError, r"no values.*\(4, 0, 16, 16\)"),
    ("NaN", lambda x: _set(x, float("nan")), ValueError, "1 NaN or infinite"),
    ("inf", lambda x: _set(x, float("inf")), ValueError, "NaN or infinite"),
    ("-inf", lambda x: _set(x, float("-inf")), ValueError, "NaN or infinite"),
    (
        "normalised",
        lambda x: (x - 0.5) / 0.25,
        ValueError,
        r"outside the threat bounds.*normalisation is the model's first layer",
    ),
    ("0..255 floats", lambda x: x * 255, ValueError, r"\[0\.0, 1\.0\].*bounds="),
]
BAD_Y = [
    ("numpy", lambda y: y.numpy(), TypeError, r"y must be a torch\.Tensor.*torch\.long"),
    ("list", lambda y: y.tolist(), TypeError, r"y must be a torch\.Tensor"),
    ("float", lambda y: y.float(), ValueError, r"integer class labels.*float32.*y\.long\(\)"),
    ("bool", lambda y: y > 1, ValueError, r"integer class labels.*bool"),
    ("2-D", lambda y: y[:, None], ValueError, r"shape \(N,\) = \(4,\).*\(4, 1\)"),
    ("one-hot", lambda y: nn.functional.one_hot(y, K), ValueError, r"shape \(N,\).*\(4, 4\)"),
    ("0-d", lambda y: y[0], ValueError, r"shape \(N,\).*got shape \(\)"),
    ("too short", lambda y: y[:-1], ValueError, r"\(N,\) = \(4,\).*\(3,\)"),
    ("too long", lambda y: torch.cat([y, y]), ValueError, r"\(N,\) = \(4,\).*\(8,\)"),
    ("negative", lambda y: _set(y, -1), ValueError, r">= 0.*-1"),
]
Y_RANGE = [  # only the model knows its number of classes
    ("== num_classes", lambda y: _set(y, K), ValueError, r"out of range.*4.*valid: 0\.\.3"),
    ("huge", lambda y: _set(y, 2**40), ValueError, r"out of range.*1099511627776"),
]
BAD_BATCHES = [
    pytest.param(lambda x, y, f=f: (f(x), y), e, m, id=f"x-{i}") for i, f, e, m in BAD_X
] + [pytest.param(lambda x, y, f=f: (x, f(y)), e, m, id=f"y-{i}") for i, f, e, m in BAD_Y]
RANGE_BATCHES = [
    pytest.param(lambda x, y, f=f: (x, f(y)), e, m, id=f"y-{i}") for i, f, e, m in Y_RANGE
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("corrupt", "exc", "match"), BAD_BATCHES + RANGE_BATCHES)
def test_attack_bad_batch(name, corrupt, exc, match, tiny):
    x, y = corrupt(*batch())
    with pytest.raises(exc, match=match):
        make(name)(tiny, x, y)


@pytest.mark.parametrize(("corrupt", "exc", "match"), BAD_BATCHES + RANGE_BATCHES)
def test_evaluate_bad_batch(corrupt, exc, match, tiny):
    x, y = corrupt(*batch())
    with pytest.raises(exc, match=match):
        rl.evaluate(tiny, x, y, LINF, attacks=["fgsm"])


@pytest.mark.parametrize(("corrupt", "exc", "match"), BAD_BATCHES)
def test_fit_bad_batch(corrupt, exc, match):
    x, y = corrupt(*batch())
    model = fresh()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(exc, match=match):
        rl.training.fit(model, (x, y), threat=LINF, epochs=1, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_pgd_at_training_catches_labels_out_of_range():
    x, y = batch()
    with pytest.raises(ValueError, match=r"labels out of range.*valid: 0\.\.3"):
        rl.training.fit(fresh(), (x, _set(y, K)), objective="pgd-at", threat=LINF, epochs=1)


@pytest.mark.parametrize(("corrupt", "exc", "match"), RANGE_BATCHES)
def test_natural_training_catches_labels_out_of_range(corrupt, exc, match):
    x, y = corrupt(*batch())
    with pytest.raises(exc, match=match):
        rl.training.fit(fresh(), (x, y), threat=LINF, epochs=1, batch_size=4)


def test_custom_bounds_accept_normalised_inputs(tiny):
    """The positive control of the bounds check: declared bounds make the same data valid."""
    x, y = batch()
    xn = (x - 0.5) / 0.5
    threat = ThreatModel("linf", 0.2, bounds=(-1, 1))
    res = attacks.create("pgd", threat, steps=2)(tiny, xn, y)
    assert threat.contains(res.x_adv, xn).all()


def test_labels_of_other_integer_dtypes_work(tiny):
    x, y = batch()
    for dtype in (torch.int32, torch.uint8, torch.int16):
        res = attacks.create("fgsm", LINF)(tiny, x, y.to(dtype))
        assert res.success.shape == (4,) and LINF.contains(res.x_adv, x).all()


def test_unusual_but_valid_layouts_work(tiny):
    x, y = batch()
    for xv in (
        x.transpose(2, 3),
        x.to(memory_format=torch.channels_last),
        x[:1].expand(4, -1, -1, -1),
        x.clone().requires_grad_(True),
    ):
        res = attacks.create("pgd", LINF, steps=2)(tiny, xv, y)
        assert res.x_adv.shape == xv.shape and LINF.contains(res.x_adv, xv.detach()).all()


# --- targets ---------------------------------------------------------------------------------
def test_targeted_attack_needs_valid_targets(tiny):
    x, y = batch()
    targeted = attacks.create("pgd", LINF, steps=2, targeted=True)
    with pytest.raises(ValueError, match=r"targeted: pass target="):
        targeted(tiny, x, y)
    with pytest.raises(ValueError, match=r"targets out of range: max target 4.*0\.\.3"):
        targeted(tiny, x, y, target=_set(y, K))
    with pytest.raises(ValueError, match="integer class labels"):
        targeted(tiny, x, y, target=y.float())
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        targeted(tiny, x, y, target=y[:2])
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
        targeted(tiny, x, y, target=y.tolist())
    with pytest.raises(ValueError, match=r"untargeted: create it with targeted=True"):
        attacks.create("pgd", LINF)(tiny, x, y, target=(y + 1) % K)


# --- the threat model ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("eps", "exc", "match"),
    [
        (-0.1, ValueError, r"finite and >= 0, got -0\.1"),
        ("-8/255", ValueError, r">= 0"),
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        ("abc", ValueError, r"cannot parse eps 'abc'.*'8/255'"),
        ("1/0", ValueError, "cannot parse eps"),
        ("", ValueError, "cannot parse eps"),
        (None, TypeError, r"number or a string such as '8/255'"),
        (True, TypeError, "bool"),
        ([0.1], TypeError, "list"),
    ],
)
def test_bad_eps(eps, exc, match):
    with pytest.raises(exc, match=match):
        ThreatModel("linf", eps)


@pytest.mark.parametrize("eps", [10**400, "1e400"])
def test_eps_too_large_for_a_float(eps):
    with pytest.raises(ValueError, match="eps"):
        ThreatModel("linf", eps)


@pytest.mark.parametrize(
    ("norm", "bounds", "match"),
    [
        ("l3", (0, 1), r"unknown norm 'l3'; valid norms are: linf, l2, l1"),
        ("Linf", (0, 1), "valid norms are"),
        (None, (0, 1), "valid norms are"),
        ("linf", (1, 0), r"low < high"),
        ("linf", (0, float("nan")), r"finite"),
        ("linf", (0, 1, 2), r"pair \(low, high\)"),
        ("linf", "01x", r"pair \(low, high\)"),
    ],
)
def test_bad_norm_or_bounds(norm, bounds, match):
    with pytest.raises(ValueError, match=match):
        ThreatModel(norm, 0.1, bounds=bounds)


# --- attack names and options ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "opts", "exc", "match"),
    [
        ("cw", {}, ValueError, r"unknown attack 'cw'; valid attacks are: apgd-ce, apgd-dlr"),
        (None, {}, TypeError, r"attack name must be a string"),
        ("pgd", {"steps": 0}, ValueError, r"steps must be an integer >= 1, got 0"),
        ("pgd", {"steps": -3}, ValueError, r"steps must be an integer >= 1"),
        ("pgd", {"steps": 2.5}, ValueError, r"steps must be an integer >= 1, got 2\.5"),
        ("pgd", {"steps": "10"}, ValueError, r"steps must be an integer"),
        ("pgd", {"restarts": 0}, ValueError, r"restarts must be an integer >= 1, got 0"),
        ("pgd", {"step_size": 0}, ValueError, r"step_size must be .*> 0, got 0"),
        ("pgd", {"step_size": -0.01}, ValueError, r"step_size must be .*> 0"),
        ("pgd", {"step_size": float("nan")}, ValueError, r"step_size must be .*> 0, got nan"),
        ("fgsm", {"step_size": -1.0}, ValueError, r"step_size must be .*> 0"),
        ("pgd", {"l1_sparsity": 0}, ValueError, r"l1_sparsity must be in \(0, 1\]"),
        ("pgd", {"l1_sparsity": 1.5}, ValueError, r"l1_sparsity"),
        (
            "pgd",
            {"loss": "hinge"},
            ValueError,
            r"unknown loss 'hinge'; valid losses are: ce, cw-margin, detector-margin, dlr",
        ),
        ("pgd", {"loss": None}, TypeError, r"loss name must be a string"),
        ("pgd", {"stepz": 3}, TypeError, r"attack 'pgd'.*'stepz'"),
        ("fgsm", {"steps": 3}, TypeError, r"attack 'fgsm'.*'steps'"),
    ],
)
def test_bad_attack_name_or_option(name, opts, exc, match):
    with pytest.raises(exc, match=match):
        attacks.create(name, LINF, **opts)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("threat", ["linf", {"norm": "linf", "eps": 0.1}, None])
def test_attack_needs_a_threat_model(name, threat):
    with pytest.raises(TypeError, match=r"threat must be a robustlab\.ThreatModel"):
        attacks.create(name, threat)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"step_size": float("inf")}, "step_size"),
        ({"step_size": "0.01"}, "step_size"),
        ({"steps": True}, "steps"),
        ({"l1_sparsity": "a"}, "l1_sparsity"),
        ({"seed": "a"}, "seed"),
    ],
    ids=["step_size-inf", "step_size-str", "steps-bool", "l1_sparsity-str", "seed-str"],
)
def test_pgd_option_gaps(opts, match):
    with pytest.raises(CLEAR, match=match):
        attacks.create("pgd", LINF, **opts)


@pytest.mark.parametrize("name", NAMES)
def test_attack_needs_a_module(name):
    x, y = batch()
    model = fresh()
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        make(name)(lambda t: model(t), x, y)


def test_attack_generator_must_be_a_generator(tiny):
    x, y = batch()
    with pytest.raises(TypeError, match="generator"):
        attacks.create("pgd", LINF, steps=1)(tiny, x, y, generator=0)


# --- models that return the wrong thing ------------------------------------------------------
class Out(nn.Module):
    """Wraps a model and transforms its logits with ``fn``."""

    def __init__(self, inner: nn.Module, fn) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn
        self.eval()  # attacks restore this mode on the (shared) inner model too

    def forward(self, x):
        return self.fn(self.inner(x))


BAD_OUTPUTS = [
    ("(N,)", lambda z: z[:, 0], ValueError, r"shape \(N, num_classes\).*got \(\d+,\)"),
    ("(N,K,1)", lambda z: z[..., None], ValueError, r"shape \(N, num_classes\).*, 4, 1\)"),
    ("(K,)", lambda z: z[0], ValueError, r"shape \(N, num_classes\)"),
    ("tuple", lambda z: (z, z.detach()), ValueError, r"got tuple.*forward returns only the"),
    ("dict", lambda z: {"logits": z}, ValueError, r"got dict"),
    ("None", lambda z: None, ValueError, r"got NoneType"),
    (
        "int64",
        lambda z: z.argmax(1, keepdim=True).expand(-1, K),
        TypeError,
        r"floating-point logits.*int64",
    ),
    ("one logit", lambda z: z[:, :1], ValueError, r"1 logit.*at least 2.*torch\.cat"),
    ("no logits", lambda z: z[:, :0], ValueError, r"0 logit"),
    ("NaN", lambda z: z * float("nan"), ValueError, r"NaN logits"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("fn", "exc", "match"), [p[1:] for p in BAD_OUTPUTS], ids=[p[0] for p in BAD_OUTPUTS]
)
def test_attack_model_bad_output(name, fn, exc, match, tiny):
    x, y = batch()
    with pytest.raises(exc, match=match):
        make(name)(Out(tiny, fn), x, y)


@pytest.mark.parametrize(
    ("fn", "exc", "match"), [p[1:] for p in BAD_OUTPUTS], ids=[p[0] for p in BAD_OUTPUTS]
)
def test_evaluate_model_bad_output(fn, exc, match, tiny):
    x, y = batch()
    with pytest.raises(exc, match=match):
        rl.evaluate(Out(tiny, fn), x, y, LINF, attacks=["fgsm"])


def test_evaluate_model_collapsing_the_batch(tiny):
    x, y = batch()
    with pytest.raises(ValueError, match=r"shape \(N, num_classes\) = \(4, K\).*\(1, 4\)"):
        rl.evaluate(Out(tiny, lambda z: z.mean(0, keepdim=True)), x, y, LINF, attacks=["fgsm"])


def test_attack_model_collapsing_the_batch(tiny):
    x, y = batch()
    with pytest.raises(ValueError, match=r"shape \(N, num_classes\)"):
        attacks.create("pgd", LINF, steps=1)(Out(tiny, lambda z: z.mean(0, keepdim=True)), x, y)


def test_fit_model_returning_a_tuple():
    x, y = batch()
    with pytest.raises(ValueError, match="got tuple"):
        rl.training.fit(Out(fresh(), lambda z: (z, z)), (x, y), epochs=1, batch_size=4)


# --- dtype and shape the model cannot take ---------------------------------------------------
# Decision: mixed input/model dtypes are an error (TypeError saying how to convert), not a
# silent cast: the contract takes dtype from inputs and model, and x_adv keeps x's dtype.
MISMATCHED = [
    pytest.param(
        lambda x: x.double(),
        TypeError,
        r"(?s)float64.*float32.*x\.to\(torch\.float32\)",
        id="float64",
    ),
    pytest.param(lambda x: x.half(), TypeError, r"(?s)float16.*float32", id="float16"),
    pytest.param(lambda x: x.bfloat16(), TypeError, r"(?s)bfloat16.*float32", id="bfloat16"),
    pytest.param(
        lambda x: x[:, :, :8, :8],
        ValueError,
        r"(?s)cannot run on x of shape \(N, 1, 8, 8\)",
        id="8x8-images",
    ),
    pytest.param(
        lambda x: x.expand(-1, 3, -1, -1),
        ValueError,
        r"(?s)\(N, 3, 16, 16\).*channels",
        id="3-channels",
    ),
    pytest.param(
        lambda x: x[:, 0], ValueError, r"(?s)\(N, 16, 16\).*\(N, C, H, W\)", id="no-channel"
    ),
    pytest.param(lambda x: x.flatten(1), ValueError, r"(?s)\(N, 256\)", id="flat"),
]


@pytest.mark.parametrize(("corrupt", "exc", "match"), MISMATCHED)
def test_probe_model_explains_what_the_model_cannot_take(corrupt, exc, match, tiny):
    x, _ = batch()
    with pytest.raises(exc, match=match):
        probe_model(tiny, corrupt(x))
    assert probe_model(tiny, x).shape == (4, K)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("corrupt", "exc", "match"), MISMATCHED)
def test_attack_input_the_model_cannot_take(name, corrupt, exc, match, tiny):
    x, y = batch()
    with pytest.raises(exc, match=match):
        make(name)(tiny, corrupt(x), y)


@pytest.mark.parametrize(("corrupt", "exc", "match"), MISMATCHED)
def test_evaluate_input_the_model_cannot_take(corrupt, exc, match, tiny):
    x, y = batch()
    with pytest.raises(exc, match=match):
        rl.evaluate(tiny, corrupt(x), y, LINF, attacks=["fgsm"])


@pytest.mark.parametrize(("corrupt", "exc", "match"), MISMATCHED)
def test_fit_input_the_model_cannot_take(corrupt, exc, match):
    x, y = batch()
    with pytest.raises(exc, match=match):
        rl.training.fit(fresh(), (corrupt(x), y), epochs=1, batch_size=4)


def test_float64_inputs_work_with_a_float64_model(tiny):
    x, y = batch()
    model = fresh().double().eval()
    model.load_state_dict(tiny.state_dict())
    res = attacks.create("pgd", LINF, steps=3)(model, x.double(), y)
    assert res.x_adv.dtype == torch.float64 and LINF.contains(res.x_adv, x.double()).all()
    out = rl.evaluate(model, x.double(), y, LINF, attacks=["fgsm"])
    assert 0 <= out.robust_accuracy <= out.clean_accuracy <= 1


# --- evaluate's own arguments ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"suite": "nope"},
            ValueError,
            r"unknown suite 'nope'; valid suites are: detector, fast, pgd, ",
        ),
        ({"suite": 3}, TypeError, r"suite name must be a string"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -5}, ValueError, r"batch_size must be an integer >= 1"),
        ({"batch_size": 2.5}, ValueError, r"batch_size must be an integer >= 1, got 2\.5"),
        ({"attacks": ["nope"]}, ValueError, r"unknown attack 'nope'; valid attacks are: apgd-ce"),
        ({"attacks": [("pgd", {"steps": 0})]}, ValueError, r"steps must be an integer >= 1"),
        ({"attacks": [("pgd", {"stepz": 1})]}, TypeError, r"attack 'pgd'.*'stepz'"),
        (
            {"attacks": [attacks.create("pgd", ThreatModel("l2", 1.0))]},
            ValueError,
            r"has threat l2 eps=1.*evaluation has linf",
        ),
    ],
)
def test_evaluate_bad_arguments(kwargs, exc, match, tiny):
    x, y = batch()
    with pytest.raises(exc, match=match):
        rl.evaluate(tiny, x, y, LINF, **kwargs)


def test_evaluate_needs_model_and_threat(tiny):
    x, y = batch()
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        rl.evaluate(lambda t: tiny(t), x, y, LINF)
    with pytest.raises(TypeError, match=r"threat must be a robustlab\.ThreatModel"):
        rl.evaluate(tiny, x, y, "linf")
    with pytest.raises(TypeError, match=r"threat must be a robustlab\.ThreatModel"):
        rl.evaluate(tiny, x, y, 0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attacks": [5]},
        {"attacks": [None]},
        {"attacks": [("pgd", 5)]},
        {"attacks": "pgd"},
        {"seed": "a"},
    ],
    ids=["int-spec", "None-spec", "bad-options", "bare-string", "seed-str"],
)
def test_evaluate_attack_spec_gaps(kwargs, tiny):
    x, y = batch()
    with pytest.raises(CLEAR, match=r"attacks must|attack spec|seed"):
        rl.evaluate(tiny, x, y, LINF, **kwargs)


# --- fit's own arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"objective": "trade"}, ValueError, r"unknown objective 'trade'; valid objectives are: "),
        ({"objective": None}, TypeError, r"objective name must be a string"),
        ({"epochs": 0}, ValueError, r"epochs must be an integer >= 1, got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
        ({"lr": 0}, ValueError, r"lr must be > 0"),
        ({"lr": float("nan")}, ValueError, r"lr must be > 0, got nan"),
        ({"optimizer": "rmsprop"}, ValueError, r"unknown optimizer 'rmsprop'; valid: adam, sgd"),
        ({"schedule": "step"}, ValueError, r"unknown schedule 'step'; valid schedules are"),
        ({"epoch": 3}, TypeError, r"'epoch'.*valid training settings are: objective"),
        ({"objective": "pgd-at"}, ValueError, r"'pgd-at' needs threat=ThreatModel"),
        ({"threat": "linf"}, TypeError, r"threat must be a robustlab\.ThreatModel"),
        ({"objective": "pgd-at", "threat": 0.1}, TypeError, r"threat must be a robustlab"),
    ],
)
def test_fit_bad_arguments(kwargs, exc, match):
    x, y = batch()
    with pytest.raises(exc, match=match):
        rl.training.fit(fresh(), (x, y), **{"epochs": 1, **kwargs})


@pytest.mark.parametrize("case", ["bare-x", "triple", "val-labels"])
def test_fit_data_and_val_gaps(case):
    x, y = batch()
    data = {"bare-x": x, "triple": (x, y, y)}.get(case, (x, y))
    extra = {"val": (x, _set(y, K))} if case == "val-labels" else {}
    with pytest.raises(CLEAR, match=r"\(x, y\)|\bval\b"):
        rl.training.fit(fresh(), data, epochs=1, batch_size=4, **extra)


# --- models.create ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (
            {"name": "vgg16"},
            ValueError,
            r"unknown model 'vgg16'; valid models are: ibp-small, lenet, preact-resnet18, "
            r"resnet20, smallcnn",
        ),
        (
            {"name": "smallcnn", "activation": "tanh"},
            ValueError,
            r"unknown activation 'tanh'; valid activations are: gelu, kwta, relu, silu, softplus",
        ),
        ({"name": "smallcnn", "num_classes": 0}, ValueError, r"num_classes must be a positive"),
        ({"name": "smallcnn", "num_classes": True}, ValueError, r"num_classes must be a positive"),
        ({"name": "smallcnn", "num_classes": "10"}, ValueError, r"num_classes must be a positive"),
        ({"name": "smallcnn", "in_channels": 0}, ValueError, r"in_channels must be a positive"),
        ({"name": "smallcnn", "input_size": 8}, ValueError, r"input_size >= 16"),
        ({"name": "smallcnn", "std": 0.0}, ValueError, r"std must be > 0"),
        ({"name": "smallcnn", "widen": 2}, TypeError, r"smallcnn does not take \['widen'\]"),
    ],
)
def test_models_create_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        rl.models.create(**args)


# --- data.load -------------------------------------------------------------------------------
@pytest.fixture
def no_data(tmp_path, monkeypatch) -> Path:
    """An empty root, an empty cache and downloads forbidden."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTLAB_DATA", raising=False)
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (
            {"name": "imagenet"},
            ValueError,
            r"unknown dataset 'imagenet'; valid datasets are: cifar10, cifar100, fashion-mnist",
        ),
        ({"name": None}, TypeError, r"dataset name must be a string"),
        ({"name": "mnist", "split": "val"}, ValueError, r"unknown split 'val'.*'train', 'test'"),
        ({"name": "mnist", "n": 0}, ValueError, r"n must be a positive integer or None, got 0"),
        ({"name": "mnist", "n": -1}, ValueError, r"n must be a positive integer"),
        ({"name": "mnist", "n": 2.5}, ValueError, r"n must be a positive integer"),
        ({"name": "mnist", "n": True}, ValueError, r"n must be a positive integer"),
        ({"name": "mnist", "n": "10"}, ValueError, r"n must be a positive integer"),
    ],
)
def test_data_load_bad_arguments(args, exc, match, no_data):
    with pytest.raises(exc, match=match):
        rl.data.load(**args)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn"])
def test_data_missing_without_network(name, no_data):
    where = re.escape(str(no_data))
    with pytest.raises(
        FileNotFoundError, match=rf"(?s)'{name}'.*not found.*{where}.*ROBUSTLAB_OFFLINE=1"
    ):
        rl.data.load(name, root=no_data)
    with pytest.raises(FileNotFoundError, match=r"download=False"):
        rl.data.load(name, root=no_data, download=False)


def test_data_corrupt_file(no_data):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (no_data / f).write_bytes(random.Random(f).randbytes(64))
    with pytest.raises(ValueError, match=r"t10k-(images|labels)-idx[13]-ubyte\.gz"):
        rl.data.load("mnist", root=no_data)


# --- checkpoints -----------------------------------------------------------------------------
def _small() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return rl.models.create("smallcnn", num_classes=K, in_channels=1, input_size=16)


class Ckpt(tuple):
    """(weights bytes, sidecar dict) of a valid checkpoint, with a short repr for Hypothesis."""

    def __repr__(self) -> str:
        return f"Ckpt({len(self[0])} bytes)"


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory) -> Ckpt:
    """The bytes of a valid checkpoint and its sidecar."""
    path = rl.models.save(
        _small(), tmp_path_factory.mktemp("ckpt") / "m.safetensors", meta={"dataset": "quadrants"}
    )
    return Ckpt((path.read_bytes(), json.loads(path.with_suffix(".json").read_text())))


def _write(d: Path, data: bytes, sidecar: dict | str | bytes | None, name="m") -> Path:
    path = d / f"{name}.safetensors"
    path.write_bytes(data)
    side = path.with_suffix(".json")
    side.unlink(missing_ok=True)
    if isinstance(sidecar, dict):
        side.write_text(json.dumps(sidecar))
    elif isinstance(sidecar, str):
        side.write_text(sidecar)
    elif isinstance(sidecar, bytes):
        side.write_bytes(sidecar)
    return path


def _resign(data: bytes, sidecar: dict) -> dict:
    return {**sidecar, "sha256": hashlib.sha256(data).hexdigest()}


def test_load_missing_files(tmp_path, ckpt_bytes):
    with pytest.raises(FileNotFoundError, match=r"'.*nope\.safetensors' not found.*models\.save"):
        rl.models.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        rl.models.load(tmp_path)  # a directory
    path = _write(tmp_path, ckpt_bytes[0], None)
    with pytest.raises(FileNotFoundError, match=r"sidecar '.*m\.json'.*writes both files"):
        rl.models.load(path)


@pytest.mark.parametrize("cut", [0, 7, 8, 100, -1, -1000], ids=lambda c: f"cut{c}")
def test_load_truncated(tmp_path, ckpt_bytes, cut):
    data, side = ckpt_bytes
    path = _write(tmp_path, data[:cut], _resign(data[:cut], side))
    with pytest.raises(ValueError, match=r"not a valid safetensors file \(corrupt or truncated"):
        rl.models.load(path)


def test_load_corrupt(tmp_path, ckpt_bytes):
    data, side = ckpt_bytes
    n = struct.unpack("<Q", data[:8])[0]
    for bad in (
        random.Random(0).randbytes(4096),
        data[:8] + b"!" * n + data[8 + n :],
        struct.pack("<Q", 2**40) + data[8:],
        struct.pack("<Q", 2) + b"[]",
    ):
        path = _write(tmp_path, bad, _resign(bad, side))
        with pytest.raises(ValueError, match=r"corrupt or truncated"):
            rl.models.load(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0x55  # inside the last tensor: still parses, the checksum catches it
    path = _write(tmp_path, bytes(flipped), side)
    with pytest.raises(ValueError, match=r"SHA-256 of .* but its sidecar records .*modified"):
        rl.models.load(path)


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        ("{not json", r"sidecar '.*m\.json' is not valid JSON"),
        (b"\xff\xfe\x00", r"is not valid JSON"),
        ("[]", r"lacks 'sha256' or 'architecture'"),
        ("null", r"lacks 'sha256' or 'architecture'"),
        ({"sha256": "0"}, r"lacks 'sha256' or 'architecture'"),
    ],
)
def test_load_bad_sidecar(tmp_path, ckpt_bytes, sidecar, match):
    path = _write(tmp_path, ckpt_bytes[0], sidecar)
    with pytest.raises(ValueError, match=match):
        rl.models.load(path)


def _arch(side: dict, **kwargs) -> dict:
    arch = side["architecture"]
    return {**side, "architecture": {**arch, "kwargs": {**arch["kwargs"], **kwargs}}}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: {**s, "sha256": "0" * 64}, r"SHA-256 .* sidecar records 0000"),
        (lambda s: {**s, "format_version": 99}, r"checkpoint format 99.*reads formats 1 to 1"),
        (lambda s: {**s, "format_version": "1"}, r"checkpoint format '1'"),
        (
            lambda s: {**s, "architecture": {"name": "vgg16", "kwargs": {}}},
            r"unknown model 'vgg16'; valid models are",
        ),
        (lambda s: {**s, "architecture": ["smallcnn"]}, r"architecture must be \{'name'"),
        (
            lambda s: {**s, "architecture": {"name": "lenet", "kwargs": {}}},
            r"weights do not match architecture 'lenet'.*missing keys",
        ),
        (lambda s: _arch(s, num_classes=10), r"shape mismatches.*fc3"),
        (lambda s: _arch(s, num_classes=-1), r"num_classes must be a positive integer"),
        (lambda s: _arch(s, activation="tanh"), r"valid activations are"),
        (lambda s: _arch(s, activation=3), r"cannot rebuild architecture"),
        (lambda s: _arch(s, mean="abc"), r"cannot rebuild architecture"),
        (lambda s: _arch(s, widen=2), r"smallcnn does not take"),
    ],
    ids=[
        "sha",
        "format-99",
        "format-str",
        "unknown-arch",
        "arch-list",
        "other-arch",
        "classes",
        "neg-classes",
        "activation",
        "activation-int",
        "mean-str",
        "extra-kwarg",
    ],
)
def test_load_lying_sidecar(tmp_path, ckpt_bytes, edit, match):
    data, side = ckpt_bytes
    path = _write(tmp_path, data, edit(side))
    with pytest.raises(ValueError, match=match):
        rl.models.load(path)


def test_load_sidecar_claiming_a_huge_model(tmp_path, ckpt_bytes):
    data, side = ckpt_bytes
    path = _write(tmp_path, data, _arch(side, num_classes=10**12))
    with pytest.raises(ValueError, match=r"shape mismatches.*fc3"):
        rl.models.load(path)


class Payload:
    """Unpickling this object creates ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _pickles(marker: Path, tmp: Path) -> dict[str, bytes]:
    obj = {"weight": torch.zeros(2), "evil": Payload(marker)}
    out = {f"pickle-protocol-{p}": pickle.dumps(obj["evil"], protocol=p) for p in range(6)}
    for zip_format in (True, False):
        torch.save(obj, tmp / "t.pt", _use_new_zipfile_serialization=zip_format)
        out[f"torch.save-{'zip' if zip_format else 'legacy'}"] = (tmp / "t.pt").read_bytes()
    (tmp / "t.pt").unlink()
    return out


def test_pickles_are_refused_never_executed(tmp_path, ckpt_bytes):
    marker = tmp_path / "pwned"
    blobs = _pickles(marker, tmp_path)
    for label, blob in blobs.items():
        for name in ("model.safetensors", "model.pt"):
            path = tmp_path / name
            path.write_bytes(blob)
            path.with_suffix(".json").write_text(json.dumps(_resign(blob, ckpt_bytes[1])))
            expected = (
                "never unpickles"
                if blob.startswith((b"\x80", b"PK"))
                else r"\.safetensors|corrupt or truncated"
            )
            with pytest.raises(ValueError, match=expected):
                rl.models.load(path)
            assert not marker.exists(), (label, name)
    # the torch.save payloads are live: unpickling them (what load refuses) runs the code
    assert blobs["torch.save-zip"].startswith(b"PK")
    pickle.loads(blobs["pickle-protocol-2"]).close()
    assert marker.exists()


# --- Hypothesis: malformed tensors and arguments at attack(...) and evaluate(...) -----------
# Shapes the library checks itself (TinyCNN takes (n, 1, 16, 16)); shapes the model cannot
# take are in MODEL_SHAPES (caught by _validate.probe_model).
GOOD_SHAPE = [lambda n: (n, 1, 16, 16)]
LIB_SHAPES = [
    lambda n: (),
    lambda n: (n,),
    lambda n: (0, 1, 16, 16),
    lambda n: (n, 0, 16, 16),
    lambda n: (0,),
    lambda n: (n, 1, 0, 16),
]
MODEL_SHAPES = [
    lambda n: (n, 1, 8, 8),
    lambda n: (n, 3, 16, 16),
    lambda n: (n, 16, 16),
    lambda n: (n, 256),
    lambda n: (n, 1, 16, 16, 1),
    lambda n: (n, 1, 17, 16),
]
LIB_DTYPES = [
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.int8,
]
MODEL_DTYPES = [torch.float64, torch.float16, torch.bfloat16]
VALUES = ["in-bounds", "edges", "nan", "inf", "negative", "huge", "normalised", "tiny"]


def _values(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "edges":
        t = t.round()
    elif kind == "tiny":
        t = t * 1e-30
    elif t.numel() and kind in ("nan", "inf", "negative", "huge"):
        t.view(-1)[seed % t.numel()] = {
            "nan": math.nan,
            "inf": -math.inf,
            "negative": -1e-3,
            "huge": 1e30,
        }[kind]
    elif kind == "normalised":
        t = (t - 0.5) / 0.25
    return t


@st.composite
def inputs(draw, shapes, dtypes, n, values=VALUES):
    shape = draw(st.sampled_from(shapes))(n)
    dtype = draw(st.sampled_from(dtypes))
    x = _values(shape, draw(st.sampled_from(values)), draw(st.integers(0, 2**16)))
    x = x.to(dtype)
    if draw(st.booleans()) and x.dim() == 4 and x.shape[2] == x.shape[3]:
        x = x.transpose(2, 3)  # non-contiguous, same meaning
    return x


@st.composite
def labels(draw, n, bad):
    if not bad:
        return torch.tensor(
            draw(st.lists(st.integers(0, K - 1), min_size=n, max_size=n)),
            dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        )
    shape = draw(st.sampled_from([(n,), (n, 1), (), (n + 1,), (0,), (n, K)]))
    dtype = draw(
        st.sampled_from(
            [torch.int64, torch.int32, torch.float32, torch.bool, torch.float64, torch.complex64]
        )
    )
    lo, hi = draw(st.sampled_from([(0, K - 1), (-3, -1), (K, K + 3), (2**40, 2**41)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randint(lo, hi + 1, shape, generator=gen)
    if draw(st.booleans()):
        return values.tolist() if values.dim() else int(values)  # not a tensor
    return values.to(dtype)


eps_values = st.one_of(
    st.floats(0, 0.5),
    st.just("8/255"),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.sampled_from(["abc", "", "1/0", "-1/255", "nan", None, True, [0.1]]),
)


@st.composite
def threat_args(draw, bad):
    """(norm, eps, bounds) for ThreatModel; bad ones may make it raise (accepted)."""
    norm = draw(st.sampled_from(["linf", "l2", "l1", "l0"]))
    if not bad:
        eps = draw(st.integers(1, 4) if norm == "l0" else st.floats(0, 0.5))
        return norm, eps, draw(st.sampled_from([(0, 1), (-1, 1)]))
    norm = draw(st.sampled_from([norm, "l3", "L2", None]))
    bounds = draw(st.sampled_from([(0, 1), (1, 0), (0, 0), (0, math.inf), (0,), "ab"]))
    return norm, draw(eps_values), bounds


@st.composite
def options(draw, name, bad):
    keys = (
        ["steps", "restarts", "random_start", "early_stop", "keep_best"] if name == "pgd" else []
    ) + ["step_size", "loss", "random_start"]
    good = {
        "steps": st.integers(1, 3),
        "restarts": st.integers(1, 2),
        "step_size": st.one_of(st.none(), st.floats(1e-3, 1.0)),
        "loss": st.sampled_from(["ce", "cw-margin"]),
        "random_start": st.booleans(),
        "early_stop": st.booleans(),
        "keep_best": st.booleans(),
    }
    junk = st.one_of(
        st.integers(-2, 0),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.sampled_from(["hinge", [1], True]),
    )
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
    opts = {k: draw(junk if bad and draw(st.booleans()) else good[k]) for k in chosen}
    if bad and draw(st.booleans()):
        opts[draw(st.sampled_from(["stepz", "eps", "norm"]))] = 1
    return opts


# the parts of a call that may be malformed (x and y weighted up: the most varied)
PARTS = ["x", "x", "x", "y", "y", "threat", "options", "target", "name"]


@st.composite
def attack_calls(
    draw,
    shapes=GOOD_SHAPE * 6 + LIB_SHAPES,
    dtypes=[torch.float32] * 6 + LIB_DTYPES,
    model_cannot_take=False,
):
    """(build, x, y, target): at most two malformed parts, the rest valid. With
    ``model_cannot_take``, x always comes from ``shapes`` and ``dtypes`` with in-bound values."""
    bad = {draw(st.sampled_from(PARTS)) for _ in range(draw(st.integers(0, 2)))}
    n = draw(st.integers(1, 3))
    if model_cannot_take:
        x = draw(inputs(shapes, dtypes, n, ["in-bounds", "edges"]))
    elif "x" in bad:
        x = draw(inputs(shapes, dtypes, n))
    else:
        x = draw(inputs(GOOD_SHAPE, [torch.float32], n, ["in-bounds", "edges", "tiny"]))
    y = draw(labels(n, "y" in bad))
    name = draw(st.sampled_from(NAMES + (["nope", None] if "name" in bad else [])))
    targeted = draw(st.booleans())
    target = None
    if targeted != ("target" in bad and draw(st.booleans())):  # bad: missing or unexpected
        target = draw(labels(n, "target" in bad))
    opts = draw(options(name if name in NAMES else "pgd", "options" in bad))
    args = draw(threat_args("threat" in bad))

    def build():
        threat = ThreatModel(*args)
        cheap = CHEAP_OPTIONS.get(name, {}) if name in NAMES else {}
        return threat, attacks.create(name, threat, targeted=targeted, **(cheap | opts))

    return build, x, y, target


def _outcome(err: Exception | None) -> None:
    """Record what happened, for ``pytest --hypothesis-show-statistics``."""
    msg = "" if err is None else re.sub(r"'/[^']*'", "<path>", str(err))
    event("ok" if err is None else f"{type(err).__name__}: {msg[:45]}")


def _check_attack_result(res, threat, x, labels_, targeted, model):
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert threat.contains(res.x_adv, x.detach()).all()
    assert res.success.dtype == torch.bool and res.success.shape == (len(x),)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    expected = pred == labels_.long() if targeted else pred != labels_.long()
    assert torch.equal(res.success, expected)


HYP = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "report_multiple_bugs": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


@settings(max_examples=400, **HYP)
@given(call=attack_calls())
def test_hypothesis_attack_accepts_only_clear_errors(call, tiny):
    build, x, y, target = call
    try:
        threat, atk = build()
        res = atk(tiny, x, y, target=target)
    except CLEAR as err:
        _outcome(err)
        return
    _outcome(None)
    _check_attack_result(res, threat, x, target if atk.targeted else y, atk.targeted, tiny)


@st.composite
def evaluate_calls(draw):
    build, x, y, _ = draw(attack_calls())
    how = draw(st.sampled_from(["attacks"] * 5 + ["suite", "bad-suite", "bad-attacks"]))
    kwargs = {"batch_size": draw(st.sampled_from([1, 2, 500] * 3 + [0, -1, 1.5, None, "2"]))}
    if how == "suite":
        kwargs["suite"] = "quick"
    elif how == "bad-suite":
        kwargs["suite"] = draw(st.sampled_from(["nope", None, "QUICK ", 3]))
    elif how == "bad-attacks":
        kwargs["attacks"] = draw(
            st.sampled_from([["nope"], [("pgd", {"steps": 0})], [("fgsm", {"stepz": 1})]])
        )
    else:
        kwargs["attacks"] = draw(st.sampled_from([["fgsm"], [("pgd", {"steps": 2})], []]))
    return build, x, y, kwargs


def _check_eval_result(out, x, threat):
    assert 0.0 <= out.robust_accuracy <= out.clean_accuracy <= 1.0
    assert out.robust.shape == (len(x),) and out.x_adv.shape == x.shape
    assert threat.contains(out.x_adv, x.detach().cpu()).all()
    assert len(out.per_sample) == len(x)
    json.dumps(out.record, allow_nan=False)


@settings(max_examples=200, **HYP)
@given(call=evaluate_calls())
def test_hypothesis_evaluate_accepts_only_clear_errors(call, tiny):
    build, x, y, kwargs = call
    try:
        threat, _ = build()
        out = rl.evaluate(tiny, x, y, threat, **kwargs)
    except CLEAR as err:
        _outcome(err)
        return
    _outcome(None)
    _check_eval_result(out, x, threat)


@settings(max_examples=30, **HYP)
@given(
    call=attack_calls(MODEL_SHAPES + GOOD_SHAPE, MODEL_DTYPES + [torch.float32], True),
    evaluate_too=st.booleans(),
)
def test_hypothesis_input_the_model_cannot_take(call, evaluate_too, tiny):
    build, x, y, target = call
    try:
        threat, atk = build()
        if evaluate_too:
            out = rl.evaluate(tiny, x, y, threat, attacks=[atk])
            _check_eval_result(out, x, threat)
        else:
            res = atk(tiny, x, y, target=target)
            _check_attack_result(res, threat, x, target if atk.targeted else y, atk.targeted, tiny)
    except CLEAR:
        return


@st.composite
def batches_for_check_inputs(draw):
    n = draw(st.integers(1, 3))
    x = draw(
        inputs(
            GOOD_SHAPE + LIB_SHAPES + MODEL_SHAPES, [torch.float32, *LIB_DTYPES, *MODEL_DTYPES], n
        )
    )
    return x, draw(labels(n, draw(st.booleans())))


@settings(max_examples=300, **HYP)
@given(batch_=batches_for_check_inputs(), threat=st.sampled_from([None, LINF, "linf"]))
def test_hypothesis_check_inputs_raises_only_clear_errors(batch_, threat):
    """check_inputs alone: any tensor, any labels; a pass means the batch really is valid."""
    x, y = batch_
    try:
        check_inputs(x, y, threat)
    except CLEAR as err:
        _outcome(err)
        return
    _outcome(None)
    assert x.dtype.is_floating_point and x.dim() >= 2 and x.numel() > 0
    assert y.dim() == 1 and len(y) == len(x) and not y.is_floating_point() and y.min() >= 0
    assert torch.isfinite(x).all()
    if threat is not None:
        assert x.min() >= 0 and x.max() <= 1


# --- Hypothesis: corrupt checkpoints and lying sidecars at models.load(...) ------------------
@dataclass(frozen=True)
class Mutation:
    """One way to damage a checkpoint (printed by Hypothesis when a case fails)."""

    kind: str
    blob: bytes
    pos: int
    protocol: int
    resign: bool
    json_value: object
    arch_name: object
    arch_kwargs: dict
    side_key: str

    def __call__(self, data: bytes, side: dict, marker: Path):
        """(weights bytes, sidecar as dict / JSON text / None) after the damage."""
        kind, blob, pos = self.kind, self.blob, self.pos
        if kind == "bytes":
            data = blob
        elif kind == "length-prefix":
            data = struct.pack("<Q", len(blob)) + blob
        elif kind == "truncate":
            data = data[: pos % len(data)]
        elif kind == "flip":
            b = bytearray(data)
            b[pos % len(b)] ^= 1 + pos % 255
            data = bytes(b)
        elif kind == "header-junk":
            n = struct.unpack("<Q", data[:8])[0]
            data = data[:8] + ((blob * (n // max(len(blob), 1) + 1))[:n] if blob else b"")
        elif kind == "pickle":
            data = pickle.dumps(Payload(marker), protocol=self.protocol)
        elif kind == "no-sidecar":
            return data, None
        elif kind == "sidecar-json":
            return data, json.dumps(self.json_value)
        elif self.side_key == "kwargs":
            side = _arch(side, **self.arch_kwargs)
            side["architecture"]["name"] = self.arch_name
        else:
            side = {**side, self.side_key: self.json_value}
        return data, (_resign(data, side) if self.resign and kind != "sidecar" else side)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
mutations = st.builds(
    Mutation,
    kind=st.sampled_from(
        [
            "bytes",
            "truncate",
            "flip",
            "header-junk",
            "sidecar",
            "sidecar-json",
            "no-sidecar",
            "pickle",
            "length-prefix",
        ]
    ),
    blob=st.binary(max_size=300),
    pos=st.integers(0, 2**31),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    resign=st.booleans(),
    json_value=json_values,
    arch_name=st.sampled_from(["smallcnn", "lenet", "resnet20", "vgg", 3, None]),
    # sizes stay small: a sidecar claiming a huge model is test_load_sidecar_claiming_a_huge_model
    arch_kwargs=st.dictionaries(
        st.sampled_from(
            [
                "num_classes",
                "in_channels",
                "input_size",
                "activation",
                "mean",
                "std",
                "drop",
                "depth",
                "nope",
            ]
        ),
        st.one_of(
            st.integers(-2, 40),
            st.sampled_from(["relu", "tanh", "x", None, True, 0.5, [0.5], [0.1, 0.2], {"a": 1}]),
        ),
        max_size=3,
    ),
    side_key=st.sampled_from(["sha256", "architecture", "format_version", "kwargs"]),
)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.to(a.dtype)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@settings(max_examples=300, **HYP)
@given(mutate=mutations)
def test_hypothesis_load_accepts_only_clear_errors(mutate, ckpt_bytes, tmp_path_factory):
    d = tmp_path_factory.mktemp("hyp", numbered=True)
    marker = d / "pwned"
    data, side = mutate(*ckpt_bytes, marker)
    path = _write(d, data, side)
    try:
        model = rl.models.load(path)
    except (ValueError, FileNotFoundError) as err:
        _outcome(err)
        assert not marker.exists()
        return
    _outcome(None)
    assert not marker.exists()
    assert isinstance(model, nn.Module) and not model.training
    # a successful load holds exactly the weights in the file (which may be a re-signed,
    # still valid variant of the original)
    expected = safetensors.torch.load(path.read_bytes())
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(_same(state[k], expected[k]) for k in expected)
