"""The model registry and ``create``, the one way robustlab builds a model."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustlab.models.layers import ACTIVATIONS
from robustlab.registry import Registry

__all__ = ["MODELS", "create", "names"]

MODELS: Registry[type[nn.Module]] = Registry("model")

# Arguments every architecture takes; create() validates them once for all.
COMMON = ("num_classes", "in_channels", "input_size", "activation", "mean", "std")


def names(pattern: str | None = None) -> list[str]:
    """Registered architecture names, sorted; ``pattern`` filters with shell wildcards."""
    return MODELS.names(pattern)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _stat(value: float | Sequence[float] | torch.Tensor | None) -> list[float] | None:
    if value is None:
        return None
    return [float(v) for v in torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    activation: str = "relu",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    **arch_kwargs: Any,
) -> nn.Module:
    """Build the architecture ``name`` (see :func:`names`) with fresh weights.

    Args:
        name: registered architecture, e.g. ``"smallcnn"`` or ``"wrn-34-10"``.
        num_classes: number of logits the model returns.
        in_channels: image channels C (1 for MNIST-like data, 3 for CIFAR-like data).
        input_size: image height = width in pixels (28 and 32 are supported everywhere).
        activation: nonlinearity used everywhere the architecture has one:
            ``relu``, ``softplus``, ``silu`` or ``gelu``.
        mean, std: per-channel statistics in [0, 1] pixel units for the first layer,
            :class:`Normalize`; ``None`` means the identity (mean 0, std 1).
        **arch_kwargs: architecture-specific options (``drop`` for smallcnn, ``depth``,
            ``widen_factor`` and ``drop`` for wrn-34-10).

    Returns:
        An ``nn.Module`` in training mode, on the default device, mapping inputs in [0, 1]
        shaped (N, C, input_size, input_size) to logits (N, num_classes). The build recipe is
        recorded as ``model.robustlab_arch = {"name": ..., "kwargs": {...}}`` (all arguments,
        defaults filled in, JSON-serialisable) so :func:`robustlab.models.save` can store it.

    Raises:
        ValueError: unknown architecture or activation, or an invalid size or statistic.
        TypeError: an argument the architecture does not take, or one that is not
            JSON-serialisable.
    """
    cls = MODELS.get(name)
    ACTIVATIONS.get(activation)  # fail early with the list of valid activations
    params = inspect.signature(cls).parameters
    unknown = sorted(set(arch_kwargs) - set(params))
    if unknown:
        extra = [p for p in params if p not in COMMON]
        raise TypeError(
            f"{name} does not take {unknown}; its own arguments are {extra or 'none'}"
        )
    kwargs: dict[str, Any] = {
        "num_classes": _positive_int(num_classes, "num_classes"),
        "in_channels": _positive_int(in_channels, "in_channels"),
        "input_size": _positive_int(input_size, "input_size"),
        "activation": activation.lower(),
        "mean": _stat(mean),
        "std": _stat(std),
    }
    for key, param in params.items():
        if key in COMMON:
            continue  # validated above or by Normalize
        kwargs[key] = arch_kwargs.get(key, param.default)
        try:
            json.dumps(kwargs[key], allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"argument {key!r} of {name} must be JSON-serialisable") from err
    model = cls(**kwargs)
    model.robustlab_arch = {"name": name.lower(), "kwargs": kwargs}
    return model
