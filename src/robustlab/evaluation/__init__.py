"""Evaluation: attack cascades with per-sample worst case, sanity flags, results as data."""

from robustlab.evaluation.audit import AuditResult, audit
from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.sharded import evaluate_sharded
from robustlab.evaluation.smoothing_curves import smoothing_curves
from robustlab.evaluation.suite import evaluate
from robustlab.evaluation.suites import SUITES
from robustlab.evaluation.suites import names as suites
from robustlab.evaluation.sweep import SweepResult, eps_sweep

__all__ = ["SUITES", "AuditResult", "EvalResult", "SweepResult", "audit", "eps_sweep", "evaluate",
           "evaluate_sharded", "smoothing_curves", "suites"]
