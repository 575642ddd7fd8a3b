"""Random resize and pad (``"random-resize-pad"``): a random nearest-neighbour downsizing, then
padding at a random offset, kept at the input size.

Xie, Wang, Zhang, Ren, Yuille, "Mitigating Adversarial Effects Through Randomization", ICLR
2018 (https://arxiv.org/abs/1711.01991). The stage draws fresh randomness on every call
(``randomized = True``): attack it with EOT (Athalye et al. 2018) and judge it by repeated
predictions. It is differentiable almost everywhere (nearest-neighbour index maps and padding),
so plain gradient attacks with EOT apply. It maps (N, C, H, W) images in [0, 1] to images in
[0, 1] of the same shape, dtype and device, draws one transformation per image, and never
modifies its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.defenses.draws import MeanOfDraws, pick, uniform
from robustlab.defenses.preprocess import Transform, stage_images
from robustlab.defenses.registry import register

__all__ = ["RandomResizePad", "RandomResizePadDefense"]

#: smallest resized side / padded side in Xie et al. (r in [299, 331) padded to 331)
RESIZE_MIN_RATIO = 299 / 331


class RandomResizePad(Transform):
    """Random resizing and padding (Xie et al. 2018), kept at the input size.

    Xie et al. resize a 299 x 299 image to ``r x r`` with ``r`` uniform in {299, ..., 330}
    (nearest neighbour) and zero-pad it at a uniformly random offset to 331 x 331, which the
    network takes in. A robustlab model takes the input size H x W, so we keep the ratio
    between the smallest resized side and the padded side: for square images ``r`` is uniform
    in {r_min, ..., H - 1} with ``r_min = min(round(min_ratio H), H - 1)``, ``min_ratio =
    299/331``: 28 -> {25, 26, 27}, 32 -> {29, 30, 31}, 299 -> {270, ..., 298}. Every draw pads
    by at least one pixel, as Xie's r < 331 does. For H != W the height ``r`` is drawn so and
    the width is ``clamp(round(r W / H), 1, W)``.

    The resize is nearest neighbour: output pixel ``(i, j)`` of the ``r_h x r_w`` image takes
    input pixel ``(floor(i H / r_h), floor(j W / r_w))`` (PyTorch's ``"nearest"``, TensorFlow's
    ``NEAREST_NEIGHBOR`` without ``align_corners``). The top/left offsets are uniform in
    {0, ..., H - r_h} and {0, ..., W - r_w}; the border gets ``pad_value``. One draw per image.

    Args:
        min_ratio: smallest resized side / input side, in (0, 1]. Default 299/331.
        pad_value: value of the padding, in [0, 1]. Default 0.0 (the paper's zero padding).
            Xie et al.'s code pads with 0 in its [-1, 1] input scale, which is 0.5 in [0, 1]
            pixels; Athalye et al.'s reimplementation pads with 0.5 too (a guess, their comment
            says).

    Xie et al.'s challenge code draws ``r`` from [310, 331) and averages 30 draws (with random
    horizontal flips); the paper's range is [299, 331). Differentiable almost everywhere (a
    gather: each output pixel's gradient goes to the input pixel it copies); random.
    """

    randomized = True

    def __init__(self, min_ratio: float = RESIZE_MIN_RATIO, pad_value: float = 0.0) -> None:
        super().__init__()
        self.min_ratio = number(min_ratio, "min_ratio", low=0.0, high=1.0, low_open=True)
        self.pad_value = number(pad_value, "pad_value", low=0.0, high=1.0)

    def config(self) -> dict[str, Any]:
        return {"min_ratio": self.min_ratio, "pad_value": self.pad_value}

    def sizes(self, h: int) -> tuple[int, int]:
        """The smallest and largest resized height for an input of height ``h``."""
        if h < 2:
            raise ValueError(
                f"random-resize-pad needs images of height >= 2 (it shrinks them "
                f"by at least one pixel), got height {h}"
            )
        return min(max(1, round(self.min_ratio * h)), h - 1), h - 1

    def transform(self, x: Tensor) -> Tensor:
        x = stage_images(x, "random resize-pad")
        n, _, h, w = x.shape
        lo, hi = self.sizes(h)
        u = uniform((3, n), x.device, self.generator)
        rh = lo + (u[0] * (hi - lo + 1)).long().clamp_max(hi - lo)
        rw = (rh * w / h).round().long().clamp(1, w)
        top = (u[1] * (h - rh + 1)).long().minimum(h - rh)
        left = (u[2] * (w - rw + 1)).long().minimum(w - rw)
        i = torch.arange(h, device=x.device) - top[:, None]  # (N, H): row in the box
        j = torch.arange(w, device=x.device) - left[:, None]  # (N, W): column in the box
        in_rows = (i >= 0) & (i < rh[:, None])
        in_cols = (j >= 0) & (j < rw[:, None])
        inside = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
        rows = (i.clamp_min(0) * h).div(rh[:, None], rounding_mode="floor").clamp_max(h - 1)
        cols = (j.clamp_min(0) * w).div(rw[:, None], rounding_mode="floor").clamp_max(w - 1)
        out = pick(x, rows, cols)
        return torch.where(inside[:, None], out, out.new_tensor(self.pad_value))


@register("random-resize-pad")
class RandomResizePadDefense(MeanOfDraws):
    """``model(RandomResizePad(x))``, or with ``samples`` > 1 the log of the mean softmax over
    that many draws (Xie et al.'s challenge code sums 30).

    Args:
        model: the base classifier ((N, C, H, W) in [0, 1] -> (N, K) logits).
        min_ratio, pad_value: as :class:`RandomResizePad` (defaults 299/331, 0.0).
        samples: draws per prediction, >= 1. Default 1.
        generator: source of the sizes and offsets (default: torch's global generator).

    Cost: ``samples`` forward passes of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        min_ratio: float = RESIZE_MIN_RATIO,
        pad_value: float = 0.0,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, RandomResizePad(min_ratio, pad_value), samples, generator)
