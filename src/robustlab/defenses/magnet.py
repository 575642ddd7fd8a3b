"""MagNet: an autoencoder's reconstruction error detects, its reconstruction reforms.

Meng, Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017,
arXiv:1705.09064; reference code github.com/Trevillie/MagNet (``worker.py``: ``AEDetector``,
``DBDetector``, ``SimpleReformer``, ``JSD``, ``Operator.get_thrs``; ``test_defense.py``)
[code checked]. The autoencoder is :class:`robustlab.models.autoencoder.MagNetAutoencoder`,
trained by :func:`robustlab.training.autoencoder.train_autoencoder`; this defense never trains.

Two prongs around a classifier ``f`` and an autoencoder ``ae`` trained on clean images only
(clean images lie near the manifold it learnt, adversarial ones further away):

- the **detector** rejects ``x`` when its score exceeds ``T``: the reconstruction error
  (``measure="error"``, the reference's ``AEDetector``)

      ``score(x) = mean_i |x_i - ae(x)_i|^p``   (over the C H W pixels; p in {1, 2})

  or the probability divergence (``measure="jsd"``, the reference's ``DBDetector``), with
  ``P = softmax(f(x) / t)``, ``Q = softmax(f(r(x)) / t)`` at temperature ``t``:

      ``score(x) = JSD(P, Q) = (KL(P || M) + KL(Q || M)) / 2``,  ``M = (P + Q) / 2``  (nats);

- the **reformer** ``r(x) = clip(ae(x), 0, 1)``: the classifier sees the reconstruction, so
  ``forward`` returns ``[f(r(x)), max_k f(r(x))_k + score(x) - T]`` (``reform=True``).

Defaults of the reference code (``test_defense.py``): MNIST uses two error detectors, I (the
pooling autoencoder, p = 2) and II (the autoencoder without pooling, p = 1), with detector
I's autoencoder as the reformer; each detector's threshold drops 0.1 % of a clean validation
set the autoencoders were not trained on. CIFAR-10 (not in the reference code; the paper's
text as we recall it, unverified): one error detector and two JSD detectors, t = 10 and 40.
Build the MNIST pair as ``create("magnet", f, autoencoder=ae_II, p=1, reformer=ae_I)`` and
``create("magnet", f, autoencoder=ae_I, p=2)``.

Differences from the reference: the paper's ``||x - ae(x)||_p`` is computed as the reference
does, the mean of ``|.|^p`` (a monotone function of the norm: same decisions, other units);
one detector per defense with the contract's threshold (at most ``floor(n fpr)`` of the ``n``
clean fitting points rejected; the reference rejects ``int(n drop_rate)`` of them, score
``>=`` its threshold), so the paper's several detectors, which reject when any one fires, are
not combined here; ``fpr`` defaults to the project's 0.05, not the paper's 0.001.

The score is differentiable in ``x`` (``|.|`` almost everywhere), so an adaptive attack on the
joint classifier-and-detector (Carlini & Wagner, "MagNet and 'Efficient Defenses Against
Adversarial Attacks' are Not Robust to Adversarial Examples", arXiv:1711.08478) follows it.

Cost per input: ``measure="error"`` one forward of ``ae`` (two with a separate ``reformer``)
and one of ``f``; ``"jsd"`` adds one more forward of ``f``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.defenses.detector import Detector, rejection_scores
from robustlab.defenses.registry import register
from robustlab.models.autoencoder import load_autoencoder

__all__ = ["MEASURES", "MagNet", "jensen_shannon", "reconstruction_error"]

MEASURES = ("error", "jsd")


def reconstruction_error(x: Tensor, reconstruction: Tensor, p: int) -> Tensor:
    """``mean_i |x_i - reconstruction_i|^p`` over all but the first dimension, shape (N,)."""
    diff = x - reconstruction
    return (diff.abs() if p == 1 else diff.square()).flatten(1).mean(1)


def jensen_shannon(logits_p: Tensor, logits_q: Tensor, temperature: float) -> Tensor:
    """The Jensen-Shannon divergence (nats, in [0, log 2]) between ``softmax(logits_p / t)``
    and ``softmax(logits_q / t)``, row by row, shape (N,)."""
    lp = (logits_p / temperature).log_softmax(1)
    lq = (logits_q / temperature).log_softmax(1)
    lm = lp.logaddexp(lq) - math.log(2)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(1) + (lq.exp() * (lq - lm)).sum(1))


def _module(ae: Any, what: str, model: nn.Module) -> nn.Module:
    """``ae`` as a module: a path is loaded onto the classifier's device."""
    if isinstance(ae, str | os.PathLike):
        param = next(model.parameters(), None)
        return load_autoencoder(ae, device=param.device if param is not None else None)
    if not isinstance(ae, nn.Module):
        raise TypeError(
            f"{what} must be an nn.Module (a trained MagNetAutoencoder) or the "
            f"path of an autoencoder checkpoint, got {type(ae).__name__}"
        )
    return ae


