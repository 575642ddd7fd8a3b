"""robustlab: adversarial robustness of image classifiers — train, attack, defend, evaluate."""

from robustlab import attacks, data, defenses, evaluation, models, training
from robustlab._provenance import package_version
from robustlab.evaluation import AuditResult, EvalResult, audit, eps_sweep, evaluate
from robustlab.threat import ThreatModel, parse_eps

__version__ = package_version()
__all__ = [
    "AuditResult", "EvalResult", "ThreatModel", "attacks", "audit", "data", "defenses",
    "eps_sweep", "evaluate", "evaluation", "models", "parse_eps", "training",
]
