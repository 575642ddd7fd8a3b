"""Thermometer encoding (Buckman, Roy, Raffel, Goodfellow, "Thermometer Encoding: One Hot Way
to Resist Adversarial Examples", ICLR 2018).

Each pixel value ``x`` in [0, 1] is quantised into ``levels`` buckets and replaced by the
cumulative ("thermometer") code of its bucket::

    b = floor(0.99999 * clip(x, 0, 1) * levels)          (bucket, 0 .. levels - 1)
    code_k(x) = 1 if k <= b else 0,   k = 0 .. levels - 1

as in the reimplementation of Athalye et al. (github.com/anishathalye/obfuscated-gradients,
``thermometer/``; METHODS.md C8); ``levels = 16`` is their CIFAR-10 setting. An (N, C, H, W)
image becomes an (N, C * levels, H, W) code: channel ``c * levels + k`` holds ``code_k`` of
input channel ``c`` (each input channel's ``levels`` codes are consecutive). The model behind
the encoding must therefore take ``C * levels`` input channels and be trained on the code.

The code is piecewise constant in ``x``: its gradient is zero almost everywhere, so the stage
declares ``differentiable = False``. Its BPDA surrogate (Athalye, Carlini, Wagner,
ICML 2018, METHODS.md A12) is the soft thermometer ``clip(levels * x - k + 1, 0, 1)``, which
equals the code except at index ``b + 1``, where it holds the fractional part of
``levels * x`` (so ``floor`` of the surrogate is the code, up to the 0.99999 factor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import integer
from robustlab.defenses.preprocess import Preprocessed, Transform
from robustlab.defenses.registry import register

__all__ = ["Thermometer", "ThermometerEncoding"]


class ThermometerEncoding(Transform):
    """The thermometer code of an image, (N, C, H, W) in [0, 1] -> (N, C * levels, H, W) in
    {0, 1}, same dtype and device (any (N, C, ...) input works the same way).

    Args:
        levels: number of quantisation levels l >= 2 (default 16, Athalye et al.'s setting).
    """

    differentiable = False  # piecewise constant: zero gradient almost everywhere

    def __init__(self, levels: int = 16) -> None:
        super().__init__()
        self.levels = integer(levels, "thermometer levels", minimum=2)

    def config(self) -> dict[str, Any]:
        return {"levels": self.levels}

    def _ks(self, x: Tensor) -> Tensor:
        """k = 0 .. levels - 1, shaped to broadcast against ``x.unsqueeze(2)``."""
        ks = torch.arange(self.levels, device=x.device, dtype=x.dtype)
        return ks.view(self.levels, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(
                f"thermometer encoding expects floating-point images (N, C, H, W), "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )

    def transform(self, x: Tensor) -> Tensor:
        self._check(x)
        bucket = torch.floor(0.99999 * x.clamp(0, 1) * self.levels)
        code = self._ks(x) <= bucket.unsqueeze(2)  # (N, C, levels, ...)
        return code.to(x.dtype).flatten(1, 2)

    def approximation(self, x: Tensor) -> Tensor:
        """The soft thermometer ``clip(levels * x - k + 1, 0, 1)`` (Athalye et al.'s BPDA
        surrogate), shaped like the code."""
        self._check(x)
        soft = self.levels * x.unsqueeze(2) - self._ks(x) + 1
        return soft.clamp(0, 1).flatten(1, 2)


def _input_channels(model: nn.Module) -> int | None:
    """The input channels of ``model``'s first convolution, if it has one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


@register("thermometer")
class Thermometer(Preprocessed):
    """``base(thermometer_code(x))``: the model sees the (N, C * levels, H, W) thermometer
    code of the image, never the image (Buckman et al. 2018).

    ``model`` must be built for ``C * levels`` input channels, e.g.
    ``robustlab.models.create("smallcnn", in_channels=16)`` for grey images and 16 levels, and
    trained on the code: train this module itself (``robustlab.training.fit(defense, ...)``;
    the encoding has no parameters). The stage is non-differentiable; attack it with BPDA
    (:func:`robustlab.attacks.bpda.bpda`), which uses the soft thermometer.

    Args:
        model: the classifier of codes (the undefended base model, kept as ``self.base``).
        levels: quantisation levels (default 16, Athalye et al.'s CIFAR-10 setting).

    Raises:
        ValueError: ``levels`` is not an integer >= 2; the model's first convolution takes a
            number of channels that is not a multiple of ``levels`` (at construction) or not
            ``C * levels`` (at the first forward of C-channel images).
    """

    stage: ThermometerEncoding  # narrows Preprocessed.stage

    def __init__(self, model: nn.Module, levels: int = 16) -> None:
        super().__init__(model, ThermometerEncoding(levels))
        channels = _input_channels(model)
        if channels is not None and channels % self.stage.levels:
            raise ValueError(self._hint(channels, None))

    def _hint(self, channels: int, image_channels: int | None) -> str:
        levels = self.stage.levels
        got = (
            f"the code of {image_channels}-channel images has {image_channels * levels}"
            if image_channels is not None
            else f"that is not a multiple of levels={levels}"
        )
        example = (image_channels or 1) * levels
        return (
            f"thermometer: the model's first convolution takes {channels} input channels "
            f"but {got}; the model must be built with in_channels = C * levels (image "
            f"channels times {levels} levels), e.g. "
            f"robustlab.models.create('smallcnn', in_channels={example})"
        )

    def forward(self, x: Tensor) -> Tensor:
        code = self.stage(x)
        try:
            return self.base(code)
        except (RuntimeError, ValueError) as err:
            channels = _input_channels(self.base)
            if channels is None or channels == code.shape[1]:
                raise
            raise ValueError(self._hint(channels, x.shape[1])) from err
