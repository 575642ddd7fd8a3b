"""Inference-time defenses: ``create(name, model, **options)`` wraps a model in a
:class:`~robustlab.defenses.base.Defense` that defends it; ``names()`` lists them.

Randomised smoothing lives in :mod:`~robustlab.defenses.smoothing` (the voting classifier) and
:mod:`~robustlab.defenses.certify` (Cohen et al.'s ``predict`` and ``certify``); denoised
smoothing (``"denoised"``, Salman et al. 2020) in :mod:`~robustlab.defenses.denoise`, its
denoiser in :mod:`robustlab.models.dncnn`. Input transformations are
:class:`~robustlab.defenses.preprocess.Preprocessed` defenses, one file per random stage
(``tv_min``, ``crop_rescale``, ``resize_pad``). Every module of this package registers its
defenses on import.

How to add a defense: in a file of its own here, subclass :class:`Defense` (or
:class:`~robustlab.defenses.preprocess.Preprocessed` with a new
:class:`~robustlab.defenses.preprocess.Transform` stage), decorate it with
``@register("name")`` from :mod:`robustlab.defenses.registry`, take the model first and the
options as keyword arguments with defaults (validated with :mod:`robustlab._validate`), call
``super().__init__(model)`` so the model is ``self.base``, declare at class level what the
evaluation must know (``randomized``, ``differentiable``, ``rejects``), extend :meth:`config`
with the options, and override :meth:`~Defense.fit` / :attr:`~Defense.fitted` if it needs clean
data. Then add it to ``tests/test_defense_contract.py``, which checks the declarations against
the defense's behaviour. A defense may import models, attacks' BPDA helpers and the ground
floor, never training or evaluation.
"""

import importlib
import pkgutil

from robustlab.defenses.base import Defense
from robustlab.defenses.certify import (
    ABSTAIN,
    Certificate,
    certify,
    certify_iter,
    predict,
    vote_counts,
)
from robustlab.defenses.l0_certificate import l0_radius
from robustlab.defenses.registry import DEFENSES, create, names
from robustlab.defenses.smoothing import Smoothing

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "registry" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ABSTAIN",
    "DEFENSES",
    "Certificate",
    "Defense",
    "Smoothing",
    "certify",
    "certify_iter",
    "create",
    "l0_radius",
    "names",
    "predict",
    "vote_counts",
]
