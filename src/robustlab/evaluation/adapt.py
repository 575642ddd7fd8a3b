"""The adaptation plan: what the evaluation changes about its attacks for this model, and why.

Athalye et al. 2018: a model with stages that declare themselves non-differentiable (JPEG,
quantisation, thermometer encoding, ...) is attacked with BPDA through them; a randomised one
(declared, or seen to differ between two forward passes) with EOT gradients, and judged by a
strict majority of repeated predictions; a gradient attack is skipped where the model has no
input gradient as the attack runs it, and gradient-free attacks (and the transfer attack, given
a surrogate) stand in when no attack is left; probabilities and saturated logits are attacked
through their logarithm and a temperature (:mod:`robustlab.evaluation.outputs`).
:class:`Adaptation` holds the decisions with their evidence and is recorded in the results
under ``adaptive``; :func:`plan` turns a list of attacks into the :class:`Step` s the cascade
(:mod:`robustlab.evaluation.cascade`) runs. The audit (:mod:`robustlab.evaluation.audit`) makes
the same decisions through this module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustlab._validate import check_labels, probe_model
from robustlab.attacks import Attack, create_for_evaluation
from robustlab.attacks.bpda import bpda as bpda_mode
from robustlab.attacks.bpda import nondifferentiable_stages
from robustlab.attacks.losses import rejects
from robustlab.evaluation.checks import gradient_health, run_checks
from robustlab.evaluation.outputs import OutputView, output_plan
from robustlab.noise import SmoothedModel
from robustlab.threat import ThreatModel

AttackLike = Attack | tuple[str, dict[str, Any]] | str

#: gradient-free attacks run on a model without input gradients when its suite has none
FALLBACK: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "linf": [("square", {"n_queries": 5000, "p_init": 0.8}), ("rays", {})],
    "l2": [("square", {"n_queries": 5000, "p_init": 0.8})],
    "l1": [],
    "l0": [("sparse-rs", {"n_queries": 10000})],
}
EOT_SAMPLES = 20  # AutoAttack's rand version (Croce & Hein 2020)
RANDOM_REPEATS = 10  # predictions per point on a randomised model, as the rand suite
#: predictions per point on a smoothed classifier: it already votes over its own n draws, so
#: repeated predictions differ only near its decision boundary
SMOOTHED_REPEATS = 3
SMOOTHED_OUTPUTS = (
    "smoothed classifier: its attacks differentiate the base model's logits "
    "(or the soft smoothed classifier's), so its own outputs are not rescaled"
)
NO_GRADIENT = "skipped: the model has no input gradient (see the no-gradient flag)"


@dataclass
class Adaptation:
    """The evaluation's decisions for one model.

    Attributes:
        bpda: gradient attacks run with BPDA through ``bpda_stages`` (the names of the
            submodules declaring themselves non-differentiable; ``""`` is the model itself).
        eot: gradient draws averaged per step (1: plain gradients).
        repeats: predictions per point; robust only by a strict majority of them.
        randomised: the evidence for EOT and repeats: a module declares randomness or two
            forward passes differed (the ``randomised-output`` flag).
        rejects: the model is a detector whose last output is a rejection.
        log_outputs: the attacks run on the logarithm of the model's outputs (probabilities).
        temperature: the attacks see the (log-)outputs divided by this (saturated logits; 1:
            as they are).
        outputs_reason: why the attacks see other outputs than the model's (None: they don't).
        auto: per setting (``bpda``, ``eot``, ``log_outputs``), True where chosen here rather
            than forced by the caller.
        smoothed: for a smoothed classifier (:class:`~robustlab.noise.SmoothedModel`), its
            noise (``sigma``, ``noise``) and own draws per prediction ``n`` (None if it has no
            ``samples``); None for other models. Its automatic EOT is 1: the smoothing-aware
            attacks (SmoothAdv, EPGD) draw their own m noise samples per step, and a gradient
            through the module itself already averages its n draws.
    """

    bpda: bool
    bpda_stages: list[str]
    eot: int
    repeats: int
    randomised: bool
    rejects: bool
    auto: dict[str, bool] = field(default_factory=dict)
    log_outputs: bool = False
    temperature: float = 1.0
    outputs_reason: str | None = None
    smoothed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The results' ``adaptive`` section."""
        return {
            "bpda": self.bpda,
            "bpda_stages": list(self.bpda_stages),
            "eot": self.eot,
            "repeats": self.repeats,
            "randomised": self.randomised,
            "rejects": self.rejects,
            "auto": dict(self.auto),
            "log_outputs": self.log_outputs,
            "temperature": self.temperature,
            "outputs_reason": self.outputs_reason,
            "smoothed": None if self.smoothed is None else dict(self.smoothed),
        }

    def view(self, model: nn.Module) -> nn.Module:
        """``model`` as the attacks see it: an :class:`~robustlab.evaluation.outputs.OutputView`
        with the log and the temperature, or ``model`` itself where neither applies."""
        if not self.log_outputs and self.temperature == 1.0:
            return model
        return OutputView(model, log=self.log_outputs, temperature=self.temperature)

    def apply(self, atk: Attack) -> Attack:
        """A gradient attack with these BPDA and EOT settings (a copy: the caller's attack is
        left as it was); automatic EOT never lowers an attack's own number of draws."""
        if not atk.uses_gradients:
            return atk
        atk = copy.copy(atk)
        if not self.auto["bpda"] or self.bpda:
            atk.bpda = self.bpda
        if not self.auto["eot"] or self.eot > atk.eot_samples:
            atk.eot_samples = self.eot
        return atk


