"""Building blocks shared by every architecture: input normalisation and activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustlab.registry import Registry

__all__ = ["ACTIVATIONS", "Normalize", "Stat", "make_activation"]

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("softplus")(nn.Softplus)  # beta = 1: log(1 + e^x)
ACTIVATIONS.register("silu")(nn.SiLU)
ACTIVATIONS.register("gelu")(nn.GELU)  # exact (erf) form


@ACTIVATIONS.register("kwta")
def _kwta() -> nn.Module:
    """k-WTA keeping 10% of each layer's values (Xiao et al. 2020; robustlab.defenses.kwta)."""
    from robustlab.defenses.kwta import KWTA  # lazily: defense modules may import models

    return KWTA()  # ratio 0.1


Stat = float | Sequence[float] | torch.Tensor | None


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` in {gelu, kwta, relu, silu, softplus} (kwta:
    k-winners-take-all with ratio 0.1, :class:`robustlab.defenses.kwta.KWTA`).

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

