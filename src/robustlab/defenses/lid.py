"""Local intrinsic dimensionality (LID): a supervised detector of inputs whose neighbourhood
among clean points' features looks higher-dimensional, layer by layer.

Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle, Bailey, "Characterizing
Adversarial Subspaces Using Local Intrinsic Dimensionality", ICLR 2018, arXiv:1801.02613;
reference code github.com/xingjunm/lid_adversarial_subspace_detection
(``extract_characteristics.py``, ``util.py``: ``mle_batch``, ``get_lids_random_batch``)
[code checked].

With ``r_1 <= ... <= r_k`` the Euclidean distances from a layer's features of ``x`` to its
``k`` nearest neighbours among the same layer's features of a reference minibatch of clean
points, the maximum-likelihood estimate of the layer's LID at ``x`` is

    ``LID(x) = -( 1/k sum_{i=1}^{k} log(r_i / r_k) )^{-1}``

(for points spread uniformly on a d-dimensional patch it is about ``d``: in expectation
``k d / (k - 2)`` for one point). The detector is a logistic regression on the z-scored vector
of per-layer LIDs, fitted on clean and noisy training points (label 0) against adversarial
ones (label 1) crafted inside :meth:`fit` by an attack of the paper; the score is its logit
(higher: more adversarial). The regression, the noisy points and the attack come from
:class:`~robustlab.defenses.kd_bu.SupervisedDetector` (shared with KD+BU).

Defaults from the paper: ``k`` = 20 neighbours in minibatches of ``reference`` = 100 (the
reference code's ``-k 20 -b 100``), the attack FGSM with linf eps = 0.3 (the MNIST setting of
the code it builds on; BIM-a, BIM-b, JSMA and C&W L2 are the paper's others). Layers: the
outputs of the model's activation modules, then the logits (``"logits"``); a model whose
activations are functional (no modules) uses the outputs of its leaf modules with weights
(convolutions, linear layers). ``layers`` names others: module names of
``model.named_modules()``, ``"input"`` (the flattened input) and ``"logits"``.

Differences from the reference code: the reference minibatch is one fixed set of ``reference``
clean training points, disjoint from the points scored, so ``r_1`` is the nearest neighbour
(the code measures each minibatch against itself and drops the first distance, for
adversarial points too); the code takes the input and every Keras layer's output; the
regression has a fixed L2 penalty and z-scored features (the code: scikit-learn's
``LogisticRegressionCV`` on min-max-scaled LIDs); the noisy points are as in
:mod:`robustlab.defenses.kd_bu`. A zero distance (a duplicate of a reference point) is
clamped to the dtype's tiny value.

Cost per scored input: one forward pass with feature capture, distances to ``reference``
points in every layer; ``forward`` adds the classifier's own pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import positive_int
from robustlab.defenses.registry import register
from robustlab.defenses.supervised import SupervisedDetector
from robustlab.models.features import capture, feature_module
from robustlab.models.layers import KWTA

__all__ = ["ACTIVATIONS", "LocalIntrinsicDimensionality", "default_layers", "lid_mle"]

#: modules whose outputs are the default LID layers
ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    KWTA,
)
TOKENS = ("input", "logits")


def lid_mle(features: Tensor, reference: Tensor, k: int) -> Tensor:
    """``-(1/k sum_{i<=k} log(r_i / r_k))^{-1}`` for each row of ``features`` (N, D), with
    ``r_1 <= ... <= r_k`` its Euclidean distances to the ``k`` nearest rows of ``reference``
    (M, D), M >= k; shape (N,), differentiable through the distances."""
    d = torch.cdist(features, reference, compute_mode="donot_use_mm_for_euclid_dist")
    r = d.topk(k, dim=1, largest=False).values.clamp_min(torch.finfo(d.dtype).tiny)
    mean_log = torch.log(r / r[:, -1:]).mean(1)
    return -1 / mean_log.clamp(max=-torch.finfo(d.dtype).eps)


def default_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s activation modules, then ``"logits"``; without activation
    modules, the names of its leaf modules with weights (the last is usually the head)."""
    named = list(model.named_modules())
    acts = [n for n, m in named if isinstance(m, ACTIVATIONS)]
    if acts:
        return [*acts, "logits"]
    leaves = [
        n
        for n, m in named
        if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    return leaves or ["logits"]


@register("lid")
class LocalIntrinsicDimensionality(SupervisedDetector):
    """Ma et al.'s LID detector around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        k: nearest neighbours per estimate, >= 1 and <= ``reference``. Default 20.
        reference: the clean training points every LID is measured against (the paper's
            minibatch), taken from the start of :meth:`fit`'s points. Default 100.
        layers: the layers whose LIDs the regression sees: module names, ``"input"``,
            ``"logits"``; default None, :func:`default_layers`.
        attack, norm, eps, attack_options: the attack crafted inside :meth:`fit` on the
            regression's training points: ``robustlab.attacks.create(attack,
            ThreatModel(norm, eps), **attack_options)``. Default FGSM, linf, 0.3.
        seed: seeds the noisy training points.
        threshold, fpr, holdout: as :class:`~robustlab.defenses.detector.Detector`.

    ``fit(x, y)`` needs labels (for the attack) and more than ``reference`` statistics points.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int = 20,
        reference: int = 100,
        layers: Sequence[str] | None = None,
        attack: str = "fgsm",
        norm: str = "linf",
        eps: float = 0.3,
        attack_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(
            model,
            attack=attack,
            norm=norm,
            eps=eps,
            seed=seed,
            attack_options=attack_options,
            threshold=threshold,
            fpr=fpr,
            holdout=holdout,
        )
        self.k = positive_int(k, "k")
        self.reference = positive_int(reference, "reference", minimum=self.k)
        if layers is None:
            layers = default_layers(model)
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise TypeError(
                f"layers must be a non-empty list of module names, 'input' or "
                f"'logits', got {layers!r}"
            )
        for name in layers:
            if name not in TOKENS:
                feature_module(model, name, option="layers")
        self.layers = list(layers)
        for i in range(len(self.layers)):
            self.register_buffer(f"reference_{i}", None)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), as recorded in results."""
        return {**super().config(), "k": self.k, "reference": self.reference, "layers": self.layers}

    def _features(self, x: Tensor) -> list[Tensor]:
        """Each layer's features of ``x``, (N, D_l), from one forward pass."""
        modules = [n for n in self.layers if n not in TOKENS]
        logits, feats = capture(self.base, x, modules, inputs=False, option="layers")
        by_name = dict(zip(modules, feats, strict=True))
        by_name.update(input=x.flatten(1), logits=logits.flatten(1))
        return [by_name[n] for n in self.layers]

    def reference_size(self, n: int) -> int:
        """The first ``reference`` statistics points are the clean reference."""
        return self.reference

    def fit_reference(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """Store every layer's features of the clean reference points ``x``."""
        with torch.no_grad():
            parts = [self._features(xb) for xb in x.split(batch_size)]
        for i in range(len(self.layers)):
            setattr(self, f"reference_{i}", torch.cat([p[i] for p in parts]))

    def characteristics(self, x: Tensor, logits: Tensor) -> Tensor:
        """The per-layer LIDs of ``x`` against the reference points, (N, len(layers))."""
        if self.reference_0 is None:
            raise ValueError("the lid detector is not fitted: call .fit(x_train, y_train)")
        feats = self._features(x)
        return torch.stack(
            [lid_mle(f, getattr(self, f"reference_{i}"), self.k) for i, f in enumerate(feats)], 1
        )