def smoothing_of(model: nn.Module) -> dict[str, Any] | None:
    """``{"sigma", "noise", "n"}`` of a smoothed classifier (``n``: its draws per prediction,
    None if it declares none), None for any other model."""
    if not isinstance(model, SmoothedModel):
        return None
    n = getattr(model, "samples", None)
    return {
        "sigma": float(model.sigma),
        "noise": model.noise,
        "n": n if isinstance(n, int) else None,
    }


def adaptation(
    model: nn.Module,
    flags: list[dict[str, Any]],
    *,
    bpda: bool | None = None,
    eot: int | None = None,
    repeats: int | None = None,
    suite_repeats: int = 1,
    log_outputs: bool | None = None,
    probe: tuple[Tensor, Tensor] | None = None,
) -> Adaptation:
    """Decide BPDA, EOT, repeats and the outputs the attacks see for ``model`` from its
    declarations and the sanity ``flags`` of its probe batch ``probe`` (inputs, outputs);
    ``bpda``, ``eot``, ``repeats``, ``log_outputs`` force a setting (None: automatic).
    Repeats default to the suite's, at least :data:`RANDOM_REPEATS` on a randomised model
    (:data:`SMOOTHED_REPEATS` on a smoothed classifier); EOT to :data:`EOT_SAMPLES` draws on a
    randomised model, else 1 (also 1 on a smoothed classifier: no EOT on top of its own
    draws); the log of the outputs where they are probabilities, a temperature where they are
    saturated (:func:`~robustlab.evaluation.outputs.output_plan`; without ``probe`` or on a
    smoothed classifier: neither)."""
    if log_outputs is not None and not isinstance(log_outputs, bool):
        raise TypeError(f"log_outputs must be True, False or None (automatic), got {log_outputs!r}")
    auto = {"bpda": bpda is None, "eot": eot is None, "log_outputs": log_outputs is None}
    smoothed = smoothing_of(model)
    log, temperature, why = False, 1.0, None
    if smoothed is not None:
        if log_outputs:
            raise ValueError(
                "log_outputs=True cannot be used on a smoothed classifier: its "
                "attacks differentiate its base model; leave log_outputs=None"
            )
        why = SMOOTHED_OUTPUTS
    elif probe is not None:
        probabilities = any(f["name"] == "softmax-output" for f in flags)
        log, temperature, why = output_plan(model, *probe, probabilities, log_outputs)
    stages = nondifferentiable_stages(model)
    randomised = any(f["name"] == "randomised-output" for f in flags)
    if repeats is None:
        least = SMOOTHED_REPEATS if smoothed is not None else RANDOM_REPEATS
        repeats = max(suite_repeats, least) if randomised else suite_repeats
    if eot is None:
        eot = EOT_SAMPLES if randomised and smoothed is None else 1
    return Adaptation(
        bpda=bool(stages) if bpda is None else bpda,
        bpda_stages=stages,
        eot=eot,
        repeats=repeats,
        randomised=randomised,
        rejects=rejects(model),
        auto=auto,
        log_outputs=log,
        temperature=temperature,
        outputs_reason=why,
        smoothed=smoothed,
    )


def lacks_gradient(
    model: nn.Module, x: Tensor, y: Tensor, flags: list[dict[str, Any]], *, with_bpda: bool
) -> bool:
    """The model has no input gradient as an attack runs it: its own no-gradient flag, checked
    again with its BPDA stages switched on when ``with_bpda`` (BPDA may restore the path; it
    never removes one). The model must be in eval mode."""
    if not any(f["name"] == "no-gradient" for f in flags):
        return False
    if not with_bpda:
        return True
    with bpda_mode(model):
        still = gradient_health(model, x, y)
    return still is not None and still["name"] == "no-gradient"


