"""Building blocks shared by every architecture: input normalisation and activations,
k-winners-take-all among them (its defense wrapper is ``robustlab.defenses.kwta``), and
:class:`Normalized`, which puts the normalisation in front of a model from elsewhere."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.registry import Registry

__all__ = ["ACTIVATIONS", "KWTA", "RATIO", "Normalize", "Normalized", "Stat", "make_activation"]

RATIO = 0.1  # Xiao et al.'s ResNet-18; also the ratio of the registered activation "kwta"


class KWTA(nn.Module):
    """k-WTA over each sample's whole volume: (N, D1, ...) -> same shape, dtype and device,
    with all but the k = max(1, floor(ratio * D1 * ...)) largest values of each sample zeroed.

    Args:
        ratio: the fraction of values kept, in (0, 1] (default 0.1, Xiao et al.'s ResNet-18).
    """

    def __init__(self, ratio: float = RATIO) -> None:
        super().__init__()
        self.ratio = number(ratio, "k-WTA ratio", low=0, high=1, low_open=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"k-WTA expects a batch (N, C, H, W) or (N, F), got shape {tuple(x.shape)}"
            )
        flat = x.flatten(1)
        k = max(1, math.floor(self.ratio * flat.shape[1]))
        threshold = flat.detach().topk(k, dim=1).values[:, -1:]  # the k-th largest, (N, 1)
        keep = (flat.detach() >= threshold).view_as(x)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation", name_classes=False)
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("softplus")(nn.Softplus)  # beta = 1: log(1 + e^x)
ACTIVATIONS.register("silu")(nn.SiLU)
ACTIVATIONS.register("gelu")(nn.GELU)  # exact (erf) form


ACTIVATIONS.register("kwta")(KWTA)  # ratio 0.1, Xiao et al. 2020


Stat = float | Sequence[float] | torch.Tensor | None


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` in {gelu, kwta, relu, silu, softplus} (kwta:
    k-winners-take-all with ratio 0.1, :class:`KWTA`).

    Never in-place, so input gradients through residual branches stay exact.
    Unknown names raise ``ValueError`` listing the valid ones.
    """
    return ACTIVATIONS.get(name)()


def _as_vector(value: Stat, default: float, what: str) -> torch.Tensor:
    if value is None:
        value = default
    vec = torch.as_tensor(value, dtype=torch.float32, device="cpu").detach().flatten()
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()):
        raise ValueError(f"Normalize {what} must be finite numbers, got {value!r}")
    return vec


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first layer of every robustlab model.

    Args:
        mean: per-channel mean in input units ([0, 1] pixels), a scalar, a sequence or
            None (0, i.e. no shift).
        std: per-channel standard deviation in input units, all > 0, or None (1).
        channels: number of channels C the layer expects; scalars are broadcast to C.

    Shapes: input (..., C, H, W), output the same. ``mean`` and ``std`` are buffers of shape
    (C, 1, 1), saved with the weights. With ``mean=None, std=None`` the layer is the identity.
    Attacks therefore work in [0, 1] pixel units and never normalise themselves.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Stat = None, std: Stat = None, channels: int | None = None) -> None:
        super().__init__()
        m, s = _as_vector(mean, 0.0, "mean"), _as_vector(std, 1.0, "std")
        n = max(m.numel(), s.numel(), channels or 1)
        for vec, what in ((m, "mean"), (s, "std")):
            if vec.numel() not in (1, n) or (channels is not None and n != channels):
                raise ValueError(
                    f"Normalize {what} has {vec.numel()} values but the input has "
                    f"{channels or n} channels; give one value per channel or a scalar"
                )
        if bool((s <= 0).any()):
            raise ValueError(f"Normalize std must be > 0, got {s.tolist()}")
        self.register_buffer("mean", m.expand(n).clone().view(n, 1, 1))
        self.register_buffer("std", s.expand(n).clone().view(n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[0]
        if x.dim() < 3 or (channels > 1 and x.shape[-3] != channels):
            raise ValueError(
                f"Normalize expects inputs shaped (N, {channels}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model that expects normalised inputs, made to take
    [0, 1] pixels as every robustlab model does, so attacks keep working in pixel units.

    Args:
        model: the wrapped classifier, kept as the submodule ``model``.
        mean, std: per-channel statistics in [0, 1] pixel units, as :class:`Normalize` takes
            them (a scalar applies to every channel); kept as the submodule ``normalize``.
    """

    def __init__(self, model: nn.Module, mean: Stat, std: Stat) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))
