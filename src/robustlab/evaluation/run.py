"""``evaluate``: clean accuracy, then a cascade of attacks over the still-robust points.

Three steps, each in its own module: the adaptation plan (:mod:`~robustlab.evaluation.adapt`:
BPDA through declared non-differentiable stages, EOT and repeated predictions on a randomised
model, gradient-free attacks where the model has no input gradient: never a crash, never a
silent 'robust'), the cascade (:mod:`~robustlab.evaluation.cascade`: every attack runs only on
points no earlier attack broke, and the prediction on its output is recomputed, so the robust
accuracy is the per-sample worst case over every attack run), and the record
(:mod:`~robustlab.evaluation.record`: event log, progress bar, resumable state, results). A
detector's rejection (it declares ``rejects``) of an adversarial input counts as defended, of a
clean input as an error, and its evaluation records detection figures
(:mod:`~robustlab.evaluation.detection`). With ``out`` an interrupted run continues where it
stopped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_inputs, integer, positive_int
from robustlab.attacks import Attack
from robustlab.attacks.losses import rejects
from robustlab.evaluation.adapt import AttackLike, Step, build, prepare
from robustlab.evaluation.cascade import batch_generator, judge, run_cascade
from robustlab.evaluation.checks import black_box_beats_white_box, eps_covers_box, rejects_clean
from robustlab.evaluation.detection import DetectionWatch
from robustlab.evaluation.record import EvalRecord, Progress
from robustlab.evaluation.results import EvalResult, build_result
from robustlab.evaluation.state import EvalState, fingerprint
from robustlab.evaluation.suites import DEFAULT_DETECTOR, DEFAULT_SMOOTHED, default_suite, get_suite
from robustlab.noise import SmoothedModel
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)


def _channels_last_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with its weights in channels_last layout (faster convolutions on
    CPU, same answer); the caller's model is never converted. None if it cannot be copied."""
    try:
        # Module.to takes memory_format= (documented); torch's annotations leave it out
        return copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    except (TypeError, RuntimeError, copy.Error) as e:
        log.warning("evaluating the model as it is: cannot copy it to channels_last (%s)", e)
        return None


def _specs(
    suite: str | None, attacks: Sequence[AttackLike] | None, threat: ThreatModel, model: nn.Module
) -> tuple[str, list[AttackLike], int]:
    """The suite's name, its attacks for the threat's norm and its repeats; ``custom`` with
    the caller's ``attacks`` and 1 repeat. ``suite`` None: the default for ``model``
    (:func:`~robustlab.evaluation.suites.default_suite`). A loss on the joint
    classifier-and-detector (``detector-margin``) needs a model that rejects."""
    smoothed, detector = isinstance(model, SmoothedModel), rejects(model)
    if attacks is not None:
        _check_joint(list(attacks), detector)
        return "custom", list(attacks), 1
    if suite is None:
        suite = default_suite(smoothed, rejects=detector)
    elif suite == DEFAULT_SMOOTHED and not smoothed:
        raise ValueError(
            f"suite {suite!r} is for smoothed classifiers (robustlab.defenses."
            "Smoothing, or a module with the attributes base, sigma and noise); "
            "this model is not one: use the default suite (suite=None)"
        )
    elif suite == DEFAULT_DETECTOR and not detector:
        raise ValueError(
            f"suite {suite!r} is for detectors (a model that declares rejects: "
            "K + 1 outputs, the last one 'rejected', as robustlab.defenses' "
            "detectors); this model is not one: use the default suite (suite=None)"
        )
    chosen = get_suite(suite)
    return suite, [*chosen.for_norm(threat.norm)], chosen.repeats


