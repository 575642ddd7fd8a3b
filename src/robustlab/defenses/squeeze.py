"""Feature squeezing: a detector that flags inputs whose prediction moves under squeezing.

Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
NDSS 2018, arXiv:1704.01155; reference code github.com/mzweilin/EvadeML-Zoo
(``detections/feature_squeezing.py``: ``l1_dist``, ``calculate_distance_max``, ``train``;
``utils/squeeze.py``) [code checked].

With ``p(x) = softmax(f(x))`` and squeezers ``S`` (input transformations that barely change a
legitimate input's prediction), the score is

    ``score(x) = max_{s in S} || p(x) - p(s(x)) ||_1``      (in [0, 2])

and ``x`` is flagged when ``score(x) > T``. ``T`` is fitted on legitimate inputs only: with
``n`` scores sorted ascending, ``T`` is the ``ceil(n (1 - fpr))``-th (the reference code's
``train``), so at most ``floor(n fpr)`` of the fitting points are flagged.

Squeezer sets of the paper (EvadeML-Zoo's ``Reproduce_FeatureSqueezing.md``): MNIST
{1-bit depth, 2 x 2 median} (our default); CIFAR-10 {5-bit depth, 2 x 2 median, non-local
means 13-3-2}; ImageNet {5-bit depth, 2 x 2 median, non-local means 11-3-4}. Non-local means
is not offered here. Thresholds quoted in its MagNet-comparison commands: MNIST 1.2358,
CIFAR-10 1.7547 (for its models; fit your own).

As a defense the detector adds a rejection output: ``forward`` returns (N, K + 1) scores whose
first K columns are the classifier's logits, unchanged, and whose last column wins the argmax
exactly when the detector fires (``rejects = True`` tells the evaluation so: a rejected
adversarial input counts as defended, a rejected clean input as an error). An adaptive attack
must therefore both change the class and keep the rejection column below it, i.e. keep the
score under ``T``; the bit-depth squeezer declares itself non-differentiable, so attack with
BPDA (:func:`robustlab.attacks.bpda.bpda`), which reaches it inside this module.

Cost: ``1 + |S|`` forward passes of the model per input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.defenses.detector import Detector
from robustlab.defenses.preprocess import BitDepthReduction, MedianSmoothing, Transform
from robustlab.defenses.registry import register

__all__ = ["SQUEEZERS", "FeatureSqueezing", "squeezer"]

#: squeezer spec name -> (stage, its one option); a spec is ``"name:value"``, value an integer
#: name -> (the stage's class, built from one integer; the name of that integer option)
SQUEEZERS: dict[str, tuple[Callable[[int], Transform], str]] = {
    "bit-depth": (BitDepthReduction, "bits"),
    "median": (MedianSmoothing, "window"),
}


def squeezer(spec: str | Transform) -> Transform:
    """The stage for a spec: ``"bit-depth:B"`` (B bits, 1..8, :class:`BitDepthReduction`),
    ``"median:K"`` (K x K window, :class:`MedianSmoothing`); a :class:`Transform` is used as is."""
    if isinstance(spec, Transform):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"a squeezer is a spec string like 'median:2' or a Transform, got {type(spec).__name__}"
        )
    name, sep, value = spec.partition(":")
    name = name.strip().lower()
    usage = "'bit-depth:B' (B bits, 1..8) or 'median:K' (K x K window, K >= 1)"
    if not sep or name not in SQUEEZERS:
        raise ValueError(f"unknown squeezer {spec!r}; valid squeezers are {usage}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(
            f"squeezer {spec!r}: the value after ':' must be an integer; "
            f"valid squeezers are {usage}"
        ) from None
    return SQUEEZERS[name][0](number)


def _spec(stage: nn.Module) -> str:
    """A stage's spec string (its repr for stages without one)."""
    for name, (cls, option) in SQUEEZERS.items():
        if type(stage) is cls:
            return f"{name}:{getattr(stage, option)}"
    return repr(stage)


@register("feature-squeezing")
class FeatureSqueezing(Detector):
    """Xu et al.'s feature-squeezing detector around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (kept as ``self.base``).
        squeezers: squeezer specs (``"bit-depth:B"``, ``"median:K"``; see :func:`squeezer`) or
            :class:`Transform` stages; a string may hold several separated by commas. Default
            ``("bit-depth:1", "median:2")``, the paper's MNIST set; use ``("bit-depth:5",
            "median:2")`` for natural images. Held in ``self.squeezers`` (an ``nn.ModuleList``).
        threshold: the detection threshold ``T`` (finite, >= 0; scores lie in [0, 2]), or None
            until :meth:`fit` sets it.
        fpr: the false-positive rate :meth:`fit` aims at, in (0, 1). Default 0.05 (the paper).

    Shapes: ``score(x)`` and ``detect(x)`` map (N, C, H, W) to (N,); ``forward(x)`` to
    (N, K + 1): ``[:, :K]`` are ``base(x)``, ``[:, K]`` is the rejection score
    ``max_k z_k + (score(x) - T)`` (lifted by one ulp where float rounding would hide a
    positive margin), so ``argmax == K`` exactly where ``detect(x)``.

    Example:
        >>> fs = robustlab.defenses.create("feature-squeezing", model).fit(x_clean)
        >>> rejected = fs(x).argmax(1) == fs(x).shape[1] - 1
    """

    def __init__(
        self,
        model: nn.Module,
        squeezers: str | Iterable[str | Transform] = ("bit-depth:1", "median:2"),
        threshold: float | None = None,
        fpr: float = 0.05,
    ) -> None:
        if threshold is not None:  # scores lie in [0, 2]
            number(threshold, "threshold", low=0)
        super().__init__(model, threshold=threshold, fpr=fpr)
        if isinstance(squeezers, str):
            squeezers = [s for s in squeezers.split(",") if s.strip()]
        if not isinstance(squeezers, Iterable):
            raise TypeError(
                f"squeezers must be a sequence of specs like ('bit-depth:1', "
                f"'median:2'), got {type(squeezers).__name__}"
            )
        stages = [squeezer(s) for s in squeezers]
        if not stages:
            raise ValueError(
                "squeezers is empty: give at least one, e.g. ('bit-depth:1', 'median:2')"
            )
        self.squeezers = nn.ModuleList(stages)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), as recorded in results."""
        return {**super().config(), "squeezers": [_spec(s) for s in self.squeezers]}

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """``max_s || softmax(logits) - softmax(base(s(x))) ||_1``, shape (N,)."""
        p = logits.softmax(1)
        distances = [(p - self.base(s(x)).softmax(1)).abs().sum(1) for s in self.squeezers]
        return torch.stack(distances).amax(0)
