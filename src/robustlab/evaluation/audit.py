"""``audit``: the evaluation checklist of Carlini et al. 2019 run as a program.

A defense that only looks robust (masked, shattered or random gradients; Athalye, Carlini,
Wagner 2018 broke 7 of 9 ICLR 2018 defenses this way) fails some of the checks below, each
reported as PASS, FLAG or SKIP with the evidence:

- ``iterative-beats-single-step``: PGD leaves no more points than FGSM;
- ``adaptive-matches-naive``: the adaptive attacks (BPDA through non-differentiable stages,
  EOT over randomness, margin losses, gradient-free and transfer attacks) find less than
  5 point-percent beyond plain PGD-20 on the cross-entropy (the usual gap between PGD-20 and
  the strongest attacks on an honest model is a few points; like every attack, it sees the
  log of probability outputs and saturated logits at a temperature, see ``gradients``);
- ``adaptive-detector-attack`` (detectors only; for other models a SKIP saying why, under
  ``not_applicable`` in the audit section rather than among the checks): the
  attacks on the joint classifier-and-detector (Carlini & Wagner 2017: the ``detector-margin``
  loss, which wants a wrong class and no rejection; high-confidence C&W crafted on the
  classifier), run right after plain PGD-20, break less than 5 point-percent beyond it;
- ``white-box-beats-black-box`` / ``white-box-beats-transfer``: Square, NAttack (score-based),
  RayS (decision-based, linf only: no l2/l1 hard-label attack is registered) and a transfer
  attack from a surrogate (the defense's undefended base model) break nothing the white-box
  attacks missed (without a surrogate: SKIP, saying why);
- ``monotone-in-eps``: robust accuracy never rises with eps (0.25x to 4x the threat's eps);
- ``unbounded-attack-succeeds``: an attack whose ball covers the whole input box breaks every
  point;
- ``convergence``: twice the steps and three restarts break < 1 point-percent more;
- ``randomness``: a randomised model (declared, or two forward passes differ) is attacked with
  EOT and judged by repeated predictions;
- ``gradients``: zero, NaN, missing or shattered input gradients (BPDA is used through declared
  non-differentiable stages; without gradients only gradient-free and transfer attacks run;
  probabilities and saturated logits are attacked through their log and a temperature, as in
  :func:`~robustlab.evaluation.evaluate`);
- ``binarization-test``: Zimmermann et al. 2022's test, on a problem built from the model's own
  features where an adversarial example is known to exist, the adaptive attack must succeed
  (one boundary point against 99 inner ones, so that random points of the sphere mostly do not
  succeed and the test has teeth; their rate is in the evidence).

The attacks and their order are planned in :mod:`~robustlab.evaluation.audit_plan`; on a
detector the eps sweep and the unbounded attack add PGD on the joint classifier-and-detector.
On a smoothed classifier (:class:`~robustlab.noise.SmoothedModel`) the adaptive attacks add
SmoothAdv and EPGD (8 noise draws of their own per step, no EOT on top), the eps sweep runs EPGD
on the CW margin, and the transfer surrogate is its base model.

The robust accuracy is the per-sample worst case over every attack run (naive and adaptive),
and the results use the schema of :func:`~robustlab.evaluation.evaluate` with an ``audit``
section. The checks are necessary conditions, not a proof of robustness.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_inputs, check_labels, integer, positive_int, probe_model
from robustlab.attacks import Attack, create_for_evaluation
from robustlab.defenses.base import Defense
from robustlab.evaluation.adapt import Adaptation, adaptation, lacks_gradient
from robustlab.evaluation.audit_plan import SidePlan, cascade_plan, side_plan
from robustlab.evaluation.binarization import binarization_test
from robustlab.evaluation.checks import run_checks, shattered_gradient
from robustlab.evaluation.detection import joint_stage
from robustlab.evaluation.record import Progress, attack_units
from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.run import evaluate
from robustlab.evaluation.suites import AttackSpec
from robustlab.evaluation.sweep import SweepResult, eps_sweep
from robustlab.evaluation.verdicts import (
    FLAG,
    SKIP,
    adaptive_detector,
    adaptive_vs_naive,
    binarization,
    broken_after,
    convergence,
    gradients,
    iterative,
    monotone,
    randomness,
    unbounded_attack,
)
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)

EPS_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class AuditResult:
    """Outcome of :func:`audit`.

    Attributes:
        robust_accuracy: per-sample worst case over every attack of the audit.
        clean_accuracy: accuracy without attack.
        checks: one dict per check: ``name``, ``status`` (PASS / FLAG / SKIP), ``evidence``.
        flags: the evaluation's sanity flags plus one per FLAG check (``audit:<check>``).
        evaluation: the :class:`EvalResult` of the attack cascade (naive, adaptive,
            black-box, transfer, convergence), its record extended with the ``audit`` section.
    """

    robust_accuracy: float
    clean_accuracy: float
    checks: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    evaluation: EvalResult = field(repr=False)

    @property
    def record(self) -> dict[str, Any]:
        return self.evaluation.record

    @property
    def passed(self) -> bool:
        """No check flagged."""
        return all(c["status"] != FLAG for c in self.checks)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, ``per_sample.jsonl`` and ``summary.md`` into ``out``."""
        return self.evaluation.save(out)


