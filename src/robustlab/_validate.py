"""Checks of user input shared by attacks, evaluation and training: clear errors, never asserts."""

from __future__ import annotations

import torch
from torch import Tensor

from robustlab.threat import ThreatModel


def check_inputs(x: object, y: object, threat: ThreatModel | None = None) -> None:
    """Validate a batch: ``x`` float (N, ...) finite and inside ``threat.bounds``, ``y`` int (N,)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of int64 labels (N,), got {type(y).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point tensor with values in the threat bounds, got {x.dtype}; "
            "convert images with x.float() / 255"
        )
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0): pass at least one example")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape (N,) = ({x.shape[0]},) to match x, got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels (int64), got {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min label {int(y.min())}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if threat is not None:
        lo, hi = threat.bounds
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo - 1e-6 or xmax > hi + 1e-6:
            raise ValueError(
                f"x has values in [{xmin:.4g}, {xmax:.4g}], outside the threat bounds [{lo}, {hi}]; "
                "pass unnormalised inputs (normalisation is the model's first layer) or set "
                "ThreatModel(..., bounds=...)"
            )


def check_labels(y: Tensor, num_classes: int, name: str = "labels") -> None:
    """Labels must index the model's logits."""
    if y.numel() and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name} out of range: max {name[:-1]} {int(y.max())} but the model has "
            f"{num_classes} classes (valid: 0..{num_classes - 1})"
        )


def check_logits(out: object, n: int) -> Tensor:
    """The model must return a (N, num_classes) float tensor of logits."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (N, num_classes), got {shape}")
    return out
