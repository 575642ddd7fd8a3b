"""A model's mode and gradient flags, changed for a block and restored in ``finally``.

Attacks, objectives, certification, the evaluation and the audit all run a model in eval mode
without changing what the caller sees afterwards; the denoiser's training runs a frozen
classifier. Both context managers give the previous state back even on exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "frozen"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and give it its previous mode back, even on exceptions."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with ``requires_grad=False`` on every parameter; the previous
    mode and flags come back on exit, even on exceptions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
