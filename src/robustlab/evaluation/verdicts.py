"""The audit's verdicts: one small function per check of :func:`robustlab.evaluation.audit`,
each turning the evidence of the runs into ``{"name", "status", "evidence", ...}`` with the
status PASS, FLAG or SKIP (see the audit's module docstring for what each check asks)."""

from __future__ import annotations

from typing import Any

from robustlab.evaluation.adapt import Adaptation
from robustlab.evaluation.detection import joint_stage
from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.sweep import SweepResult
from robustlab.threat import ThreatModel

PASS, FLAG, SKIP = "PASS", "FLAG", "SKIP"
TOLERANCE = 0.01  # one point-percent: the convergence criterion of the checklist
# Plain PGD-20 trails the strongest attacks by a few points on honest models (PGD-20 against
# AutoAttack on adversarially trained models: about 1 to 4 points, Croce & Hein 2020); the
# obfuscated defenses of Athalye et al. 2018 lost tens of points to the adaptive attacks.
ADAPTIVE_GAP = 0.05
BINARIZATION_PASS = 0.9  # attack success rate the binarization test asks for


def _check(name: str, status: str, evidence: str, **data: Any) -> dict[str, Any]:
    return {"name": name, "status": status, "evidence": evidence, **data}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def iterative(fgsm_acc: float | None, pgd_acc: float) -> dict[str, Any]:
    if fgsm_acc is None:
        return _check(
            "iterative-beats-single-step",
            SKIP,
            "the model has no input gradient: neither FGSM nor PGD can run on it",
        )
    ok = pgd_acc <= fgsm_acc + TOLERANCE
    return _check(
        "iterative-beats-single-step",
        PASS if ok else FLAG,
        f"FGSM leaves {_pct(fgsm_acc)}, PGD-20 {_pct(pgd_acc)}"
        + (
            ""
            if ok
            else ": the iterative attack is weaker than one step (masked "
            "gradients, or a step size or loss that does not fit)"
        ),
        fgsm=fgsm_acc,
        pgd=pgd_acc,
    )


def adaptive_vs_naive(naive_acc: float, final: float, skipped: bool) -> dict[str, Any]:
    gap = naive_acc - final
    ok = gap < ADAPTIVE_GAP
    plain = (
        "plain PGD-20 cannot run (no input gradient) and leaves"
        if skipped
        else "plain PGD-20 leaves"
    )
    return _check(
        "adaptive-matches-naive",
        PASS if ok else FLAG,
        f"{plain} {_pct(naive_acc)}, the adaptive attacks "
        f"{_pct(final)}"
        + ("" if ok else f": plain PGD overstates the robust accuracy by {100 * gap:.1f} points"),
        naive=naive_acc,
        adaptive=final,
    )


def adaptive_detector(stages: list[dict[str, Any]], n: int, rejects: bool) -> dict[str, Any]:
    """The attacks on the joint classifier-and-detector (:func:`~robustlab.evaluation.
    detection.joint_stage`), run right after plain PGD-20 (the first stage), break fewer than
    :data:`ADAPTIVE_GAP` of the ``n`` points beyond it; SKIP for a model that does not
    reject."""
    name = "adaptive-detector-attack"
    if not rejects:
        return _check(
            name,
            SKIP,
            "the model does not reject (it is not a detector): there is "
            "no joint classifier-and-detector to attack",
        )
    joint = [a for a in stages if joint_stage(a["config"]) and not a.get("skipped")]
    if not joint:
        return _check(name, SKIP, "no attack on the joint classifier-and-detector could run")
    broken = sum(a["broken"] for a in joint)
    gap, naive = broken / n, stages[0]["robust_accuracy"]
    ok = gap < ADAPTIVE_GAP
    what = ", ".join(
        f"{a['config']['name']} on {a['config'].get('loss') or 'its loss'}" for a in joint
    )
    return _check(
        name,
        PASS if ok else FLAG,
        f"plain PGD-20 leaves {_pct(naive)}; the attacks on the joint classifier-and-"
        f"detector ({what}) break {broken} more of {n} points"
        + (
            ""
            if ok
            else f": the naive attack overstates the detector's robust "
            f"accuracy by {100 * gap:.1f} points (attacks that know "
            "about the detector evade it)"
        ),
        naive=naive,
        broken=broken,
    )