def _check_joint(specs: list[AttackLike], detector: bool) -> None:
    """A ``detector-margin`` attack on a model that does not reject: a clear error."""
    for spec in specs:
        loss = (
            spec.loss_name
            if isinstance(spec, Attack)
            else spec[1].get("loss")
            if isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], dict)
            else None
        )
        if loss == "detector-margin" and not detector:
            raise ValueError(
                "the 'detector-margin' loss attacks a detector's K + 1 outputs "
                "(the last one 'rejected'), and this model does not declare "
                "rejects: use the 'ce' or 'cw-margin' loss, or declare rejects = "
                "True (robustlab_reject = True) on a model whose last output is "
                "a rejection"
            )


def _detector_stages(
    suite: str, specs: list[AttackLike], threat: ThreatModel, surrogate: nn.Module | None
) -> tuple[list[AttackLike], list[str]]:
    """The detector suite's stages that can run, and each one left out with its reason: its
    high-confidence C&W stage is crafted on the classifier (the surrogate, by default the
    detector's ``base``) and has no l1 version."""
    if suite != DEFAULT_DETECTOR:
        return specs, []
    if threat.norm == "l1":
        return specs, ["high-confidence C&W: cw-linf has no l1 version"]
    if surrogate is not None:
        return specs, []
    return [s for s in specs if not (isinstance(s, tuple) and s[0] == "transfer")], [
        "high-confidence C&W: the detector has no classifier `base` to craft it on; pass "
        "surrogate=<its classifier>"
    ]


def _search(steps: Sequence[Step]) -> str:
    """How the minimal norms were searched: ``"early-stop"`` if a minimum-norm attack that ran
    stopped at the first point inside eps, else ``"minimal"`` (see
    :func:`~robustlab.evaluation.results.min_norm_curve`)."""
    early = any(
        s.skipped is None and s.attack.minimum_norm and getattr(s.attack, "early_stop", False)
        for s in steps
    )
    return "early-stop" if early else "minimal"


def _default_surrogate(model: nn.Module) -> nn.Module | None:
    """The transfer attack's default surrogate: a smoothed classifier's base model, a
    detector's classifier (its ``base``); None for other models."""
    if not (isinstance(model, SmoothedModel) or rejects(model)):
        return None
    base = getattr(model, "base", None)
    return base if isinstance(base, nn.Module) else None


def _run_flags(
    st: EvalState, detection: dict[str, Any] | None, threat: ThreatModel, x: Tensor
) -> list[dict[str, Any]]:
    """The flags of a finished cascade ``st``: the attacks' own, a detector that rejects the
    clean points, an eps covering the box, a black-box attack beating the white-box ones."""
    flags = list(st.flags)
    if detection and (flag := rejects_clean(detection["detection"]["clean_fpr"], len(x))):
        flags.append(flag)
    if (flag := eps_covers_box(threat, x.shape[1:])) is not None:
        flags.append(flag)
    if (flag := black_box_beats_white_box(st.per_attack, len(x))) is not None:
        flags.append(flag)
    return flags


