"""Random crop-rescale (``"crop-rescale"``): a random crop bilinearly rescaled to the input
size, optionally averaged over several crops.

Guo, Rana, Cisse, van der Maaten, "Countering Adversarial Images using Input Transformations",
ICLR 2018 (https://arxiv.org/abs/1711.00117), image cropping-rescaling. The stage draws fresh
randomness on every call (``randomized = True``): attack it with EOT (Athalye et al. 2018) and
judge it by repeated predictions. It is differentiable almost everywhere (a gather and bilinear
interpolation), so plain gradient attacks with EOT apply. It maps (N, C, H, W) images in [0, 1]
to images in [0, 1] of the same shape, dtype and device, draws one crop per image, and never
modifies its input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.defenses.draws import MeanOfDraws, pick, uniform
from robustlab.defenses.preprocess import Transform, stage_images
from robustlab.defenses.registry import register

__all__ = ["CropRescale", "CropRescaleDefense"]

#: crop side / image side: 90-pixel crops of 299-pixel images (Athalye et al.'s reimplementation
#: of Guo et al.'s cropping defense, ``inputtransformations/defense.py``: ``defend_crop``)
CROP_RATIO = 90 / 299


class CropRescale(Transform):
    """Random crop rescaled to the input size (Guo et al. 2018, image cropping-rescaling).

    For each image draw a crop of ``h = round(ratio H)`` by ``w = round(ratio W)`` pixels (at
    least 1) at a uniformly random position (every whole-pixel offset equally likely), then
    resize it back to H x W with bilinear interpolation (``F.interpolate``,
    ``align_corners=False``; Guo et al.'s code rescales with PIL's bilinear ``Scale``,
    Athalye et al. with TensorFlow's ``crop_and_resize`` and ``resize_bilinear``).

    Args:
        ratio: crop side / image side, in (0, 1]. Default 90/299 = 0.301: the 90-pixel crops of
            299-pixel images of Athalye et al.'s reimplementation of this defense (the one they
            break with EOT). Guo et al.'s code takes the crop fraction from the command line
            (``--crop_frac``, default 1.0, i.e. no crop) and we did not find the paper's value
            in code (unverified). ``ratio=1`` is the identity.

    Differentiable (gather + bilinear interpolation); random.
    """

    randomized = True

    def __init__(self, ratio: float = CROP_RATIO) -> None:
        super().__init__()
        self.ratio = number(ratio, "ratio", low=0.0, high=1.0, low_open=True)

    def config(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def transform(self, x: Tensor) -> Tensor:
        x = stage_images(x, "crop-rescale")
        n, _, h, w = x.shape
        ch, cw = max(1, round(self.ratio * h)), max(1, round(self.ratio * w))
        if (ch, cw) == (h, w):
            return x.clone()
        u = uniform((2, n), x.device, self.generator)
        top = (u[0] * (h - ch + 1)).long().clamp_max(h - ch)
        left = (u[1] * (w - cw + 1)).long().clamp_max(w - cw)
        rows = top[:, None] + torch.arange(ch, device=x.device)
        cols = left[:, None] + torch.arange(cw, device=x.device)
        crop = pick(x, rows, cols)
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


@register("crop-rescale")
class CropRescaleDefense(MeanOfDraws):
    """``model(CropRescale(x))``, or with ``samples`` > 1 the log of the mean softmax over
    that many random crops (Guo et al. average predictions over crops at test time;
    Athalye et al.'s reimplementation averages 30).

    Args:
        model: the base classifier ((N, C, H, W) in [0, 1] -> (N, K) logits).
        ratio: crop side / image side, default 90/299 (:class:`CropRescale`).
        samples: crops per prediction, >= 1. Default 1 (logits of one crop).
        generator: source of the crop positions (default: torch's global generator).

    Cost: ``samples`` forward passes of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = CROP_RATIO,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, CropRescale(ratio), samples, generator)