def _default_surrogate(model: nn.Module, x: Tensor) -> tuple[nn.Module | None, str]:
    """``(surrogate, why none)``: the undefended base model of a defense (:attr:`Defense.base`,
    a smoothed classifier's ``base`` included; of another wrapper its ``base`` or ``model``
    attribute), if it classifies the inputs itself (a thermometer model's base takes the
    encoding instead); else None and the reason."""
    base = (
        model.base
        if isinstance(model, Defense)
        else getattr(model, "base", getattr(model, "model", None))
    )
    if not isinstance(base, nn.Module) or base is model:
        return None, (
            "the model is not a robustlab defense and has no `base` or `model` "
            "module; pass surrogate=<its undefended model>"
        )
    try:
        with eval_mode(base):
            probe_model(base, x[:2])
    except (ValueError, RuntimeError) as e:
        log.info("no transfer surrogate: the base model does not take the inputs (%s)", e)
        return None, (
            f"its base model does not take the inputs ({e}); pass surrogate=<a model that does>"
        )
    return base, ""


def _check(model: Any, x: Any, y: Any, threat: Any, surrogate: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    check_inputs(x, y, threat)
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def audit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    surrogate: nn.Module | None = None,
    steps: int = 100,
    queries: int = 5000,
    eot: int | None = None,
    binarization_points: int = 20,
    check_points: int = 200,
    batch_size: int = 500,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    log_outputs: bool | None = None,
) -> AuditResult:
    """Audit the robustness of ``model`` (any ``nn.Module`` classifier) on ``(x, y)``.

    Args:
        surrogate: model for the transfer attack; default: the defense's undefended base model
            (``model.base``, a smoothed classifier's base model included) when it takes the
            same inputs, else no transfer attack (its check is a SKIP saying why).
        steps: steps of the adaptive APGD-CE attack (the convergence check runs 2x steps with
            3 restarts); the plain PGD baseline runs 20; SmoothAdv and EPGD on a smoothed
            classifier (and the EPGD of its eps sweep) ``min(steps, 20)``, 8 draws per step.
        queries: query budget of each gradient-free attack (Square; NAttack gets
            ``queries // 300`` population steps of 300).
        eot: EOT draws for the adaptive attacks; default 20 on a randomised model, else 1.
        binarization_points: points of the binarization test (0 skips it).
        check_points: points of the eps sweep and the unbounded attack (the first ones).
        batch_size, seed: as for :func:`~robustlab.evaluation.evaluate`.
        out: directory for ``results.json``, ``per_sample.jsonl`` and ``summary.md``.
        config: extra JSON-able context recorded in the results.
        progress: True: one progress bar on stderr over every stage (the cascade, FGSM, the
            eps sweep, the unbounded attack, the binarization test), below a header line
            naming them; its unit is one attack step (or query) on one point, its total the
            work of all stages, so its ETA is the audit's.
        log_outputs: attack the logarithm of the model's outputs; None: where they are
            probabilities (see :func:`~robustlab.evaluation.evaluate`, which also rescales
            saturated logits); recorded under ``adaptive``.

    Returns:
        :class:`AuditResult`: ``robust_accuracy``, ``checks``, ``flags``.
    """
    _check(model, x, y, threat, surrogate)
    steps, queries = positive_int(steps, "steps"), positive_int(queries, "queries")
    binarization_points = integer(binarization_points, "binarization_points", minimum=0)
    check_points = positive_int(check_points, "check_points")
    device = _device(model)
    x, y = x.detach().cpu(), y.detach().cpu().long()
    surrogate, no_surrogate = (
        (surrogate, "") if surrogate is not None else _default_surrogate(model, x[:2].to(device))
    )
    # 1. What the model is: randomness, gradients, stages without gradients.
    num_classes, flags, adaptive, no_gradient = _inspect(model, x, y, device, eot, log_outputs)
    # 2. The cascade: naive PGD, the adaptive attacks, black-box, transfer, convergence.
    cascade, n_black = cascade_plan(threat, adaptive, num_classes, steps, queries, surrogate)
    side = side_plan(
        threat,
        x,
        adaptive,
        no_gradient,
        factors=EPS_FACTORS,
        steps=steps,
        queries=queries,
        check_points=check_points,
        binarization_points=binarization_points,
    )
    bar = _progress(progress, cascade, side, x, threat)
    common: _Common = {
        "batch_size": batch_size,
        "seed": seed,
        "repeats": adaptive.repeats,
        "progress": bar or False,
        "log_outputs": log_outputs,
    }
    try:
        main = evaluate(
            model, x, y, threat, attacks=cascade, surrogate=surrogate, config=config, **common
        )
        stages, n = main.per_attack, len(x)
        # 3. Separate runs: FGSM, the eps sweep, the unbounded attack, the binarization test.
        naive_skipped = bool(stages[0].get("skipped"))
        runs = _side_runs(model, x, y, threat, adaptive, side, naive_skipped, common, bar)
    finally:
        if bar is not None:
            bar.close()
    # 4. The verdicts.
    naive_acc = stages[0]["robust_accuracy"]
    # a check that does not apply to this kind of model is recorded apart, with its reason
    detector = adaptive_detector(stages, n, adaptive.rejects)
    checks = [
        iterative(None if runs.fgsm is None else runs.fgsm.robust_accuracy, naive_acc),
        adaptive_vs_naive(naive_acc, main.robust_accuracy, naive_skipped),
        *([detector] if adaptive.rejects else []),
        broken_after(
            stages,
            n,
            lambda a: not a.get("uses_gradients", True) and a["config"]["name"] != "transfer",
            "white-box-beats-black-box",
            "the black-box attacks (Square, NAttack; RayS for linf)",
            n_black > 0,
        ),
        _because(
            broken_after(
                stages,
                n,
                lambda a: a["config"]["name"] == "transfer" and not joint_stage(a["config"]),
                "white-box-beats-transfer",
                "the transfer attack",
                surrogate is not None,
            ),
            no_surrogate,
        ),
        monotone(runs.sweep),
        unbounded_attack(runs.unbounded, runs.big),
        convergence(stages[-1], n),
        randomness(adaptive),
        gradients(flags, adaptive, no_gradient),
        binarization(runs.binarization, binarization_points, no_gradient),
    ]
    result = _result(
        main,
        flags,
        checks,
        runs,
        adaptive,
        naive_acc,
        surrogate is not None,
        [] if adaptive.rejects else [detector],
    )
    if out is not None:
        result.save(out)
    return result


