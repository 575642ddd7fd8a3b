"""Named attack suites: each a list of ``(attack name, options)`` run as a cascade.

``evaluate`` runs the attacks in order, each only on the points still robust after the previous
ones, so the result is the per-sample worst case over the whole list.

- ``standard``: the AutoAttack standard cascade (Croce & Hein 2020) with the reference budgets:
  APGD-CE (100 steps, 1 restart), APGD-T (9 target classes, 100 steps each), FAB-T (9 target
  classes, 100 steps each), Square (5000 queries, p_init 0.8). l1 has no Square: AutoAttack's
  l1 standard runs APGD-CE and APGD-T only. l0 (pixels) runs :data:`L0_STANDARD`, white-box
  then score-based as sparse-AutoAttack (Zhong et al. 2024): PGD_0 (Croce & Hein 2019, 5
  restarts of 100 steps) and Sparse-RS (Croce et al. 2022, 10,000 queries, alpha_init 0.3).
- ``fast``: our cheaper cascade aimed at the same number: APGD-CE (100 steps), then the
  minimum-margin attack MM-9 (Gao et al. 2022: targeted APGD on the logit margin against the 9
  runner-up classes, 20 steps each) on the points still robust; every stage drops a point as
  soon as it breaks. No FAB-T and no Square: on the models we measured they broke nothing
  after the first two stages and cost most of the time (BENCHMARKS.md, benchmarks/evaluation.py
  for the measured gap and cost). MM has no l1 version: l1 uses APGD-T with 20 steps instead.
  Use ``standard`` when a flag is raised: ``fast`` has no gradient-free stage. l0: PGD_0 with
  one restart of 100 steps.
- ``rand``: for randomised models: APGD-CE and APGD-DLR with expectation over transformation
  (gradients averaged over 20 draws), and a point counts as robust only if a majority of
  ``repeats`` predictions on it (clean and adversarial) are correct. Cost per step: 20 forward
  and backward passes of the model; on a smoothed classifier with n draws, 20 x n of its base
  model (use ``smoothed`` there).
- ``smoothed``: for smoothed classifiers (``robustlab.defenses.Smoothing``, or any module with
  the :class:`~robustlab.noise.SmoothedModel` attributes ``base``, ``sigma``, ``noise``), the
  default for them: APGD-CE (20 steps) on the base model replayed on the smoothed one
  (transfer), SmoothAdv (Salman et al. 2019: PGD on the soft smoothed classifier's
  cross-entropy) and EPGD on the CW margin (Nemcovsky et al. 2019), each with m = 8
  noise draws per step (fresh per step for EPGD, per call for SmoothAdv, as their papers),
  then EPGD with one fresh draw per step (PGD on the noisy model: its noisier steps explore
  differently; it broke 1 of the 800 points the m = 8 attacks left in BENCHMARKS.md's runs,
  at the cost of one judgement); 10 steps each, no
  early stop, the last iterate, and no EOT on top; each point is judged by a strict majority
  of 3 predictions of the smoothed classifier at its own n. Cost per point: 20 forward and
  backward passes of the base model, then 2 x 10 x 8 + 10, plus 3 x n forwards per
  judgement (clean and after each stage, on the points still robust).
- ``detector``: for detectors (a model declaring ``rejects``: K + 1 outputs, the last one
  "rejected"), the default for them: the standard cascade's APGD-CE (100 steps: the naive
  attack, which a detector may catch), then the attacks on the joint classifier-and-detector of
  Carlini & Wagner 2017 (https://arxiv.org/abs/1705.07263): APGD (100 steps) and PGD (100
  steps, the last iterate, no early stop) on the ``detector-margin`` loss, which wants a wrong
  class and no rejection; then high-confidence C&W (PGD on the C&W margin capped at
  ``kappa`` = :data:`DETECTOR_KAPPA` logits, 100 steps, no early stop) crafted on the
  classifier alone (the detector's ``base``) and replayed on the detector, for detectors that
  reject low-confidence inputs. BPDA applies where a detector stage declares itself
  non-differentiable (the adaptation, as for every suite). l1 has no C&W stage (``cw-linf``
  supports linf and l2), and without a classifier to craft on it is left out (the results
  say so under ``detection``). No gradient-free stage: Square stops at its first iterate that
  changes the prediction, which on a detector is often a rejected one. Cost per point: 300
  forward and backward passes of the detector and 100 of its classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustlab.registry import Registry

AttackSpec = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Suite:
    """A cascade of attacks; ``repeats``: predictions per point (majority vote) for randomised
    models; ``norms`` maps a norm to its own attack list where it differs from ``attacks``;
    ``description``: one line on what it is for (``robustlab list suites``)."""

    attacks: list[AttackSpec]
    repeats: int = 1
    norms: dict[str, list[AttackSpec]] = field(default_factory=dict)
    description: str = ""

    def for_norm(self, norm: str) -> list[AttackSpec]:
        return [(a, dict(o)) for a, o in self.norms.get(norm, self.attacks)]


SUITES: Registry[Suite] = Registry("suite")

SUITES.register("quick")(
    Suite(
        [("fgsm", {}), ("pgd", {"steps": 20})],
        norms={"l0": [("pgd-l0", {"steps": 20, "restarts": 1})]},
        description="a smoke test, never a robustness claim",
    )
)
SUITES.register("pgd")(
    Suite(
        [("pgd", {"steps": 20}), ("pgd", {"steps": 100, "restarts": 5})],
        description="PGD on cross-entropy, as in Madry et al.; weaker than standard",
    )
)
SUITES.register("pgd-strong")(
    Suite(
        [
            ("pgd", {"steps": 20}),
            ("pgd", {"steps": 100, "restarts": 5}),
            ("pgd", {"steps": 100, "restarts": 5, "loss": "cw-margin"}),
        ],
        description="pgd, then PGD on the CW margin loss",
    )
)
_AA_WHITE: list[AttackSpec] = [
    ("apgd-ce", {"steps": 100, "restarts": 1}),
    ("apgd-t", {"steps": 100, "n_target_classes": 9}),
]
#: the standard suite's l0 (pixels) cascade: white-box, then score-based
L0_STANDARD: list[AttackSpec] = [
    ("pgd-l0", {"steps": 100, "restarts": 5}),
    ("sparse-rs", {"n_queries": 10000, "alpha_init": 0.3}),
]
SUITES.register("standard")(
    Suite(
        _AA_WHITE
        + [
            ("fab-t", {"steps": 100, "n_target_classes": 9}),
            ("square", {"n_queries": 5000, "p_init": 0.8}),
        ],
        norms={"l1": _AA_WHITE, "l0": L0_STANDARD},
        description="AutoAttack's standard cascade: the reference number to report",
    )
)
SUITES.register("fast")(
    Suite(
        [("apgd-ce", {"steps": 100}), ("mm", {"k": 9, "steps": 20})],
        norms={
            "l1": [("apgd-ce", {"steps": 100}), ("apgd-t", {"steps": 20, "n_target_classes": 9})],
            "l0": [("pgd-l0", {"steps": 100, "restarts": 1})],
        },
        description="close to standard's number at a fraction of its cost; no gradient-free stage",
    )
)
SUITES.register("rand")(
    Suite(
        [("apgd-ce", {"steps": 100, "eot": 20}), ("apgd-dlr", {"steps": 100, "eot": 20})],
        repeats=10,
        description="for randomised models: EOT gradients, robust by majority of 10 predictions",
    )
)


#: the smoothing-aware attacks run every step and return the last iterate (as the reference
#: code): their success and loss estimates from m draws are noisier than the smoothed
#: classifier's vote at n, so an early stop or a best iterate chosen by them stops near the
#: decision boundary, where the vote often still holds (the toy model of
#: tests/test_smoothed_default.py is broken on every point only without them)
SMOOTHED_ITERATES = {"keep_best": False, "early_stop": False}
SUITES.register("smoothed")(
    Suite(
        [
            ("transfer", {"attack": "apgd-ce", "attack_options": {"steps": 20}}),
            ("smoothadv", {"samples": 8, "steps": 10, **SMOOTHED_ITERATES}),
            ("epgd", {"samples": 8, "steps": 10, "loss": "cw-margin", **SMOOTHED_ITERATES}),
            ("epgd", {"samples": 1, "steps": 10, **SMOOTHED_ITERATES}),
        ],
        repeats=3,
        description="for smoothed classifiers (the default there): transfer from the base model, "
        "SmoothAdv and EPGD with m = 8 draws per step, then EPGD with one",
    )
)
#: the confidence of the detector suite's C&W stage, in logits (Madry et al.'s challenge code
#: uses 50); unreachable within eps, the stage ends at the most confident point it found
DETECTOR_KAPPA = 50.0
#: the attacks on the joint classifier-and-detector (they need a model that rejects)
JOINT = [
    ("apgd-ce", {"steps": 100, "loss": "detector-margin"}),
    ("pgd", {"steps": 100, "loss": "detector-margin", "keep_best": False, "early_stop": False}),
]
#: high-confidence C&W crafted on the detector's classifier (the evaluation's surrogate)
HIGH_CONFIDENCE = (
    "transfer",
    {
        "attack": "cw-linf",
        "attack_options": {"steps": 100, "kappa": DETECTOR_KAPPA, "early_stop": False},
    },
)
SUITES.register("detector")(
    Suite(
        [("apgd-ce", {"steps": 100, "restarts": 1}), *JOINT, HIGH_CONFIDENCE],
        norms={"l1": [("apgd-ce", {"steps": 100, "restarts": 1}), *JOINT]},
        description="for detectors (the default there): APGD-CE, then APGD and PGD on the joint "
        "classifier-and-detector margin, then high-confidence C&W from the classifier",
    )
)
#: the suite :func:`~robustlab.evaluation.evaluate` runs when none is named
DEFAULT = "standard"
#: ... on a smoothed classifier
DEFAULT_SMOOTHED = "smoothed"
#: ... on a detector (a model that declares ``rejects``)
DEFAULT_DETECTOR = "detector"


def default_suite(smoothed: bool = False, *, rejects: bool = False) -> str:
    """The suite run when none is named: :data:`DEFAULT_SMOOTHED` for a smoothed classifier,
    else :data:`DEFAULT_DETECTOR` for a detector (``rejects``), else :data:`DEFAULT`."""
    if smoothed:
        return DEFAULT_SMOOTHED
    return DEFAULT_DETECTOR if rejects else DEFAULT


def get_suite(name: str) -> Suite:
    """The suite ``name``; ValueError listing the valid suites if unknown."""
    return SUITES.get(name)


def names(pattern: str | None = None) -> list[str]:
    return SUITES.names(pattern)