@register("magnet")
class MagNet(Detector):
    """Meng & Chen's MagNet around ``model``: one detector and the reformer, K + 1 outputs.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        autoencoder: the detector's trained autoencoder (a
            :class:`~robustlab.models.autoencoder.MagNetAutoencoder` or any image-to-image
            module), or the path of its checkpoint (loaded onto the classifier's device).
            Required: train it with :func:`robustlab.training.autoencoder.train_autoencoder`.
        measure: ``"error"`` (reconstruction error) or ``"jsd"`` (divergence of the
            classifier's softened outputs on ``x`` and on ``r(x)``). Default ``"error"``.
        p: the power of the reconstruction error, 1 or 2 (``measure="error"`` only).
            Default 2 (the paper's detector I; its detector II uses 1).
        temperature: ``t`` > 0 of the JSD detector (``measure="jsd"`` only). Default 10 (the
            paper's CIFAR-10 uses 10 and 40, as we recall it).
        reform: whether the classifier sees the reformer's output (the paper) or ``x``
            itself (detector only). Default True.
        reformer: the reformer's autoencoder (module or path), if not ``autoencoder``; it is
            also the one the JSD compares against. Default None: ``autoencoder``.
        threshold, fpr: as :class:`~robustlab.defenses.detector.Detector` (``fit`` sets ``T``
            on all its points: pass clean points the autoencoders were not trained on).

    Shapes: ``score(x)`` and ``detect(x)`` map (N, C, H, W) to (N,); ``forward(x)`` to
    (N, K + 1): ``[:, :K]`` are ``base(r(x))`` (``base(x)`` with ``reform=False``),
    ``[:, K]`` the rejection column, the argmax exactly where ``detect(x)``.

    Example:
        >>> magnet = robustlab.defenses.create("magnet", f, autoencoder=ae).fit(x_val)
    """

    def __init__(
        self,
        model: nn.Module,
        autoencoder: nn.Module | str | os.PathLike[str],
        measure: str = "error",
        p: int = 2,
        temperature: float = 10.0,
        reform: bool = True,
        reformer: nn.Module | str | os.PathLike[str] | None = None,
        threshold: float | None = None,
        fpr: float = 0.05,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr)
        self.measure = one_of(measure, "measure", MEASURES)
        self.p = one_of(p, "p", (1, 2))
        self.temperature = number(temperature, "temperature", low=0, low_open=True)
        if not isinstance(reform, bool):
            raise TypeError(f"reform must be True or False, got {reform!r}")
        self.reform = reform
        self.autoencoder = _module(autoencoder, "autoencoder", model)
        self.reformer = None if reformer is None else _module(reformer, "reformer", model)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), as recorded in results."""

        def arch(ae: nn.Module | None) -> Any:
            return None if ae is None else getattr(ae, "robustlab_arch", type(ae).__name__)

        return {
            **super().config(),
            "measure": self.measure,
            "p": self.p if self.measure == "error" else None,
            "temperature": self.temperature if self.measure == "jsd" else None,
            "reform": self.reform,
            "autoencoder": arch(self.autoencoder),
            "reformer": arch(self.reformer),
        }

    def reformed(self, x: Tensor, reconstruction: Tensor | None = None) -> Tensor:
        """The reformer's output ``clip(ae(x), 0, 1)`` (N, C, H, W); ``reconstruction`` is
        ``autoencoder(x)`` where already computed."""
        if self.reformer is not None:
            return self.reformer(x).clamp(0, 1)
        return (self.autoencoder(x) if reconstruction is None else reconstruction).clamp(0, 1)

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The MagNet score (N,) of ``x`` whose classifier logits ``base(x)`` are ``logits``:
        ``mean |x - ae(x)|^p``, or the JSD of ``base(x)`` and ``base(r(x))`` at ``t``."""
        if self.measure == "error":
            return reconstruction_error(x, self.autoencoder(x), self.p)
        return jensen_shannon(logits, self.base(self.reformed(x)), self.temperature)

    def score(self, x: Tensor) -> Tensor:
        """The MagNet score of ``x`` (N, C, H, W), shape (N,) (the error needs no classifier
        pass)."""
        if self.measure == "error":
            return reconstruction_error(x, self.autoencoder(x), self.p)
        return super().score(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self.reform:
            return super().forward(x)
        threshold = self._fitted_threshold()
        if self.measure == "error":
            reconstruction = self.autoencoder(x)
            logits = self.base(self.reformed(x, reconstruction))
            score = reconstruction_error(x, reconstruction, self.p)
        else:
            logits = self.base(self.reformed(x))
            score = jensen_shannon(self.base(x), logits, self.temperature)
        return rejection_scores(logits, score - threshold)
