"""The Mahalanobis detector's feature ensemble: the closest-class Mahalanobis distance at
several layers, combined by a logistic regression trained on attacked training points.

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018, arXiv:1807.03888, Section 2.3 ("feature ensemble");
reference code github.com/pokaxpoka/deep_Mahalanobis_detector (``lib_generation.py``
``get_Mahalanobis_score_adv``, ``ADV_Regression.py``) [code checked]. The one-layer detector
is :mod:`robustlab.defenses.mahalanobis`, whose class Gaussians this one reuses.

For each layer ``l`` of ``layers``, the features ``f_l(x)`` are the layer's output averaged
over its spatial positions (a (C, H, W) map gives C values, the paper's per-channel mean; a
(D,) output is taken as it is); class means ``mu_{l,c}`` and a tied covariance ``Sigma_l``
are fitted on clean training points, and

    ``M_l(x) = min_c (f_l(x) - mu_{l,c})^T Sigma_l^+ (f_l(x) - mu_{l,c})``.

The characteristic vector ``(M_1(x), ..., M_L(x))`` is scored by a logistic regression fitted
on clean and noisy points (label 0) against adversarial ones (label 1) crafted inside
:meth:`fit` (:class:`~robustlab.defenses.supervised.SupervisedDetector`, as LID and KD+BU);
the score is its logit. With ``noise > 0`` each ``M_l`` is measured at the paper's
pre-processed input ``x - noise * sign(grad_x M_l(x))`` (one step per layer, towards its
closest class; not clipped, as in the reference code).

Defaults: ``layers=None`` takes the outputs of the model's pooling modules (the ends of its
convolutional blocks) and of its last activation module (the penultimate features); a model
without pooling modules takes every activation module, without either every leaf module
with weights (the paper: the end of every ResNet
stage and the penultimate layer); FGSM with linf eps 0.3 trains the regression (the paper's
"unseen attack" setting trains on FGSM; the MNIST-scale eps of LID and KD+BU here);
``noise = 0`` (the reference code picks it from {0, 0.0005, ..., 0.01} on validation data).

Differences from the reference code: the regression's training points are clean, noisy and
adversarial versions of our fitting points (the reference: its test split, cross-validated);
the Gaussians and the regression use disjoint halves of the fitting points; the threshold is
the contract's (a false-positive rate on held-out clean points); the pseudo-inverse as in the
one-layer detector.

Cost per scored input: one forward pass with feature capture (``L`` more forward and backward
passes and ``L`` forward passes with ``noise > 0``), then ``L`` (C_l x C_l) whitenings;
``forward`` adds nothing (the logits come from the same pass when ``noise = 0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.defenses.lid import ACTIVATIONS
from robustlab.defenses.mahalanobis import ClassGaussians
from robustlab.defenses.registry import register
from robustlab.defenses.supervised import SupervisedDetector
from robustlab.models.features import capture, feature_module

__all__ = ["MahalanobisEnsemble", "ensemble_layers", "pooled"]


def ensemble_layers(model: nn.Module) -> list[str]:
    """The default layers: the names of ``model``'s pooling modules and of its last
    activation module, in ``model.named_modules()`` order; without pooling modules, every
    activation module; without either (functional activations), every leaf module with
    weights (the last one gives the logits)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    pools = [n for n, m in named if isinstance(m, nn.MaxPool2d | nn.AvgPool2d)]
    acts = [n for n, m in named if isinstance(m, ACTIVATIONS)]
    if not acts and not pools:
        leaves = [
            n
            for n, m in named
            if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
        ]
        if not leaves:
            raise ValueError(
                "the model has no pooling, activation or weight module for the "
                "feature ensemble: name its layers with layers=[...]"
            )
        return leaves
    if not pools:
        return acts
    keep = set(pools) | set(acts[-1:])
    return [n for n, _ in named if n in keep]


def pooled(features: Tensor) -> Tensor:
    """(N, C) per-channel means of (N, C, ...) features; (N, D) features unchanged."""
    return features if features.dim() == 2 else features.flatten(2).mean(2)


@register("mahalanobis-ensemble")
class MahalanobisEnsemble(SupervisedDetector):
    """Lee et al.'s Mahalanobis feature ensemble around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        layers: module names (of ``model.named_modules()``) whose outputs are the features;
            default None, :func:`ensemble_layers`.
        noise: the input pre-processing magnitude, >= 0, in [0, 1] pixel units. Default 0.
        attack, norm, eps, attack_options: the attack crafted inside :meth:`fit` on the
            regression's training points. Default FGSM, linf, 0.3.
        seed: seeds the noisy training points.
        threshold, fpr, holdout: as :class:`~robustlab.defenses.detector.Detector`.

    ``fit(x, y)`` needs labels: the Gaussians are per class.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        noise: float = 0.0,
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
        if layers is None:
            layers = ensemble_layers(model)
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise TypeError(f"layers must be a non-empty list of module names, got {layers!r}")
        self.layers = [feature_module(model, name, option="layers")[0] for name in layers]
        self.noise = number(noise, "noise", low=0)
        self.gaussians = nn.ModuleList(ClassGaussians() for _ in self.layers)

    @property
    def per_layer(self) -> list[ClassGaussians]:
        """The class Gaussians of each layer, in the order of ``layers`` (``gaussians``, the
        ``nn.ModuleList`` that holds them, yields them typed as ``nn.Module``)."""
        return [cast(ClassGaussians, g) for g in self.gaussians]

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), with the features per layer once fitted."""
        sizes = [None if g.means is None else g.means.shape[1] for g in self.per_layer]
        return {**super().config(), "layers": self.layers, "noise": self.noise, "features": sizes}

    def features(self, x: Tensor) -> list[Tensor]:
        """Each layer's pooled features of ``x``, (N, C_l), from one forward pass."""
        _, feats = capture(self.base, x, self.layers, inputs=False, option="layers", flatten=False)
        return [pooled(f) for f in feats]

    def reference_size(self, n: int) -> int:
        """Half of the statistics points hold the class Gaussians."""
        return n // 2

    def fit_reference(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """Every layer's class Gaussians on the clean points ``x`` with labels ``y``."""
        with torch.no_grad():
            parts = [
                (self.features(xb), yb)
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
            ]
        for i, gauss in enumerate(self.per_layer):
            gauss.fit((f[i], yb) for f, yb in parts)

    def layer_scores(self, x: Tensor) -> Tensor:
        """``(M_1(x), ..., M_L(x))`` at ``x`` itself, (N, L) float64; differentiable."""
        feats = self.features(x)
        return torch.stack(
            [
                g.distances(f, f"layer {name!r}").amin(1)
                for g, f, name in zip(self.per_layer, feats, self.layers, strict=True)
            ],
            1,
        )

    def characteristics(self, x: Tensor, logits: Tensor) -> Tensor:
        """The per-layer distances (N, L), each at its pre-processed input when
        ``noise > 0``; in ``x.dtype``."""
        if not self.per_layer[0].fitted:
            raise ValueError(
                "the mahalanobis-ensemble detector is not fitted: call .fit(x_train, y_train)"
            )
        if self.noise == 0:
            return self.layer_scores(x).to(x.dtype)
        cols = []
        for i in range(len(self.layers)):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.layer_scores(xg)[:, i].sum(), xg)
            cols.append(self.layer_scores(x - self.noise * grad.sign())[:, i])
        return torch.stack(cols, 1).to(x.dtype)
