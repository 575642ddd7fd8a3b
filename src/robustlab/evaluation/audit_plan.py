"""What the audit (:func:`robustlab.evaluation.audit`) runs: the attacks of its cascade in
order, and its side runs (the eps sweep, the unbounded attack, the binarization test's attack).

The cascade: plain PGD-20 on the cross-entropy (the naive attack every check compares with);
on a detector the attacks on the joint classifier-and-detector right after it (the detector
suite's, :data:`~robustlab.evaluation.suites.JOINT`, with the audit's steps, and
high-confidence C&W crafted on the surrogate), so what they break beyond the naive attack is
their own; then APGD-CE with the adaptation's BPDA and EOT; SmoothAdv and EPGD on a smoothed
classifier; MM and MD (APGD-T for l1); Square and NAttack (score-based) and, for linf, RayS
(decision-based: labels only); the transfer attack from the
surrogate; and the convergence run (APGD-CE with twice the steps and 3 restarts) last.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from torch import Tensor, nn

from robustlab.attacks import Attack, create_for_evaluation
from robustlab.evaluation.adapt import Adaptation
from robustlab.evaluation.suites import HIGH_CONFIDENCE, JOINT, SMOOTHED_ITERATES, AttackSpec
from robustlab.threat import ThreatModel

#: SmoothAdv and EPGD on a smoothed classifier: noise draws per step, and the most steps
SMOOTHED_SAMPLES, SMOOTHED_STEPS = 8, 20


def unbounded(threat: ThreatModel, x: Tensor) -> ThreatModel:
    """A ball around any point of the box that covers the whole box."""
    eps = threat.box_diameter(x.shape[1:])
    return dataclasses.replace(threat, eps=int(eps) if threat.norm == "l0" else eps)


def adaptive_attack(threat: ThreatModel, adaptive: Adaptation, name: str, **opts: Any) -> Attack:
    return create_for_evaluation(name, threat, bpda=adaptive.bpda, eot=adaptive.eot, **opts)


def joint_specs(threat: ThreatModel, steps: int, surrogate: bool) -> list[AttackSpec]:
    """The attacks on the joint classifier-and-detector with ``steps`` steps each, and
    high-confidence C&W (linf and l2) crafted on the surrogate where there is one."""
    specs = [(name, {**o, "steps": steps}) for name, o in JOINT]
    if surrogate and threat.norm != "l1":
        spec: AttackSpec = HIGH_CONFIDENCE
        name, o = spec
        specs.append((name, {**o, "attack_options": {**o["attack_options"], "steps": steps}}))
    return specs


def cascade_plan(
    threat: ThreatModel,
    adaptive: Adaptation,
    num_classes: int,
    steps: int,
    queries: int,
    surrogate: nn.Module | None,
) -> tuple[list[Attack], int]:
    """The audit's cascade (see the module docstring) and how many of its attacks are
    gradient-free."""
    cascade: list[Attack] = [create_for_evaluation("pgd", threat, steps=20)]
    if adaptive.rejects:
        for name, o in joint_specs(threat, steps, surrogate is not None):
            cascade.append(
                create_for_evaluation(name, threat, surrogate=surrogate, **o)
                if name == "transfer"
                else adaptive_attack(threat, adaptive, name, **o)
            )
    cascade.append(adaptive_attack(threat, adaptive, "apgd-ce", steps=steps))
    if adaptive.smoothed is not None:
        cascade += [
            create_for_evaluation(name, threat, bpda=adaptive.bpda, eot=1, **smoothed_opts(steps))
            for name in ("smoothadv", "epgd")
        ]
    k = min(9, num_classes - 1)
    if threat.norm == "l1":
        cascade.append(adaptive_attack(threat, adaptive, "apgd-t", steps=20, n_target_classes=k))
    else:
        cascade.append(adaptive_attack(threat, adaptive, "mm", k=k, steps=20))
        cascade.append(adaptive_attack(threat, adaptive, "md"))
        cascade.append(create_for_evaluation("square", threat, n_queries=queries, p_init=0.8))
        cascade.append(create_for_evaluation("nattack", threat, max_iters=max(1, queries // 300)))
        if threat.norm == "linf":  # the hard-label (decision-based) stage: labels only
            cascade.append(create_for_evaluation("rays", threat, n_queries=queries))
    n_black = sum(1 for a in cascade if not a.uses_gradients and a.name != "transfer")
    if surrogate is not None:
        cascade.append(
            create_for_evaluation(
                "transfer", threat, surrogate=surrogate, attack="pgd", attack_options={"steps": 20}
            )
        )
    cascade.append(adaptive_attack(threat, adaptive, "apgd-ce", steps=2 * steps, restarts=3))
    return cascade, n_black


def smoothed_opts(steps: int) -> dict[str, Any]:
    return {"samples": SMOOTHED_SAMPLES, "steps": min(steps, SMOOTHED_STEPS), **SMOOTHED_ITERATES}


class SidePlan(NamedTuple):
    """What the audit runs besides its cascade: the eps sweep's attacks (``probe``) and eps
    (``grid``, empty: no sweep), the unbounded attack's threat model and attacks (empty: not
    run), both on the first ``points`` points, and the binarization test's attack (None: not
    run) on ``binarization_points`` points."""

    probe: list[AttackSpec]
    grid: list[float]
    big: ThreatModel
    unbounded: list[AttackSpec]
    points: int
    binarization: Attack | None
    binarization_points: int


def side_plan(
    threat: ThreatModel,
    x: Tensor,
    adaptive: Adaptation,
    no_gradient: bool,
    *,
    factors: tuple[float, ...],
    steps: int,
    queries: int,
    check_points: int,
    binarization_points: int,
) -> SidePlan:
    """The side runs; ``factors``: the eps sweep's multiples of the threat's eps. On a
    detector the sweep and the unbounded attack add PGD on the joint classifier-and-detector
    (the naive attacks run into its rejection)."""
    adaptive_opts = {"bpda": adaptive.bpda, "eot": adaptive.eot}
    square = ("square", {"n_queries": queries, "p_init": 0.8})
    joint = (
        [(n, {**o, **adaptive_opts}) for n, o in joint_specs(threat, steps, False) if n == "pgd"]
        if adaptive.rejects
        else []
    )
    # without any gradient, Square stands in for APGD (none for l1); a smoothed classifier
    # gets EPGD on the CW margin, its own draws per step and no EOT on top
    probe = [("apgd-ce", {"steps": max(20, steps // 5), **adaptive_opts}), *joint]
    if adaptive.smoothed is not None:
        probe = [
            ("epgd", {**smoothed_opts(steps), "loss": "cw-margin", "eot": 1, "bpda": adaptive.bpda})
        ]
    probe = [square] if no_gradient else probe
    grid = [f * threat.eps for f in factors if f * threat.eps > 0]
    if no_gradient and threat.norm == "l1":
        grid = []
    big = [] if no_gradient else [("apgd-ce", {"steps": steps, **adaptive_opts}), *joint]
    if threat.norm != "l1":
        big.append(square)
    binar = (
        None
        if not binarization_points or no_gradient
        else adaptive_attack(threat, adaptive, "apgd-ce", steps=steps)
    )
    return SidePlan(
        probe,
        grid,
        unbounded(threat, x),
        big,
        min(check_points, len(x)),
        binar,
        min(binarization_points, len(x)),
    )
