"""Inference-time defenses: ``create(name, model, **options)`` wraps a model in an
``nn.Module`` that defends it; ``names()`` lists them.

Randomised smoothing lives in :mod:`~robustlab.defenses.smoothing` (the voting classifier) and
:mod:`~robustlab.defenses.certify` (Cohen et al.'s ``predict`` and ``certify``); denoised
smoothing's denoiser (``"denoised"``, Salman et al. 2020) in :mod:`~robustlab.defenses.denoise`.
Every module of this package registers its defenses on import.
"""

import importlib
import pkgutil

from robustlab.defenses.certify import (
    ABSTAIN,
    Certificate,
    certify,
    certify_iter,
    predict,
    vote_counts,
)
from robustlab.defenses.registry import DEFENSES, create, names
from robustlab.defenses.smoothing import Smoothing

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "registry" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ABSTAIN", "DEFENSES", "Certificate", "Smoothing", "certify", "certify_iter", "create",
    "names", "predict", "vote_counts",
]
