"""Evaluation: attack cascades with per-sample worst case, sanity flags, results as data.

``run.evaluate`` is the entry point, in three steps: ``adapt`` (the adaptation plan),
``cascade`` (the attacks over the still-robust points, per-sample worst case) and ``record``
(event log, progress, resumable ``state``, ``results``). ``checks`` flags an evaluation not to
trust as it stands; ``suites`` names the attack lists; ``audit`` runs the checklist of Carlini
et al. 2019; ``sweep``, ``sharded``, ``certification``, ``smoothing_curves`` and
``binarization`` build on them; ``universal`` evaluates one universal perturbation for a data
set (its fooling rate, not per-sample robustness).
"""

from robustlab.evaluation.audit import AuditResult, audit
from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.run import evaluate
from robustlab.evaluation.sharded import evaluate_sharded
from robustlab.evaluation.smoothing_curves import smoothing_curves
from robustlab.evaluation.suites import SUITES
from robustlab.evaluation.suites import names as suites
from robustlab.evaluation.sweep import SweepResult, eps_sweep
from robustlab.evaluation.universal import evaluate_universal
from robustlab.evaluation.wrm import wrm_certificate

__all__ = [
    "SUITES",
    "AuditResult",
    "EvalResult",
    "SweepResult",
    "audit",
    "eps_sweep",
    "evaluate",
    "evaluate_sharded",
    "evaluate_universal",
    "smoothing_curves",
    "suites",
    "wrm_certificate",
]
