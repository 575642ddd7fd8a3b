"""The extra-class detector: a classifier trained with one more output, "adversarial", rejects
the inputs where that output wins (secondary classification inside the classifier itself).

Grosse, Manoharan, Papernot, Backes, McDaniel, "On the (Statistical) Detection of Adversarial
Examples", 2017, arXiv:1702.06280 (the outlier-class part). The model is trained by the
``extra-class`` objective (:mod:`robustlab.training.objectives.extra_class`, recipe
``configs/extra_class.toml``): clean points with their labels and adversarial points labelled
K, so it returns K + 1 logits ``z_0 .. z_K``. This detector only reads them:

    ``score(x) = z_K(x) - max_{k < K} z_k(x)``

The paper rejects where the extra class is the argmax, i.e. ``score > 0``: pass
``threshold=0.0`` for exactly that rule. By default the threshold follows the contract of
:mod:`robustlab.defenses.detector` (a false-positive rate ``fpr`` on held-out clean training
points), like every other detector here, so that the detectors are compared at one clean FPR.

The K classes the detector reports are ``z_0 .. z_{K-1}`` (:attr:`base` is that classifier,
:class:`~robustlab.models.heads.ClassLogits` of the model, the audit's transfer surrogate);
the rejection column is built from ``score`` as for every detector. The score is
differentiable, and C&W's adaptive attack (a target class other than y and the extra one)
breaks it (Carlini & Wagner 2017, Section 4.1).

Cost: one forward pass of the K + 1-class model per input; fitting: one pass over the clean
points for the threshold.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from robustlab.defenses.detector import Detector, rejection_scores
from robustlab.defenses.registry import register
from robustlab.models.heads import ClassLogits, check_extra_class

__all__ = ["ExtraClassDetector", "extra_class_margin"]


def extra_class_margin(outputs: Tensor) -> Tensor:
    """``z_K - max_{k < K} z_k`` (N,) of (N, K + 1) outputs: positive where the extra (last)
    class wins."""
    return outputs[:, -1] - outputs[:, :-1].amax(1)


@register("extra-class")
class ExtraClassDetector(Detector):
    """Rejects where the last output of a K + 1-class model beats the K class logits by more
    than the threshold.

    Args:
        model: a model trained with the ``extra-class`` objective, (N, K + 1) logits with the
            extra class last, inputs in [0, 1].
        threshold: ``T`` in logit units (0.0: the paper's argmax rule), or None until
            :meth:`fit`.
        fpr: the false-positive rate :meth:`fit` sets ``T`` at on clean points. Default 0.05.
    """

    base: ClassLogits  # narrows Defense.base

    extra_outputs = 1

    def __init__(self, model: nn.Module, threshold: float | None = None, fpr: float = 0.05) -> None:
        super().__init__(ClassLogits(model), threshold=threshold, fpr=fpr)

    def config(self) -> dict[str, Any]:
        """The settings, and that the model must come from the ``extra-class`` objective."""
        return {
            **super().config(),
            "needs": "a model with K + 1 outputs trained with the "
            "extra-class objective (its last output)",
        }

    def score(self, x: Tensor) -> Tensor:
        """``z_K(x) - max_{k < K} z_k(x)``, one forward pass of the K + 1-class model."""
        return extra_class_margin(self.outputs(x))

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The score of ``x``; ``logits`` (the K class logits) do not hold the extra class's
        logit, so the model runs again on ``x`` (``forward`` and ``score`` run it once)."""
        return self.score(x)

    def outputs(self, x: Tensor) -> Tensor:
        """The model's (N, K + 1) logits, checked for shape."""
        return check_extra_class(self.base.model(x))

    def forward(self, x: Tensor) -> Tensor:
        threshold = self._fitted_threshold()
        out = self.outputs(x)
        return rejection_scores(out[:, :-1], extra_class_margin(out) - threshold)