def broken_after(
    stages: list[dict[str, Any]], n: int, which: Any, name: str, what: str, ran: bool
) -> dict[str, Any]:
    if not ran:
        return _check(
            name,
            SKIP,
            f"{what}: not run (no surrogate model)"
            if "transfer" in what
            else f"{what}: not run for this norm",
        )
    runs = [a for a in stages if which(a) and not a.get("skipped")]
    broken = sum(a["broken"] for a in runs)
    ok = broken <= max(TOLERANCE * n, 0)
    return _check(
        name,
        PASS if ok else FLAG,
        f"{what} broke {broken} of {n} points after the white-box attacks"
        + ("" if ok else ": the gradients mislead the white-box attacks"),
        broken=broken,
    )


def monotone(sweep: SweepResult | None) -> dict[str, Any]:
    if sweep is None:
        return _check(
            "monotone-in-eps",
            SKIP,
            "eps is 0, or no attack can run (an l1 model without input gradients)",
        )
    curve = ", ".join(f"{c['eps']:.3g}: {_pct(c['robust_accuracy'])}" for c in sweep.curve)
    ok = not sweep.flags
    return _check(
        "monotone-in-eps",
        PASS if ok else FLAG,
        f"robust accuracy by eps {curve}" + ("" if ok else f": {sweep.flags[0]['message']}"),
        curve=sweep.curve,
    )


def unbounded_attack(res: EvalResult | None, big: ThreatModel) -> dict[str, Any]:
    if res is None:
        return _check(
            "unbounded-attack-succeeds",
            SKIP,
            "no attack can run (an l1 model without input gradients)",
        )
    ok = res.robust_accuracy <= TOLERANCE
    return _check(
        "unbounded-attack-succeeds",
        PASS if ok else FLAG,
        f"at {big.norm} eps {big.eps:.4g} (the whole input box) "
        f"{_pct(res.robust_accuracy)} of {res.record['n']} points survive"
        + (
            ""
            if ok
            else ": an attack that can reach any image must break every "
            "point; the attacks cannot follow this model"
        ),
        robust_accuracy=res.robust_accuracy,
    )


def convergence(last: dict[str, Any], n: int) -> dict[str, Any]:
    broken = last["broken"]
    ok = broken < TOLERANCE * n or broken == 0
    return _check(
        "convergence",
        PASS if ok else FLAG,
        f"APGD-CE with 2x the steps and 3 restarts broke {broken} more of {n} points"
        + ("" if ok else ": the attacks had not converged"),
        broken=broken,
    )


def randomness(adaptive: Adaptation) -> dict[str, Any]:
    if not adaptive.randomised:
        return _check(
            "randomness", PASS, "two forward passes agree and no module declares randomness"
        )
    if adaptive.smoothed is not None:
        how = (
            "it is a smoothed classifier: SmoothAdv and EPGD drew their own noise samples "
            f"per step (EOT {adaptive.eot} on top)"
        )
    else:
        how = f"adaptive attacks used EOT over {adaptive.eot} draws"
    return _check(
        "randomness",
        FLAG,
        f"the model is randomised: {how} and each point was predicted "
        f"{adaptive.repeats} times (robust by strict majority)",
    )


def gradients(
    flags: list[dict[str, Any]], adaptive: Adaptation, no_gradient: bool
) -> dict[str, Any]:
    bad = [
        f
        for f in flags
        if f["name"] in ("no-gradient", "masked-gradient", "shattered-gradient", "softmax-output")
    ]
    if not bad:
        return _check(
            "gradients",
            PASS,
            "input gradients are finite, non-zero and stable under a small move of the input",
        )
    what = "; ".join(f["message"] for f in bad)
    if adaptive.bpda:
        remedy = f"BPDA used through {', '.join(adaptive.bpda_stages)}"
    elif no_gradient:
        remedy = "only gradient-free and transfer attacks could run"
    else:
        remedy = "margin-loss, gradient-free and transfer attacks used"
    if adaptive.outputs_reason:  # probabilities or saturated logits: what the attacks saw
        remedy += f"; {adaptive.outputs_reason}"
    return _check("gradients", FLAG, f"{what} ({remedy})")


def binarization(res: dict[str, Any] | None, points: int, no_gradient: bool) -> dict[str, Any]:
    if res is None:
        why = "not requested" if not points else "the model has no input gradient"
        return _check("binarization-test", SKIP, why)
    if not res["n_valid"]:
        return _check(
            "binarization-test",
            SKIP,
            f"the read-out could not separate inner and boundary points for any of "
            f"the {res['n']} points",
        )
    ok = res["asr"] >= BINARIZATION_PASS
    return _check(
        "binarization-test",
        PASS if ok else FLAG,
        f"the adaptive attack found the known adversarial example for "
        f"{_pct(res['asr'])} of {res['n_valid']} points (random boundary points: "
        f"{_pct(res['random_asr'])})" + ("" if ok else ": the attack is too weak for this model"),
        asr=res["asr"],
    )
