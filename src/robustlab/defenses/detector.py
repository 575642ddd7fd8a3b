"""The detector contract: a classifier with a rejection output, fitted on clean training data.

A detector scores each input (higher: more likely adversarial) and rejects it when the score
exceeds a threshold ``T``. Every detector of :mod:`robustlab.defenses` is a :class:`Detector`:

- ``fit(x, y)`` takes clean *training* points only (never the test points of an evaluation).
  The detector's own statistics (class means, PCA basis, density estimates, a detector
  network, ...) are fitted on the first ``1 - holdout`` of them (:meth:`Detector.fit_statistics`);
  ``T`` is set on the held-out rest so that at most ``floor(n fpr)`` of those ``n`` clean
  points are rejected: the ``ceil(n (1 - fpr))``-th smallest score (the rule of Xu et al.'s
  feature-squeezing code). A detector without statistics sets ``T`` on all of them.
- ``forward(x)`` returns (N, K + 1) scores: the classifier's K logits, unchanged, and a
  rejection column ``max_k z_k + (score(x) - T)`` that wins the argmax exactly when the
  detector fires; ``rejects = True`` tells the evaluation so (a rejected adversarial input
  counts as defended, a rejected clean input as an error). The rejection column is
  differentiable wherever the score is, so an attack on the joint classifier-and-detector
  (Carlini & Wagner 2017) follows its gradient.
- ``fitted`` is True once ``T`` is known (fitted, or given).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import check_images, number, positive_int
from robustlab.attacks.bpda import straight_through
from robustlab.defenses.base import Defense

__all__ = ["Detector", "rejection_scores", "threshold_at"]


def threshold_at(scores: Tensor, fpr: float) -> float:
    """The threshold that rejects at most ``floor(n fpr)`` of ``n`` clean ``scores`` (a point
    is rejected when its score is above it): the ``ceil(n (1 - fpr))``-th smallest score."""
    if scores.numel() == 0:
        raise ValueError("no clean scores to set the threshold on: fit on more points")
    rank = math.ceil(round(scores.numel() * (1 - fpr), 9))  # 1-based, >= 1
    return float(scores.flatten().sort().values[max(rank, 1) - 1])


def rejection_scores(logits: Tensor, margin: Tensor) -> Tensor:
    """``logits`` (N, K) with the rejection column ``max_k z_k + margin`` appended, (N, K+1);
    where ``margin > 0`` the column is lifted by one ulp when float rounding would hide it, so
    that ``argmax == K`` exactly where ``margin > 0``."""
    top = logits.amax(1)
    reject = top + margin
    above = torch.nextafter(top.detach(), torch.full_like(top, math.inf))
    exact = torch.where(margin > 0, torch.maximum(reject.detach(), above), reject.detach())
    return torch.cat([logits, straight_through(exact, reject).unsqueeze(1)], 1)


class Detector(Defense):
    """Base of the detectors: a score, a threshold at a false-positive rate, K + 1 outputs.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        threshold: the detection threshold ``T`` in score units, or None until :meth:`fit`.
        fpr: the false-positive rate :meth:`fit` aims at on held-out clean points, in (0, 1).
            Default 0.05.
        holdout: the fraction of the fitting points held out for the threshold when the
            detector has statistics of its own to fit, in (0, 1). Default 0.2.

    Subclasses implement :meth:`score_from` (and :meth:`fit_statistics` when they learn
    something from clean data; then set ``has_statistics = True``).
    """

    rejects = True
    #: whether :meth:`fit_statistics` learns from data (then the threshold uses held-out points)
    has_statistics = False

    def __init__(
        self,
        model: nn.Module,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(model)
        self.fpr = number(fpr, "fpr", low=0, high=1, low_open=True, high_open=True)
        self.holdout = number(holdout, "holdout", low=0, high=1, low_open=True, high_open=True)
        self.threshold = None if threshold is None else number(threshold, "threshold")
        #: how many clean points :meth:`fit` set the threshold on (None: not fitted)
        self.fit_samples: int | None = None

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), as recorded in results."""
        return {
            **super().config(),
            "threshold": self.threshold,
            "fpr": self.fpr,
            "holdout": self.holdout if self.has_statistics else None,
            "fit_samples": self.fit_samples,
        }

    @property
    def fitted(self) -> bool:
        """Whether the detector has a threshold (fitted, or given)."""
        return self.threshold is not None

    def extra_repr(self) -> str:
        return f"threshold={self.threshold!r}, fpr={self.fpr}, fit_samples={self.fit_samples}"

    @abstractmethod
    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The detection score (N,) of inputs ``x`` whose classifier logits are ``logits``
        (higher: more likely adversarial); differentiable in ``x`` where the method is."""

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """Learn the detector's statistics from clean training points (none by default)."""

    def score(self, x: Tensor) -> Tensor:
        """The detection score of ``x`` (N, C, H, W), shape (N,)."""
        return self.score_from(x, self.base(x))

    def detect(self, x: Tensor) -> Tensor:
        """Boolean (N,): ``score(x) > threshold`` (True: rejected as adversarial)."""
        return self.score(x) > self._fitted_threshold()

    def _fitted_threshold(self) -> float:
        if self.threshold is None:
            raise ValueError(
                f"the {self.name} detector has no threshold yet: call "
                ".fit(x_train, y_train) on clean training points, or pass "
                "threshold= when creating it"
            )
        return self.threshold

    @torch.no_grad()
    def scores(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`score` of ``x`` in batches of ``batch_size``, without gradients."""
        batch_size = positive_int(batch_size, "batch_size")
        return torch.cat([self.score(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def fit(self, x: Tensor, y: Tensor | None = None, batch_size: int = 256) -> Detector:
        """Fit on clean training points ``x`` (N, C, H, W) with labels ``y`` (N,) where the
        method uses them: statistics on the first ``1 - holdout`` of them, the threshold on
        the rest (on all of them when the detector has no statistics). In the model's
        current mode (use ``eval()``). Returns ``self``."""
        check_images(x)
        if y is not None and len(y) != len(x):
            raise ValueError(f"x has {len(x)} points but y has {len(y)} labels")
        held = x
        if self.has_statistics:
            n_held = math.ceil(len(x) * self.holdout)
            if n_held >= len(x) or n_held < 1:
                raise ValueError(
                    f"{len(x)} points cannot be split into statistics and a "
                    f"held-out {self.holdout:g} for the threshold: fit on more"
                )
            self.fit_statistics(x[:-n_held], None if y is None else y[:-n_held], batch_size)
            held = x[-n_held:]
        self.threshold = threshold_at(self.scores(held, batch_size), self.fpr)
        self.fit_samples = len(held)
        return self

    def forward(self, x: Tensor) -> Tensor:
        threshold = self._fitted_threshold()
        logits = self.base(x)
        return rejection_scores(logits, self.score_from(x, logits) - threshold)