def _because(check: dict[str, Any], reason: str) -> dict[str, Any]:
    """``check`` with ``reason`` added to the evidence of a SKIP."""
    return (
        check | {"evidence": check["evidence"] + f": {reason}"}
        if (check["status"] == SKIP and reason)
        else check
    )


def _inspect(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    eot: int | None,
    log_outputs: bool | None,
) -> tuple[int, list[dict[str, Any]], Adaptation, bool]:
    """Number of classes, sanity flags (shattered gradients checked unless randomised),
    adaptation, and whether the model lacks an input gradient as the adaptive attacks run."""
    with eval_mode(model):
        xp, yp = x[:64].to(device), y[:64].to(device)
        logits = probe_model(model, xp)
        check_labels(y, logits.shape[1])
        flags = run_checks(model, xp, yp, logits)
        adaptive = adaptation(model, flags, eot=eot, log_outputs=log_outputs, probe=(xp, logits))
        if not adaptive.randomised:
            shattered = shattered_gradient(model, xp, yp)
            if shattered is not None:
                flags.append(shattered)
        no_gradient = lacks_gradient(model, xp, yp, flags, with_bpda=adaptive.bpda)
    return logits.shape[1], flags, adaptive, no_gradient


class _Common(TypedDict):
    """The options of :func:`evaluate` that every evaluation of the audit shares."""

    batch_size: int
    seed: int
    repeats: int
    progress: bool | Progress
    log_outputs: bool | None


class _Runs(NamedTuple):
    """The audit's runs besides its cascade (None: not run)."""

    fgsm: EvalResult | None
    sweep: SweepResult | None
    big: ThreatModel
    unbounded: EvalResult | None
    binarization: dict[str, Any] | None


