"""Trapdoor (honeypot) detection: flag inputs whose features match the signature of a trapdoor
trained into the model.

Shan, Wenger, Wang, Li, Zheng, Zhao, "Gotta Catch 'Em All: Using Honeypots to Catch
Adversarial Attacks on Neural Networks", ACM CCS 2020, arXiv:1904.08554; reference code
github.com/Shawn-Shan/trapdoor (``eval_detection.py``: ``eval_filter_pattern``;
``trap_utils.py``: ``test_neuron_cosine_sim``) [code checked].

The model must be trained with the trapdoor objective (``configs/trapdoor.toml``,
:mod:`robustlab.training.objectives.trapdoor`), which teaches it that the trigger ``A_t`` of
each protected label ``t`` (:class:`robustlab.models.trapdoor.Trapdoors`) means ``t``; an
attack towards ``t`` then tends to find the trapdoor's features. With ``g(x)`` (D,) the
features of one layer (default: the input of the last ``nn.Linear``, the penultimate features;
the reference code's ``dense`` bottleneck) and clean fitting points ``x_1..x_n``,

    ``S_t = (1/n) sum_i g(A_t(x_i))``                      (the trapdoor's signature)
    ``cos(x) = <g(x), S_t> / (||g(x)|| ||S_t||)``,  ``t = argmax_k f(x)_k``  (the prediction)

compared on a random subset of ``round-down(filter_ratio * D)`` neurons (the code's
``filter_ratio``, to resist signature probing; default 1.0, all). The score is
``cos(x) - q_t`` with ``q_t`` the ``1 - fpr`` quantile (linear interpolation) of ``cos`` over
the clean statistics points predicted as ``t``, so that one global threshold fits every label
(the reference code sets its threshold per target label); a label with fewer than
``ceil(1 / fpr)`` such points uses the quantile pooled over all labels (listed in
``pooled_labels`` and warned about). ``per_label=False`` scores ``cos(x)`` itself, as the code.
An input predicted as an unprotected label scores ``UNPROTECTED`` (-3, below every cosine
score): it is never rejected.

Defaults from the reference code: every label protected, the triggers' defaults (7 squares of
3 x 3, ``mask_ratio`` 0.1, ``seed`` 0: pass those the model was trained with, recorded in its
checkpoint's ``objective_config``, or the :class:`Trapdoors` themselves), ``filter_ratio`` 1.0.
Differences from the reference code: the signature is the mean over the clean fitting points
given (the code: the whole training set); the code scores ``cos`` against the attack's known
target and sets the threshold per target on clean test points, here the target is the
prediction and the threshold is the contract's (a false-positive rate on held-out clean
training points) after the per-label shift; with ``filter_ratio < 1`` the signature is
restricted to the kept neurons too (the code zeroes the features only, which rescales ``cos``
by a per-label constant). The score is differentiable in ``x`` (cosine through the model), so
an adaptive attack follows it (a partial break was published: Carlini 2020).

Cost: fit, ``|labels|`` forward passes per statistics point (one more with ``per_label``) and
one per held-out point; score, one forward pass with feature capture (``forward`` uses the
same pass for the logits).
Memory: (|labels|, D) signatures in float64.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.defenses.detector import Detector, rejection_scores
from robustlab.defenses.registry import register
from robustlab.models.features import capture, feature_module
from robustlab.models.trapdoor import TRIGGER_DEFAULTS, Trapdoors, protected_labels, trigger_options

__all__ = ["UNPROTECTED", "TrapdoorDetector"]

#: the score of an input predicted as a label without a trapdoor (below every cosine score)
UNPROTECTED = -3.0


@register("trapdoor")
class TrapdoorDetector(Detector):
    """Shan et al.'s trapdoor detector around ``model`` (trained with the trapdoor objective),
    with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        layer: the module (a name from ``model.named_modules()``) whose *input* gives ``g``,
            or None for the last ``nn.Linear``. Attribute ``layer`` holds the resolved name.
        filter_ratio: the fraction of the D neurons compared, in (0, 1]; the subset is drawn
            from a generator seeded with ``seed``. Default 1.0 (all).
        per_label: shift each label's cosine by its clean ``1 - fpr`` quantile (True) or score
            the cosine itself (False). Default True.
        labels: the protected labels (those the model was trained with), or None for all.
        seed, mask_ratio, squares, size: the trigger options the model was trained with
            (defaults 0, 0.1, 7, 3); the triggers are built at :meth:`fit` for the data's
            image shape and the model's classes. Not together with ``trapdoors``.
        trapdoors: the :class:`Trapdoors` themselves, or None to build them.
        threshold: the detection threshold ``T`` (score units), or None until :meth:`fit`.
        fpr: the false-positive rate :meth:`fit` aims at, in (0, 1). Default 0.05.
        holdout: the fraction of the fitting points kept for the threshold, in (0, 1); the
            signatures and the per-label shifts come from the rest. Default 0.2.

    Shapes: ``score(x)`` maps (N, C, H, W) to (N,), in ``x.dtype``; ``forward(x)`` to
    (N, K + 1). Buffers after :meth:`fit`: ``protected`` (L,) the protected labels,
    ``signatures`` (L, D) and ``offsets`` (L,) in float64 (``offsets`` 0 with
    ``per_label=False``), ``neurons`` (D,) bool, the neurons compared.

    Example:
        >>> det = robustlab.defenses.create("trapdoor", model).fit(x_train)
        >>> rejected = det(x).argmax(1) == det(x).shape[1] - 1
    """

    has_statistics = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        filter_ratio: float = 1.0,
        per_label: bool = True,
        labels: list[int] | None = None,
        seed: int | None = None,
        mask_ratio: float | None = None,
        squares: int | None = None,
        size: int | None = None,
        trapdoors: Trapdoors | None = None,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr, holdout=holdout)
        self.layer = feature_module(model, layer, option="layer")[0]
        self.filter_ratio = number(filter_ratio, "filter_ratio", low=0, high=1, low_open=True)
        self.per_label = one_of(per_label, "per_label", [True, False])
        self.labels = protected_labels(labels)
        given = {"seed": seed, "mask_ratio": mask_ratio, "squares": squares, "size": size}
        if trapdoors is not None:
            if not isinstance(trapdoors, Trapdoors):
                raise TypeError(
                    f"trapdoors must be a robustlab.models.trapdoor.Trapdoors, got "
                    f"{type(trapdoors).__name__}"
                )
            if any(v is not None for v in given.values()):
                raise ValueError(
                    "pass either trapdoors= or the trigger options (seed, "
                    "mask_ratio, squares, size), not both"
                )
            self.trigger_options = {k: trapdoors.config()[k] for k in TRIGGER_DEFAULTS}
        else:  # checked now, built at fit for the data's shape
            chosen: dict[str, Any] = {
                k: TRIGGER_DEFAULTS[k] if v is None else v for k, v in given.items()
            }
            self.trigger_options = trigger_options(**chosen)
        self.trapdoors = trapdoors
        self.pooled_labels: list[int] = []
        for name in ("protected", "signatures", "offsets", "neurons", "_slot"):
            self.register_buffer(name, None)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able): what it needs of the model, the trigger
        options, the layer, ``filter_ratio``, ``per_label``, the protected labels, the labels
        that use the pooled quantile, and the feature size ``features`` (None before fit)."""
        return {
            **super().config(),
            "requires": "a model trained with the trapdoor objective (configs/trapdoor.toml)"
            " with these trigger options and labels",
            **self.trigger_options,
            "labels": self.labels,
            "layer": self.layer,
            "filter_ratio": self.filter_ratio,
            "per_label": self.per_label,
            "pooled_labels": self.pooled_labels,
            "features": None if self.signatures is None else self.signatures.shape[1],
        }

    @property
    def fitted(self) -> bool:
        """Whether the signatures are computed and the threshold known."""
        return self.threshold is not None and self.signatures is not None

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, g(x))`` of one forward pass: (N, K) and the flattened features (N, D)."""
        logits, (feats,) = capture(self.base, x, [self.layer], option="layer")
        return logits, feats

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """The signatures ``S_t`` of the protected labels (the mean features of ``A_t`` of
        every point of ``x``), the neurons compared and, with ``per_label``, each label's
        clean quantile; in batches of ``batch_size`` without gradients (``y`` is not used)."""
        with torch.no_grad():
            classes = self.base(x[:1]).shape[1]
        trapdoors = self.trapdoors
        if trapdoors is None:
            c, h, w = x.shape[1:]
            trapdoors = Trapdoors(c, h, w, classes=classes, **self.trigger_options)
            self.trapdoors = trapdoors
        if trapdoors.classes != classes:
            raise ValueError(
                f"the trapdoors have {trapdoors.classes} labels but the model "
                f"has {classes} classes: build them for this model"
            )
        trapdoors.to(x.device).check_images(x)
        protected = protected_labels(self.labels, classes)
        signatures = torch.stack([self._signature(trapdoors, x, t, batch_size) for t in protected])
        dim = signatures.shape[1]
        keep = int(dim * self.filter_ratio)
        if keep < 1:
            raise ValueError(
                f"filter_ratio {self.filter_ratio:g} keeps no neuron of the "
                f"{dim} of layer {self.layer!r}: raise it to at least 1/{dim}"
            )
        order = torch.randperm(
            dim, generator=torch.Generator().manual_seed(self.trigger_options["seed"])
        )
        neurons = torch.zeros(dim, dtype=torch.bool)
        neurons[order[:keep]] = True
        slot = torch.full((classes,), -1, dtype=torch.long)
        slot[protected] = torch.arange(len(protected))
        self.protected = torch.tensor(protected, device=x.device)
        self.signatures, self.neurons = signatures, neurons.to(x.device)
        self._slot = slot.to(x.device)
        self.offsets = signatures.new_zeros(len(protected))
        if self.per_label:
            self.offsets = self._quantiles(x, batch_size)

    def _signature(self, trapdoors: Trapdoors, x: Tensor, label: int, batch_size: int) -> Tensor:
        """``S_label = (1/n) sum_i g(A_label(x_i))`` (D,), float64, in batches without
        gradients (``A`` the blend of ``trapdoors``)."""
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size]
                target = torch.full((len(xb),), label, device=x.device)
                total = total + self.features(trapdoors.stamp(xb, target))[1].double().sum(0)
        return total / len(x)

    def _quantiles(self, x: Tensor, batch_size: int) -> Tensor:
        """Each protected label's ``1 - fpr`` quantile of the clean cosines of the points of
        ``x`` predicted as it (the pooled quantile where fewer than ``ceil(1 / fpr)``)."""
        with torch.no_grad():
            pairs = [
                self._cosines(*self.features(x[i : i + batch_size]))
                for i in range(0, len(x), batch_size)
            ]
        slots = torch.cat([s for s, _ in pairs])
        cos = torch.cat([c for _, c in pairs])
        level, least = 1 - self.fpr, math.ceil(round(1 / self.fpr, 9))
        offsets = self.signatures.new_zeros(len(self.protected))
        ours = slots >= 0
        if not ours.any():
            warnings.warn(
                "trapdoor: no clean fitting point is predicted as a protected label, "
                "so the per-label shifts are 0; fit on more points",
                stacklevel=4,
            )
            self.pooled_labels = self.protected.tolist()
            return offsets
        pooled = torch.quantile(cos[ours], level)
        self.pooled_labels = []
        for j, t in enumerate(self.protected.tolist()):
            mine = cos[slots == j]
            if len(mine) >= least:
                offsets[j] = torch.quantile(mine, level)
            else:
                offsets[j] = pooled
                self.pooled_labels.append(t)
        if self.pooled_labels:
            warnings.warn(
                f"trapdoor: labels {self.pooled_labels} have fewer than {least} clean "
                f"fitting points predicted as them, so they use the quantile pooled "
                f"over all labels; fit on more points",
                stacklevel=4,
            )
        return offsets

    def _cosines(self, logits: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        """``(slot, cos)``: the row of ``signatures`` of each input's predicted label (-1:
        unprotected) and the cosine (float64) of its kept features with that signature (0
        where unprotected); differentiable in ``feats``."""
        if self.signatures is None:
            raise ValueError(
                "the trapdoor detector has no signatures yet: call "
                ".fit(x_train) on clean training points"
            )
        if feats.shape[1] != self.neurons.shape[0]:
            raise ValueError(
                f"layer {self.layer!r} gives {feats.shape[1]} features but the "
                f"detector was fitted on {self.neurons.shape[0]}: refit it"
            )
        slot = self._slot[logits.argmax(1)]
        sig = self.signatures[:, self.neurons][slot.clamp(min=0)]
        cos = F.cosine_similarity(feats[:, self.neurons].double(), sig, dim=1, eps=1e-12)
        return slot, torch.where(slot >= 0, cos, torch.zeros_like(cos))

    def _score(self, logits: Tensor, feats: Tensor) -> Tensor:
        slot, cos = self._cosines(logits, feats)
        shifted = cos - self.offsets[slot.clamp(min=0)]
        return torch.where(slot >= 0, shifted, torch.full_like(cos, UNPROTECTED))

    def score(self, x: Tensor) -> Tensor:
        """``cos(g(x), S_t) - q_t`` (``q_t = 0`` with ``per_label=False``) for the predicted
        label ``t``, ``UNPROTECTED`` where ``t`` has no trapdoor; (N,), in ``x.dtype``."""
        return self._score(*self.features(x)).to(x.dtype)

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """:meth:`score` of ``x``; the logits are not used (the features come from a forward
        pass of their own, which gives the same logits)."""
        return self.score(x)

    def forward(self, x: Tensor) -> Tensor:
        threshold = self._fitted_threshold()
        logits, feats = self.features(x)  # one pass: the logits and the features
        return rejection_scores(logits, self._score(logits, feats).to(logits.dtype) - threshold)
