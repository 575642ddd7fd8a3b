"""Denoised smoothing: a trained denoiser in front of an off-the-shelf classifier.

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020, https://arxiv.org/abs/2003.01908; reference code
github.com/microsoft/denoised-smoothing.

Randomised smoothing (Cohen et al.) certifies ``g(x) = argmax_c P(f(x + delta) = c)``, but a
classifier ``f`` trained on clean images is poor on ``x + delta``. Instead of retraining ``f``,
denoised smoothing smooths the composition ``f(D(x + delta))`` with a denoiser ``D`` trained
for the noise; ``f`` is never modified, and the certificate is Cohen et al.'s for the composed
classifier. In the abstract's words [abstract checked], prepending a custom-trained denoiser
to any off-the-shelf classifier and smoothing gives a classifier that is provably robust
"without modifying the pretrained classifier", in white-box and black-box settings (only
queries of ``f`` are needed to certify; training with "stab" needs its gradients).

The parts: the DnCNN denoiser is a model (:class:`robustlab.models.dncnn.Denoiser`, saved and
loaded by ``robustlab.models.save`` / ``load``); its training loop is
:func:`robustlab.training.denoiser.train_denoiser`; this module holds the defense,
``f(D(x))``, which :class:`~robustlab.defenses.smoothing.Smoothing` then smooths::

    model = robustlab.defenses.create("denoised", f, denoiser=den)
    smooth = robustlab.defenses.create("smoothing", model, sigma=0.25)

Cost: every smoothing sample costs a forward of ``D`` on top of ``f``'s.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from robustlab.defenses.base import Defense
from robustlab.defenses.registry import register
from robustlab.models.dncnn import Denoiser, load_denoiser

__all__ = ["Denoised"]


@register("denoised")
class Denoised(Defense):
    """``base(denoiser(x))``: a frozen classifier behind a denoiser, the base classifier of
    denoised smoothing (smooth it with ``robustlab.defenses.create("smoothing", ...)``).

    Args:
        model: the classifier (inputs in [0, 1] pixel units, logits out), kept as ``base``. It
            comes first, as for every defense: ``create("denoised", model, denoiser=den)``. It
            stays in ``eval()`` mode whatever mode this module is put in (BatchNorm uses its
            running statistics; the classifier is never trained here).
        denoiser: a :class:`~robustlab.models.dncnn.Denoiser` (or any image-to-image module),
            or the path of a ``denoiser.safetensors`` checkpoint, loaded with
            :func:`~robustlab.models.dncnn.load_denoiser` onto the classifier's device.

    Shapes: (N, C, H, W) -> (N, K) logits.
    """

    def __init__(self, model: nn.Module, denoiser: nn.Module | str | os.PathLike[str]) -> None:
        super().__init__(model)
        if isinstance(denoiser, str | os.PathLike):
            param = next(model.parameters(), None)
            denoiser = load_denoiser(denoiser, device=param.device if param is not None else None)
        if not isinstance(denoiser, nn.Module):
            raise TypeError(
                f"denoiser must be an nn.Module or the path of a denoiser "
                f"checkpoint, got {type(denoiser).__name__}"
            )
        if isinstance(model, Denoiser) and not isinstance(denoiser, Denoiser):
            raise TypeError(
                "the classifier comes first: Denoised(classifier, denoiser=den), "
                "create('denoised', classifier, denoiser=den)"
            )
        self.denoiser = denoiser
        self.base.eval()

    def train(self, mode: bool = True) -> Denoised:
        super().train(mode)
        self.base.eval()
        return self

    def config(self) -> dict[str, Any]:
        """The defense's settings (JSON-able), as recorded in results."""
        meta = getattr(self.denoiser, "robustlab_meta", {})
        return {
            **super().config(),
            "denoiser": getattr(self.denoiser, "robustlab_arch", type(self.denoiser).__name__),
            **{k: meta[k] for k in ("sigma", "noise", "objective", "epoch") if k in meta},
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.base(self.denoiser(x))