def _progress(
    progress: bool, cascade: list[Attack], side: SidePlan, x: Tensor, threat: ThreatModel
) -> Progress | None:
    """With ``progress``: one bar over every stage of the audit, planned stage by stage in
    attack steps x points, below a header line naming the stages."""
    if not progress:
        return None

    def work(specs: list[AttackSpec], t: ThreatModel) -> int:
        return sum(attack_units(create_for_evaluation(a, t, **o)) for a, o in specs)

    plan = [("cascade", sum(attack_units(a) for a in cascade) * len(x)), ("fgsm", len(x))]
    for eps in side.grid:
        plan.append(
            ("eps sweep", work(side.probe, dataclasses.replace(threat, eps=eps)) * side.points)
        )
    if side.unbounded:
        plan.append(("unbounded", work(side.unbounded, side.big) * side.points))
    if side.binarization is not None:  # the attack on each point, features of 100 points
        plan.append(
            ("binarization", (attack_units(side.binarization) + 100) * side.binarization_points)
        )
    lo, hi = threat.bounds
    names = ", ".join(f"{k + 1}:{a.name}" for k, a in enumerate(cascade))
    return Progress(
        desc="audit",
        plan=plan,
        header=(
            f"audit: {len(x)} points, {threat.norm} eps {threat.eps:g} in [{lo:g}, {hi:g}]; "
            f"cascade {names}; then FGSM, an eps sweep ({len(side.grid)} eps), an unbounded attack "
            f"({side.points} points each) and the binarization test "
            f"({side.binarization_points if side.binarization is not None else 0} points)"
        ),
    )


def _side_runs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    adaptive: Adaptation,
    side: SidePlan,
    naive_skipped: bool,
    common: _Common,
    bar: Progress | None,
) -> _Runs:
    """FGSM, the eps sweep, the unbounded attack and the binarization test, in this order."""
    if naive_skipped and bar is not None:
        bar.drop("fgsm")
    fgsm = (
        None
        if naive_skipped
        else evaluate(
            model, x, y, threat, attacks=[create_for_evaluation("fgsm", threat)], **common
        )
    )
    xs, ys = x[: side.points], y[: side.points]
    sweep = (
        eps_sweep(model, xs, ys, threat, side.grid, attacks=side.probe, **common)
        if side.grid
        else None
    )
    unbounded = (
        evaluate(model, xs, ys, side.big, attacks=side.unbounded, **common)
        if side.unbounded
        else None
    )
    binar = None
    if side.binarization is not None:
        if bar is not None:
            bar.next_stage()
            bar.bar.set_description("binarization test")
        xb, yb = (t[: side.binarization_points].to(_device(model)) for t in (x, y))
        binar = binarization_test(
            model,
            xb,
            yb,
            threat,
            side.binarization,
            n_inner=99,
            n_boundary=1,
            seed=common["seed"],
            repeats=min(adaptive.repeats, 5),
        )
        if bar is not None:
            bar.bar.update((attack_units(side.binarization) + 100) * len(xb))
    return _Runs(fgsm, sweep, side.big, unbounded, binar)


def _result(
    main: EvalResult,
    flags: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    runs: _Runs,
    adaptive: Adaptation,
    naive_acc: float,
    surrogate: bool,
    not_applicable: list[dict[str, Any]],
) -> AuditResult:
    """The audit's result: the cascade's, its record extended with the ``audit`` section
    (``not_applicable``: the checks for another kind of model, SKIP with the reason)."""
    audit_flags = [
        {"name": f"audit:{c['name']}", "message": c["evidence"]}
        for c in checks
        if c["status"] == FLAG
    ]
    all_flags = list({f["name"]: f for f in main.flags + flags + audit_flags}.values())
    record = main.record | {
        "suite": "audit",
        "flags": all_flags,
        "audit": {
            "checks": checks,
            "not_applicable": not_applicable,
            "naive_robust_accuracy": naive_acc,
            "fgsm_robust_accuracy": None if runs.fgsm is None else runs.fgsm.robust_accuracy,
            "eps_curve": runs.sweep.curve if runs.sweep else [],
            "unbounded": {
                "eps": runs.big.eps,
                "robust_accuracy": None
                if runs.unbounded is None
                else runs.unbounded.robust_accuracy,
            },
            "binarization": runs.binarization,
            "surrogate": surrogate,
            "smoothed": adaptive.smoothed is not None,
            "adaptive": adaptive.to_dict(),
        },
    }
    evaluation = dataclasses.replace(main, flags=all_flags, record=record)
    return AuditResult(
        robust_accuracy=main.robust_accuracy,
        clean_accuracy=main.clean_accuracy,
        checks=checks,
        flags=all_flags,
        evaluation=evaluation,
    )