def build(spec: AttackLike, threat: ThreatModel, surrogate: nn.Module | None) -> Attack:
    """An attack from an ``Attack`` (checked against ``threat``), a name or a
    ``(name, options)`` pair; the transfer attack gets ``surrogate`` unless it names one."""
    if isinstance(spec, Attack):
        if spec.threat != threat:
            raise ValueError(f"attack {spec!r} has threat {spec.threat}, evaluation has {threat}")
        return spec
    if isinstance(spec, str):
        spec = (spec, {})
    if not (isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise TypeError(
            f"attack spec {spec!r} must be an Attack, a name or a (name, options "
            "dict) pair, e.g. ('pgd', {'steps': 20})"
        )
    name, opts = spec[0], dict(spec[1])
    if name == "transfer" and "surrogate" not in opts:
        if surrogate is None:
            raise ValueError(
                "the transfer attack needs a surrogate model: pass "
                "evaluate(..., surrogate=model) or ('transfer', {'surrogate': m})"
            )
        opts["surrogate"] = surrogate
    return create_for_evaluation(name, threat, **opts)


class Step(NamedTuple):
    """One attack of the cascade and why it is skipped (None: it runs)."""

    attack: Attack
    skipped: str | None


def plan(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    flags: list[dict[str, Any]],
    specs: list[AttackLike],
    built: list[Attack],
    adapt: Adaptation,
    threat: ThreatModel,
    surrogate: nn.Module | None,
) -> list[Step]:
    """The cascade's steps for the attacks ``built`` from ``specs`` (:func:`build`) on
    ``model`` (in eval mode; ``x, y``: its probe batch): those built from names and pairs get
    ``adapt``'s BPDA and EOT (``Attack`` objects run as they were built); a gradient
    attack is skipped where the model has no input gradient as it runs it (with its BPDA
    stages switched on, if it uses them), and gradient-free ones are added if no attack is
    left."""
    built = [
        a if isinstance(s, Attack) else adapt.apply(a) for s, a in zip(specs, built, strict=True)
    ]
    no_gradient = lacks_gradient(model, x, y, flags, with_bpda=False)
    bpda_no_gradient = (
        lacks_gradient(model, x, y, flags, with_bpda=True)
        if any(a.bpda for a in built)
        else no_gradient
    )

    def blocked(a: Attack) -> bool:
        return a.uses_gradients and (bpda_no_gradient if a.bpda else no_gradient)

    steps = [Step(a, NO_GRADIENT if blocked(a) else None) for a in built]
    if all(blocked(a) for a in built):
        extra = list(FALLBACK[threat.norm])
        if surrogate is not None:
            extra.append(("transfer", {}))
        steps += [Step(build(s, threat, surrogate), None) for s in extra]
    if all(s.skipped for s in steps):
        raise ValueError(
            f"the model has no input gradient and no gradient-free attack exists for "
            f"{threat.norm}: pass a surrogate model for the transfer attack"
        )
    return to_minimal_norm(steps, specs)


def to_minimal_norm(steps: list[Step], specs: list[AttackLike]) -> list[Step]:
    """The first attack that runs attacks every clean-correct point; if it is a minimum-norm
    attack built from a name or pair, it runs without early stop (a copy), to the smallest
    perturbation its search finds, so that the minimum-norm curve it gives is valid below eps
    too (early stop keeps the first adversarial point inside eps, whose norm only bounds the
    minimal one). Cost: its full search on every point rather than up to the first point
    inside eps. Later attacks see only the points earlier ones left and give no curve, so they
    keep early stop."""
    first = next(i for i, s in enumerate(steps) if s.skipped is None)
    atk = steps[first].attack
    from_name = first >= len(specs) or not isinstance(specs[first], Attack)
    if atk.minimum_norm and from_name and getattr(atk, "early_stop", False):
        atk = copy.copy(atk)
        setattr(atk, "early_stop", False)  # noqa: B010 (only some attacks have the option)
        steps = [*steps[:first], Step(atk, None), *steps[first + 1 :]]
    return steps


def prepare(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    specs: list[AttackLike],
    built: list[Attack],
    threat: ThreatModel,
    surrogate: nn.Module | None,
    *,
    bpda: bool | None,
    eot: int | None,
    repeats: int | None,
    suite_repeats: int,
    log_outputs: bool | None = None,
) -> tuple[list[dict[str, Any]], Adaptation, list[Step]]:
    """Probe ``model`` (in eval mode) on the first 64 points of ``(x, y)`` (CPU): its sanity
    flags (:func:`~robustlab.evaluation.checks.run_checks`), its :func:`adaptation` and the
    cascade's steps (:func:`plan`); the labels are checked against its number of classes."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    xp, yp = x[:64].to(device), y[:64].to(device)
    logits = probe_model(model, xp)
    check_labels(y, logits.shape[1])
    flags = run_checks(model, xp, yp, logits)
    adapt = adaptation(
        model,
        flags,
        bpda=bpda,
        eot=eot,
        repeats=repeats,
        suite_repeats=suite_repeats,
        log_outputs=log_outputs,
        probe=(xp, logits),
    )
    return flags, adapt, plan(model, xp, yp, flags, specs, built, adapt, threat, surrogate)