def _check(
    model: Any, threat: Any, x: Any, y: Any, attacks: Any, surrogate: Any, bpda: Any
) -> None:
    """The argument checks :func:`evaluate` does not leave to the vocabulary."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    check_inputs(x, y, threat)
    if isinstance(attacks, str) or (attacks is not None and not hasattr(attacks, "__iter__")):
        raise TypeError(
            f"attacks must be a list of attacks, names or (name, options) pairs, "
            f"got {attacks!r}; for one attack pass [{attacks!r}]"
        )
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
    if bpda is not None and not isinstance(bpda, bool):
        raise TypeError(f"bpda must be True, False or None (automatic), got {bpda!r}")


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    suite: str | None = None,
    attacks: Sequence[AttackLike] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = True,
    repeats: int | None = None,
    surrogate: nn.Module | None = None,
    config: dict[str, Any] | None = None,
    progress: bool | Progress = False,
    channels_last: bool | None = None,
    bpda: bool | None = None,
    eot: int | None = None,
    log_outputs: bool | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` under ``threat``.

    Args:
        suite: a registered suite name (``robustlab.evaluation.suites()``: ``standard`` is the
            AutoAttack standard cascade, ``fast`` our cheaper one, ``rand`` for randomised
            models, ``smoothed`` for smoothed classifiers), used when ``attacks`` is None;
            None: ``smoothed`` on a smoothed classifier (:class:`~robustlab.noise.SmoothedModel`:
            transfer from its base model, SmoothAdv and EPGD with their own noise draws per
            step, no EOT on top, 3 predictions per point), ``detector`` on a detector (a model
            declaring ``rejects``: APGD-CE, then attacks on the joint classifier-and-detector
            and high-confidence C&W from its classifier), else ``standard``.
        attacks: instead of a suite, attacks as ``Attack`` objects, names or
            ``(name, options)`` pairs, run in this order. ``Attack`` objects run exactly as
            they were built (their own ``bpda`` and EOT draws); names and pairs get the
            evaluation's ``bpda`` and ``eot``.
        batch_size: points per attack call.
        seed: seeds the attacks' generators (one per attack and batch: deterministic results,
            also across an interruption).
        out: directory for ``results.json``, ``per_sample.jsonl``, ``summary.md``, the event
            log ``eval_log.jsonl`` and the resumable state ``eval_state.safetensors`` (removed
            once the results are written).
        resume: continue from the state in ``out`` if there is one (it must belong to the same
            model, data and settings); False starts over.
        repeats: predictions per point, robust only if a strict majority is correct (for
            randomised models); default: the suite's (``rand``: 10, others 1), and at least
            10 on a randomised model.
        surrogate: a model for the ``transfer`` attack (crafted on it, replayed on ``model``);
            on a smoothed classifier default its base model, on a detector its classifier
            (``base``).
        config: extra JSON-able context recorded in the results (checkpoint, data set, ...).
        progress: True: a progress bar on stderr, below a header line saying what is about to
            run (points, threat model, attacks); its unit is one attack step (or query) on one
            point (:func:`~robustlab.evaluation.record.attack_units`), so its rate and ETA count
            the work left, not batches of unequal cost. (A
            :class:`~robustlab.evaluation.record.Progress`: a bar shared with a larger run,
            as the audit's stages share one.)
        channels_last: attack a copy of the model with channels_last weights (about 1.3x faster
            per step on CPU, see BENCHMARKS.md); None: on for 4-D inputs on CPU.
        bpda: run the gradient attacks with BPDA through the model's non-differentiable stages
            (modules declaring ``differentiable = False``); None: whenever it has some.
        eot: average each gradient of the gradient attacks over this many draws; None: 20 on a
            randomised model (a module declares ``randomized``, or two forward passes
            differ), else each attack's own setting.
        log_outputs: run the attacks on the logarithm of the model's outputs (probabilities
            become logits up to a per-row constant; :mod:`~robustlab.evaluation.outputs`);
            None: whenever the outputs are probabilities (the ``softmax-output`` flag).
            Saturated logits (median top-2 gap over 50 on the probe batch, e.g. a temperature
            of 100) are attacked at a temperature that brings the gap to 10. Predictions are
            always the model's own; ``record["adaptive"]`` says what the attacks saw and why.

    Returns:
        :class:`EvalResult`; robust accuracy counts a point robust only if it is classified
        correctly without attack and after every attack. Where a minimum-norm attack (FAB,
        DDN, C&W L2) gives every clean-correct point a norm, ``record["min_norm_curve"]`` holds
        robust accuracy against eps; a minimum-norm attack named first in the list runs
        without early stop for it (its whole search on every point: slower than stopping at the
        first point inside eps), so the curve holds at every eps from 0
        (``record["min_norm_search"] == "minimal"``); a curve from early-stopped norms starts at
        eps (``"early-stop"``). An eps whose ball covers the whole input box raises the
        ``eps-covers-box`` flag. On a randomised model ``record["robust_accuracy_se"]`` (and
        ``clean_accuracy_se``) is the standard error of the majority-vote accuracy over the
        model's randomness (:func:`~robustlab.evaluation.results.spread`); above 1 point it
        raises the ``unstable-estimate`` flag. On a detector ``record["detection"]`` holds the
        clean false-positive rate and, per attack, the AUROC of the detection score and the
        true-positive rate at the fitted threshold (:mod:`~robustlab.evaluation.detection`
        says over which points); a detector rejecting half the clean points or more raises
        ``rejects-clean``.
    """
    _check(model, threat, x, y, attacks, surrogate, bpda)
    batch_size, seed = positive_int(batch_size, "batch_size"), integer(seed, "seed")
    repeats = None if repeats is None else positive_int(repeats, "repeats")
    eot = None if eot is None else positive_int(eot, "eot")
    suite_name, specs, suite_repeats = _specs(suite, attacks, threat, model)
    device = next(iter(model.parameters()), torch.empty(0)).device
    x, y = x.detach().cpu(), y.detach().cpu().long()
    record = EvalRecord(out, batch_size=batch_size, progress=progress)
    if channels_last is None:
        channels_last = x.dim() == 4 and device.type == "cpu"
    fast = _channels_last_copy(model) if channels_last and x.dim() == 4 else None
    original, model = model, fast if fast is not None else model
    surrogate = surrogate if surrogate is not None else _default_surrogate(model)
    specs, left_out = _detector_stages(suite_name, specs, threat, surrogate)
    built = [build(s, threat, surrogate) for s in specs]
    with eval_mode(model):
        flags, adapt, steps = prepare(
            model,
            x,
            y,
            specs,
            built,
            threat,
            surrogate,
            bpda=bpda,
            eot=eot,
            repeats=repeats,
            suite_repeats=suite_repeats,
            log_outputs=log_outputs,
        )
        watch = DetectionWatch(model, steps) if adapt.rejects else None
        settings = {
            "threat": threat.to_dict(),
            "attacks": [s.attack.config() for s in steps],
            "seed": seed,
            "batch_size": batch_size,
            "repeats": adapt.repeats,
        }
        if adapt.outputs_reason is not None:  # other outputs, other attacks: another state
            settings["outputs"] = [adapt.log_outputs, adapt.temperature]
        fp = fingerprint(original, x, y, settings) if out is not None else ""
        clean, pred, fraction = judge(model, x, y, batch_size, device, adapt.repeats)
        if watch is not None:
            watch.score_clean(x, batch_size, device)
        clean_time = record.elapsed()
        st = record.resume(fp, resume) or EvalState.fresh(clean, pred, x, fraction, adapt.repeats)
        record.start(st, steps, suite=suite_name, threat=threat)
        if watch is not None:
            watch.resumed_at(st.attack, st.batch)
        run_cascade(
            model,
            steps if watch is None else watch.steps,
            x,
            y,
            st,
            batch_size=batch_size,
            repeats=adapt.repeats,
            generators=lambda i, j: batch_generator(seed, i, j, device),
            record=record,
            view=adapt.view(model),
        )
        record.end(clean, st)
    detection = None if watch is None else {"detection": watch.figures(st.per_attack, left_out)}
    flags += _run_flags(st, detection, threat, x)
    result = build_result(
        st,
        x,
        y,
        pred,
        clean,
        threat,
        flags,
        {
            "suite": suite_name,
            "attacks": [s.attack.config() for s in steps],
            "seed": seed,
            "batch_size": batch_size,
            "repeats": adapt.repeats,
            "channels_last": fast is not None,
            "adaptive": adapt.to_dict(),
            "config": config or {},
            "timings": {"clean_s": clean_time, "total_s": record.elapsed()},
            **(detection or {}),
        },
        search=_search(steps),
    )
    record.finish(result)
    return result
