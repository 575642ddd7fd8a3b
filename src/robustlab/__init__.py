"""robustlab: adversarial robustness of image classifiers — train, attack, defend, evaluate.

The subpackages load on first use (``robustlab.attacks`` alone does not load the training or
the defenses): ``import robustlab as rl`` then ``rl.evaluate(...)`` works as usual.
``rl.benchmark(model, data, threat=...)`` is the one line from any classifier to a run folder
(:mod:`robustlab.benchmarking`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robustlab._eps import parse_eps
from robustlab._provenance import package_version

if TYPE_CHECKING:
    from robustlab import attacks, data, defenses, evaluation, models, report, training
    from robustlab.benchmarking import benchmark
    from robustlab.evaluation import EvalResult, eps_sweep, evaluate
    from robustlab.evaluation.audit import AuditResult, audit
    from robustlab.threat import ThreatModel

__version__ = package_version()
_SUBPACKAGES = (
    "attacks",
    "data",
    "defenses",
    "evaluation",
    "models",
    "report",
    "threat",
    "training",
)
_FROM_EVALUATION = ("AuditResult", "EvalResult", "audit", "eps_sweep", "evaluate")
__all__ = [
    "AuditResult",
    "EvalResult",
    "ThreatModel",
    "attacks",
    "audit",
    "benchmark",
    "data",
    "defenses",
    "eps_sweep",
    "evaluate",
    "evaluation",
    "models",
    "parse_eps",
    "report",
    "training",
]


def __getattr__(name: str) -> Any:
    """The subpackages, the threat model, the evaluation's entry points and ``benchmark``,
    imported when first asked for (``import robustlab`` alone loads no torch: the command line
    parses its arguments first)."""
    if name == "ThreatModel":
        return importlib.import_module("robustlab.threat").ThreatModel
    if name == "benchmark":
        return importlib.import_module("robustlab.benchmarking").benchmark
    if name in _SUBPACKAGES:
        return importlib.import_module(f"robustlab.{name}")
    if name in _FROM_EVALUATION:
        return getattr(importlib.import_module("robustlab.evaluation"), name)
    raise AttributeError(f"module 'robustlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
