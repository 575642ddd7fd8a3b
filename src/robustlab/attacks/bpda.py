"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini, Wagner, ICML 2018).

A stage ``g`` whose gradient is missing or useless (JPEG, quantisation, a forward that leaves
autograd) keeps its exact forward pass and borrows the backward pass of a differentiable
approximation ``g~`` (the identity where ``g(x) ~ x``): ``g~(x) + (g(x) - g~(x)).detach()``,
so the value is ``g(x)`` and the gradient ``J_g~(x)^T dL/dz`` at ``z = g(x)``.

Two ways in:

- :class:`BPDA` wraps any callable (even one that runs in NumPy or Pillow) as such a stage;
- a module that declares itself not differentiable (:func:`robustlab._modes.declared`;
  every non-differentiable defense stage in :mod:`robustlab.defenses`) switches to this form
  while its ``robustlab_bpda`` attribute is True; :func:`bpda` sets it on every such module of
  a model for the length of a ``with`` block, and attacks created with ``bpda=True`` do so
  around their own run. The forward value never changes, so predictions stay those of the
  real defense.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from robustlab._modes import attach, declared

__all__ = ["BPDA", "bpda", "nondifferentiable_stages", "straight_through"]


def straight_through(exact: Tensor, approx: Tensor) -> Tensor:
    """The value of ``exact`` with the gradient of ``approx`` (same shape)."""
    if exact.shape != approx.shape:
        raise ValueError(
            f"BPDA: the stage's output {tuple(exact.shape)} and its approximation's "
            f"{tuple(approx.shape)} differ in shape; pass an approximation that "
            "returns the stage's shape (the identity only fits shape-preserving "
            "stages)"
        )
    return approx + (exact.detach().to(approx.dtype) - approx).detach()


class BPDA(nn.Module):
    """``stage`` in the forward pass, ``approximation`` (default: the identity) in the backward.

    ``stage`` runs under ``torch.no_grad`` and may be anything that maps a tensor to a tensor of
    the approximation's shape (NumPy or Pillow code included).

    Example:
        >>> quantise = BPDA(lambda x: (x * 7).round() / 7)     # gradients of the identity
    """

    robustlab_differentiable = True  # its backward is the approximation's: always usable

    def __init__(
        self,
        stage: Callable[[Tensor], Tensor],
        approximation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(stage):
            raise TypeError(f"stage must be callable, got {type(stage).__name__}")
        if approximation is not None and not callable(approximation):
            raise TypeError(
                f"approximation must be callable or None, got {type(approximation).__name__}"
            )
        self.stage = stage
        self.approximation = approximation

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.stage(x.detach())
        approx = x if self.approximation is None else self.approximation(x)
        return straight_through(out, approx)


def nondifferentiable_stages(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that declare themselves not differentiable
    (``""`` is ``model`` itself)."""
    return [name for name, m in model.named_modules() if not declared(m, "differentiable")]


@contextmanager
def bpda(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block every non-differentiable stage of ``model`` uses its BPDA backward
    pass; each gets its previous setting back afterwards, even on exceptions."""
    stages = [m for m in model.modules() if not declared(m, "differentiable")]
    before = [getattr(m, "robustlab_bpda", False) for m in stages]
    if enabled:
        for m in stages:
            attach(m, "robustlab_bpda", True)
    try:
        yield model
    finally:
        for m, b in zip(stages, before, strict=True):
            attach(m, "robustlab_bpda", b)
