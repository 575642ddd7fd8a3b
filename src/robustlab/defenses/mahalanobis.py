"""Mahalanobis detection: distance of an input's features to the closest class-conditional
Gaussian with a shared covariance.

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018, arXiv:1807.03888; reference code
github.com/pokaxpoka/deep_Mahalanobis_detector (``lib_generation.py``: ``sample_estimator``,
``get_Mahalanobis_score_adv``; ``ADV_Generate_LID_Mahalanobis.py``) [code checked].

With ``f(x)`` (D,) the features of one layer of the classifier (default: the input of its last
``nn.Linear``, the penultimate features) and clean fitting points ``(x_i, y_i)``, ``n_c`` of
class ``c`` among ``n``:

    ``mu_c = (1/n_c) sum_{y_i = c} f(x_i)``,
    ``Sigma = (1/n) sum_c sum_{y_i = c} (f(x_i) - mu_c)(f(x_i) - mu_c)^T``   (tied covariance)

and the score is the squared Mahalanobis distance to the closest class mean,

    ``score(x) = min_c (f(x) - mu_c)^T Sigma^+ (f(x) - mu_c)``

(the paper's confidence is ``M(x) = max_c -(...)``, i.e. ``-score``; higher score: more likely
adversarial). ``Sigma^+`` is the pseudo-inverse (the reference code's
``EmpiricalCovariance().precision_``, a ``pinvh``): eigenvalues at or below ``D * 2.2e-16``
times the largest count as zero. Classes without fitting points have no Gaussian and are left
out of the minimum.

Input pre-processing (the paper's noise magnitude ``epsilon``, option ``noise``): the score is
evaluated at ``x' = x - noise * sign(grad_x score(x))`` (a step that brings ``x`` closer to its
closest class; clean inputs move more than out-of-distribution ones). Default 0 (off); for
adversarial detection the reference code tries {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}
and picks one on validation data. Our ``noise`` is in [0, 1] pixel units (the reference code
steps in normalised units: its sign divided by the channel std) and, as there, ``x'`` is not
clipped to [0, 1].

Differences from the paper: one layer, not the feature ensemble (the paper combines the scores
of every block, average-pooled per channel, with a logistic regression trained on attacked
validation points; here a conv layer's features are flattened, not pooled, and nothing is
trained on attacked points); the threshold is the contract's (a false-positive rate on
held-out clean points). ``M(x)`` is differentiable in ``x``, so an adaptive attack follows it
(the sign step is piecewise constant: its own gradient is zero).

Cost: fit, one forward pass per fitting point and an eigendecomposition of a D x D matrix
(float64); score, the forward pass that also gives the logits (``forward`` captures the
features and the logits in one pass), plus a forward and backward pass and a forward pass with
``noise > 0``. Memory: (K, D) class means and a (D, r) whitening map, in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.defenses.detector import Detector, rejection_scores
from robustlab.defenses.pca_detector import whitening
from robustlab.defenses.registry import register
from robustlab.models.features import capture, feature_module

__all__ = ["ClassGaussians", "Mahalanobis"]


class ClassGaussians(nn.Module):
    """Class-conditional Gaussians with one tied covariance on (N, D) features, in float64:
    :meth:`fit` on labelled features, :meth:`distances` to every class mean.

    Attributes after :meth:`fit`: ``classes`` (C,) the labels with a Gaussian, ``means``
    (C, D), ``covariance`` (D, D); ``whiten`` (D, r) maps ``f - mu`` to a vector whose squared
    norm is the Mahalanobis distance with the pseudo-inverse (eigenvalues at or below
    ``D * 2.2e-16`` times the largest count as zero).
    """

    # buffers, None before fit (annotations only: nn.Module keeps buffers out of the class)
    classes: Tensor | None
    means: Tensor | None
    covariance: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        for name in ("classes", "means", "covariance", "whiten", "means_whitened"):
            self.register_buffer(name, None)

    @property
    def fitted(self) -> bool:
        return self.means is not None

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> ClassGaussians:
        """Fit on ``(features (n, D), labels (n,))`` batches (one pass, float64 sums)."""
        parts = [
            (f.detach().to(torch.float64), y.to(device=f.device, dtype=torch.long))
            for f, y in batches
        ]
        y_all = torch.cat([y for _, y in parts])
        classes = torch.unique(y_all)
        d = parts[0][0].shape[1]
        like = parts[0][0]
        sums, counts = like.new_zeros(len(classes), d), like.new_zeros(len(classes))
        outer = like.new_zeros(d, d)
        for f, y in parts:
            slot = torch.searchsorted(classes, y)
            sums.index_add_(0, slot, f)
            counts.index_add_(0, slot, torch.ones_like(f[:, 0]))
            outer += f.T @ f
        means = sums / counts[:, None]
        # sum_c sum_i (f - mu_c)(f - mu_c)^T = sum_i f f^T - sum_c n_c mu_c mu_c^T
        cov = (outer - (means * counts[:, None]).T @ means) / len(y_all)
        cov = (cov + cov.T) / 2
        values, vectors = whitening(cov, cov.shape[0] * torch.finfo(torch.float64).eps)
        self.classes, self.means, self.covariance = classes, means, cov
        self.whiten = vectors / values.sqrt()  # (D, r)
        self.means_whitened = means @ self.whiten
        return self

    def distances(self, feats: Tensor, where: str = "the features") -> Tensor:
        """Squared Mahalanobis distances (N, C) of ``feats`` (N, D) to the class means
        (columns in the order of ``classes``), float64; differentiable in ``feats``."""
        if self.means is None:
            raise ValueError(
                "the Gaussians are not fitted yet: call the detector's "
                ".fit(x_train, y_train) on clean training points"
            )
        if feats.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"{where} give {feats.shape[1]} features but the detector was "
                f"fitted on {self.means.shape[1]}: refit it"
            )
        z = feats.to(self.whiten.dtype) @ self.whiten
        return (z[:, None, :] - self.means_whitened[None]).square().sum(-1)


@register("mahalanobis")
class Mahalanobis(Detector):
    """Lee et al.'s Mahalanobis detector around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        layer: the module (a name from ``model.named_modules()``) whose *input* gives the
            features, or None for the last ``nn.Linear`` (the logits when the model has
            none). Attribute ``layer`` holds the resolved name. Default None.
        noise: the input pre-processing magnitude (the paper's epsilon), >= 0, in [0, 1]
            pixel units. Default 0 (off).
        threshold: the detection threshold ``T`` (squared Mahalanobis distance), or None until
            :meth:`fit` sets it.
        fpr: the false-positive rate :meth:`fit` aims at, in (0, 1). Default 0.05.
        holdout: the fraction of the fitting points kept for the threshold, in (0, 1); the
            Gaussians are fitted on the rest. Default 0.2.

    Shapes: ``score(x)`` maps (N, C, H, W) to (N,); ``forward(x)`` to (N, K + 1) as every
    :class:`~robustlab.defenses.detector.Detector`. Attributes after :meth:`fit`: ``classes``
    (C,) the labels with a Gaussian, ``means`` (C, D), ``covariance`` (D, D), float64.

    Example:
        >>> det = robustlab.defenses.create("mahalanobis", model).fit(x_train, y_train)
        >>> rejected = det(x).argmax(1) == det(x).shape[1] - 1
    """

    has_statistics = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        noise: float = 0.0,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr, holdout=holdout)
        self.layer = feature_module(model, layer, option="layer")[0]
        self.noise = number(noise, "noise", low=0)
        self.gaussians = ClassGaussians()

    @property
    def classes(self) -> Tensor | None:
        """(C,) the labels with a Gaussian (None before :meth:`fit`)."""
        return self.gaussians.classes

    @property
    def means(self) -> Tensor | None:
        """(C, D) the class means, float64 (None before :meth:`fit`)."""
        return self.gaussians.means

    @property
    def covariance(self) -> Tensor | None:
        """(D, D) the tied covariance, float64 (None before :meth:`fit`)."""
        return self.gaussians.covariance

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), with the feature size ``features`` (D) and the
        number of ``gaussians`` (None before :meth:`fit`)."""
        means = self.means
        return {
            **super().config(),
            "layer": self.layer,
            "noise": self.noise,
            "features": None if means is None else means.shape[1],
            "gaussians": None if means is None else len(means),
        }

    @property
    def fitted(self) -> bool:
        """Whether the Gaussians are fitted and the threshold known."""
        return self.threshold is not None and self.means is not None

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, f(x))`` of one forward pass: (N, K) and the flattened features (N, D)."""
        logits, (feats,) = capture(self.base, x, [self.layer], option="layer")
        return logits, feats

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """Class means and tied covariance of the features of ``x`` (N, C, H, W) with labels
        ``y`` (N,), in float64, in batches of ``batch_size`` without gradients."""
        if y is None:
            raise ValueError(
                "the mahalanobis detector fits class-conditional Gaussians: "
                "pass the labels, .fit(x_train, y_train)"
            )
        with torch.no_grad():
            self.gaussians.fit(
                (self.features(x[i : i + batch_size])[1], y[i : i + batch_size])
                for i in range(0, len(x), batch_size)
            )

    def distances(self, feats: Tensor) -> Tensor:
        """Squared Mahalanobis distances (N, C) of features ``feats`` (N, D) to the class means
        (columns in the order of ``classes``), float64; differentiable in ``feats``."""
        return self.gaussians.distances(feats, f"layer {self.layer!r}")

    def _score_at(self, x: Tensor) -> Tensor:
        return self.distances(self.features(x)[1]).amin(1)

    def _preprocessed(self, x: Tensor) -> Tensor:
        """``x - noise * sign(grad_x score(x))``, with gradient 1 to ``x`` (identity path)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._score_at(xg).sum(), xg)
        return x - self.noise * grad.sign()

    def score(self, x: Tensor) -> Tensor:
        """The squared Mahalanobis distance of ``f(x)`` (at the pre-processed ``x'`` when
        ``noise > 0``) to the closest class mean, (N,), in ``x.dtype``: one forward pass
        (three with ``noise > 0``)."""
        x_eval = self._preprocessed(x) if self.noise > 0 else x
        return self._score_at(x_eval).to(x.dtype)

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """:meth:`score` of ``x``; the logits are not used (the features come from a forward
        pass of their own)."""
        return self.score(x)

    def forward(self, x: Tensor) -> Tensor:
        threshold = self._fitted_threshold()
        logits, feats = self.features(x)
        if self.noise > 0:
            score = self._score_at(self._preprocessed(x))
        else:  # one forward pass gives the logits and the features
            score = self.distances(feats).amin(1)
        return rejection_scores(logits, score.to(logits.dtype) - threshold)
