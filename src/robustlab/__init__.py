"""robustlab: adversarial robustness of image classifiers — train, attack, defend, evaluate."""

from robustlab import attacks, data, models
from robustlab._provenance import package_version
from robustlab.threat import ThreatModel, parse_eps

__version__ = package_version()
__all__ = ["ThreatModel", "attacks", "data", "models", "parse_eps"]
