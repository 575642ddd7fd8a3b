"""Input-transformation defenses: ``model(t(x))`` for a transformation ``t`` of the image.

Every defense here is a :class:`Preprocessed` module (the base model behind a
:class:`Transform` stage), registered by name in :mod:`robustlab.defenses.registry`. A stage
declares what an evaluation must know about it (:class:`robustlab._modes.Declares`), and the
evaluation reads these declarations:

- ``differentiable = False``: autograd through the stage gives no usable gradient (it leaves
  autograd, or its gradient is zero almost everywhere); the stage then supports BPDA
  (:mod:`robustlab.attacks.bpda`): with ``robustlab_bpda`` True its forward value is unchanged
  and its backward pass is that of :meth:`Transform.approximation` (the identity by default);
- ``randomized = True``: two calls on the same input may differ (attack it with EOT, judge it
  by repeated predictions).

Stages map (N, C, H, W) images in [0, 1] to images in [0, 1] of the same shape unless their
docstring says otherwise, and never modify their input.

Registered here (stage -> defense, name):

- :class:`JPEGCompression` -> :class:`JPEG`, ``"jpeg"`` (Guo et al., ICLR 2018);
- :class:`BitDepthReduction` -> :class:`BitDepth`, ``"bit-depth"`` (Xu et al., NDSS 2018);
- :class:`MedianSmoothing` -> :class:`Median`, ``"median"`` (Xu et al., NDSS 2018).

The feature-squeezing detector built from the last two is in :mod:`robustlab.defenses.squeeze`;
the random stages in :mod:`~robustlab.defenses.tv_min`, :mod:`~robustlab.defenses.crop_rescale`
and :mod:`~robustlab.defenses.resize_pad`; the thermometer code in
:mod:`~robustlab.defenses.thermometer`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustlab._modes import Declares
from robustlab._validate import integer
from robustlab.attacks.bpda import straight_through
from robustlab.defenses.base import Defense
from robustlab.defenses.registry import register

__all__ = [
    "JPEG",
    "BitDepth",
    "BitDepthReduction",
    "JPEGCompression",
    "Median",
    "MedianSmoothing",
    "Preprocessed",
    "Transform",
    "stage_images",
]


class Transform(Declares, nn.Module):
    """One input-transformation stage. Subclasses implement :meth:`transform` (the exact
    defense; it may leave autograd), :meth:`config` (their options) and, if the identity is a
    poor stand-in for its backward pass, :meth:`approximation`; they declare ``randomized``
    and ``differentiable`` at class level. Random stages draw from ``self.generator`` when it
    is set, else from torch's global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.robustlab_bpda = False
        self.generator: torch.Generator | None = None

    def config(self) -> dict[str, Any]:
        """The stage's options (JSON-able)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def transform(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def approximation(self, x: Tensor) -> Tensor:
        """The differentiable stand-in used by BPDA (default: the identity)."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.robustlab_bpda and not self.differentiable:
            with torch.no_grad():
                out = self.transform(x.detach())
            return straight_through(out, self.approximation(x))
        return self.transform(x)


class Preprocessed(Defense):
    """The defended classifier ``base(stage(x))``; ``base`` is the undefended model (the
    audit's transfer surrogate). The declarations are the stage's, not this wrapper's."""

    def __init__(self, model: nn.Module, stage: Transform) -> None:
        super().__init__(model)
        self.stage = stage

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.stage.config()}

    def forward(self, x: Tensor) -> Tensor:
        return self.base(self.stage(x))


def stage_images(x: Any, stage: str) -> Tensor:
    """``x`` if it is a float batch (N, C, H, W); ``ValueError`` naming ``stage`` otherwise."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{stage} takes float images (N, C, H, W) in [0, 1], got {what}")
    return x


# --- JPEG compression (Guo et al. 2018) --------------------------------------------------------
class JPEGCompression(Transform):
    """JPEG re-encoding: ``x^ = decode(encode_JPEG(round(255 x), quality)) / 255``, per image.

    Each image is rounded to 8 bits (values clamped to [0, 1] first) and compressed and
    decompressed in memory with Pillow at ``quality`` (1..100; default 75, the setting of Guo
    et al.'s ``adversarial/lib/defenses.py`` and of Athalye et al.'s reimplementation), with
    Pillow's other defaults (4:2:0 chroma subsampling for colour, standard tables). One channel
    is coded as a greyscale ("L") image, three as "RGB"; other channel counts raise a
    ValueError. The result comes back on ``x``'s device and dtype. The reference codes truncate
    (``uint8(255 x)``) instead of rounding; rounding keeps an 8-bit image's own values.

    The codec runs in Pillow on the CPU and leaves autograd (``differentiable =
    False``): attack it with BPDA (identity backward, as Athalye et al. do).

    Shapes: (N, C, H, W) with C in {1, 3} -> the same. Cost: one encode and decode per image
    (about 0.1 ms for a 16 x 16 grey image).
    """

    differentiable = False

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        self.quality = integer(quality, "JPEG quality", minimum=1, maximum=100)

    def config(self) -> dict[str, Any]:
        return {"quality": self.quality}

    def transform(self, x: Tensor) -> Tensor:
        stage_images(x, "JPEG compression")
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(
                f"JPEG compression codes 1-channel (greyscale) or 3-channel (RGB) "
                f"images, got {channels} channels (shape {tuple(x.shape)})"
            )
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the JPEG defense needs Pillow: pip install 'Pillow>=9'") from e
        pixels = (x.detach().clamp(0, 1) * 255).round().to("cpu", torch.uint8)
        images = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
        if channels == 1:
            images = images[..., 0]
        decoded = np.empty_like(images)
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
            buffer.seek(0)
            with Image.open(buffer) as jpeg:
                decoded[i] = np.asarray(jpeg)
        out = torch.from_numpy(decoded.reshape(len(x), *x.shape[2:], channels))
        return out.permute(0, 3, 1, 2).to(x.device, x.dtype).div(255).contiguous()


@register("jpeg")
class JPEG(Preprocessed):
    """``model(JPEGCompression(quality)(x))`` (Guo, Rana, Cisse, van der Maaten, "Countering
    Adversarial Images using Input Transformations", ICLR 2018, arXiv:1711.00117).

    Args:
        model: the classifier, inputs in [0, 1] pixel units.
        quality: JPEG quality, an integer in [1, 100]. Default 75 (Guo et al.'s code).

    Example:
        >>> defended = robustlab.defenses.create("jpeg", model, quality=75)
    """

    def __init__(self, model: nn.Module, quality: int = 75) -> None:
        super().__init__(model, JPEGCompression(quality))


# --- bit-depth reduction (Xu et al. 2018) ------------------------------------------------------
class BitDepthReduction(Transform):
    """Colour-depth reduction to ``bits`` bits per channel, the feature-squeezing convention:
    ``x^ = round(x (2^b - 1)) / (2^b - 1)``, ``2^b`` levels spanning exactly [0, 1] (values
    clamped to [0, 1] first; ties round to even, as ``np.rint`` in EvadeML-Zoo's
    ``utils/squeeze.py``).

    ``bits`` is an integer in [1, 8]; default 5, Xu et al.'s squeezer for CIFAR-10 and ImageNet.
    Use 1 for MNIST-like data (Xu et al.'s MNIST squeezer: a threshold at 0.5, which wipes out
    natural images). Athalye et al.'s reimplementation of Guo et al. truncates 8-bit values
    instead (``(floor(255 x) >> (8 - b)) << (8 - b)``, default 3 bits); that is not this rule.

    Its gradient is zero almost everywhere (``differentiable = False``): attack it
    with BPDA (identity backward).
    """

    differentiable = False

    def __init__(self, bits: int = 5) -> None:
        super().__init__()
        self.bits = integer(bits, "bits", minimum=1, maximum=8)

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def transform(self, x: Tensor) -> Tensor:
        stage_images(x, "bit-depth reduction")
        levels = 2**self.bits - 1
        return torch.round(x.clamp(0, 1) * levels) / levels


@register("bit-depth")
class BitDepth(Preprocessed):
    """``model(BitDepthReduction(bits)(x))`` (Xu, Evans, Qi, "Feature Squeezing: Detecting
    Adversarial Examples in Deep Neural Networks", NDSS 2018, arXiv:1704.01155).

    Args:
        model: the classifier, inputs in [0, 1] pixel units.
        bits: bits per channel, an integer in [1, 8]. Default 5 (Xu et al., CIFAR-10 and
            ImageNet); 1 for MNIST.

    Example:
        >>> defended = robustlab.defenses.create("bit-depth", model, bits=1)
    """

    def __init__(self, model: nn.Module, bits: int = 5) -> None:
        super().__init__(model, BitDepthReduction(bits))


# --- median smoothing (Xu et al. 2018) ---------------------------------------------------------
def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of ``arange(-before, n + after)`` folded into ``[0, n)`` by half-sample
    symmetric reflection (``d c b a | a b c d | d c b a``, scipy.ndimage's ``"reflect"``;
    periodic with period ``2 n``, so any padding width works)."""
    i = torch.arange(-before, n + after, device=device).remainder(2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


class MedianSmoothing(Transform):
    """Per-channel sliding-window median over ``window x window`` pixels.

    Equals ``scipy.ndimage.median_filter(x, size=(1, 1, k, k), mode="reflect")`` on (N, C, H, W)
    arrays (EvadeML-Zoo's squeezer, NHWC there): the window of output pixel ``(i, j)`` covers
    rows ``i - k // 2 .. i - k // 2 + k - 1`` (likewise columns; for even ``k`` the window
    reaches one pixel further up/left than down/right), borders are extended by half-sample
    symmetric reflection (``d c b a | a b c d | d c b a``; torch's ``F.pad(mode="reflect")`` is
    the whole-sample one, scipy's ``"mirror"``), and the median is the element of rank
    ``k^2 // 2`` (0-based) of the sorted window: for even ``k^2`` the upper of the two middle
    values (``torch.median`` would take the lower).

    ``window`` is an integer >= 1; default 2, Xu et al.'s squeezer for MNIST, CIFAR-10 and
    ImageNet (3 was also tested). The median is piecewise linear in ``x``; autograd passes each
    output's gradient to the pixel it selected (sparse but valid gradients), so the stage is
    declared differentiable.

    Cost: ``k^2`` copies of the image in memory and a selection per pixel.
    """

    def __init__(self, window: int = 2) -> None:
        super().__init__()
        self.window = integer(window, "median window", minimum=1)

    def config(self) -> dict[str, Any]:
        return {"window": self.window}

    def transform(self, x: Tensor) -> Tensor:
        stage_images(x, "median smoothing")
        k = self.window
        before, after = k // 2, k - 1 - k // 2
        rows = _reflect_index(x.shape[2], before, after, x.device)
        cols = _reflect_index(x.shape[3], before, after, x.device)
        padded = x.index_select(2, rows).index_select(3, cols)
        windows = padded.unfold(2, k, 1).unfold(3, k, 1).flatten(-2)  # (N, C, H, W, k^2)
        return windows.kthvalue(k * k // 2 + 1, dim=-1).values


@register("median")
class Median(Preprocessed):
    """``model(MedianSmoothing(window)(x))`` (Xu, Evans, Qi, NDSS 2018).

    Args:
        model: the classifier, inputs in [0, 1] pixel units.
        window: side of the square window, an integer >= 1. Default 2 (Xu et al.).

    Example:
        >>> defended = robustlab.defenses.create("median", model, window=3)
    """

    def __init__(self, model: nn.Module, window: int = 2) -> None:
        super().__init__(model, MedianSmoothing(window))
