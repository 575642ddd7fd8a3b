"""Parametric Noise Injection (He, Rakin, Fan, "Parametric Noise Injection: Trainable Randomness
to Improve Deep Neural Network Robustness against Adversarial Attack", CVPR 2019,
https://arxiv.org/abs/1811.09310; reference code github.com/elliothe/CVPR_2019_PNI).

Two kinds, applied to every ``nn.Conv2d`` and ``nn.Linear`` of a model by :func:`inject`
(``robustlab.models.create(..., noise="pni-w")`` calls it):

- ``pni-w``: the layer uses ``W + alpha * eta`` with ``eta ~ N(0, std(W)^2)``, std(W) the
  standard deviation of all the layer's weights, computed without gradient. One draw per
  forward, shared by the whole batch.
- ``pni-a``: the layer's output ``a`` becomes ``a + alpha * eta`` with ``eta ~ N(0, std(a)^2)``,
  std(a) over the whole output tensor (batch included), without gradient; every element gets
  its own draw (as in the SIAM re-implementation; the PNI repository ships no source for it).

``alpha`` is learnable, initialised to 0.25, one per layer (``granularity="layer"``, the paper's
default), per output channel (``"channel"``) or per weight (``"element"``, PNI-W only). Each
``alpha`` carries ``robustlab_no_decay = True`` so the trainer's optimiser excludes it from
weight decay, as PNI does (the flag lives on the Parameter object: ``copy.deepcopy`` of a
model drops it in current PyTorch, so build optimisers on the model itself).

The noise is on in train **and** eval mode, so the model's output is random: evaluate it with
EOT and repeated predictions. Noise draws use torch's global RNG (a forward takes no
generator): seed it with ``torch.manual_seed`` for reproducible outputs. :func:`disabled`
switches the noise off for analysis; each noisy layer's ``noise_enabled`` attribute does the
same for one layer.

The noisy layers are subclasses of the plain ones (:class:`NoisyConv2d`, :class:`NoisyLinear`),
converted in place, so the state-dict keys of the weights are unchanged; each layer adds one
entry ``<layer>.alpha``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GRANULARITIES", "KINDS", "NoisyConv2d", "NoisyLinear", "disabled", "inject",
           "noisy_layers"]

KINDS = ("pni-w", "pni-a")
GRANULARITIES = ("layer", "channel", "element")


class _Noisy:
    """What :class:`NoisyConv2d` and :class:`NoisyLinear` add to their plain base class."""

    weight: Tensor
    alpha: nn.Parameter
    kind: str
    granularity: str
    noise_enabled: bool

    def _add_alpha(self, kind: str, granularity: str, init: float) -> None:
        w = self.weight
        out = w.shape[0]
        if granularity == "layer":
            shape: tuple[int, ...] = (1,)
        elif granularity == "element":
            shape = tuple(w.shape)
        elif kind == "pni-w":  # per output channel of the weight
            shape = (out,) + (1,) * (w.dim() - 1)
        else:  # per channel of the output activation: (C, 1, 1) for conv, (F,) for linear
            shape = (out,) + (1,) * (w.dim() - 2)
        self.kind, self.granularity, self.noise_enabled = kind, granularity, True
        self.alpha = nn.Parameter(torch.full(shape, float(init), dtype=w.dtype, device=w.device))
        self.alpha.robustlab_no_decay = True  # type: ignore[attr-defined]

    def _noisy_weight(self) -> Tensor:
        w = self.weight
        if self.kind != "pni-w" or not self.noise_enabled:
            return w
        with torch.no_grad():
            sigma = w.std()
        return w + self.alpha * sigma * torch.randn_like(w)

    def _noisy_output(self, a: Tensor) -> Tensor:
        if self.kind != "pni-a" or not self.noise_enabled:
            return a
        with torch.no_grad():
            sigma = a.std()
        return a + self.alpha * sigma * torch.randn_like(a)

    def extra_repr(self) -> str:
        return (super().extra_repr()  # type: ignore[misc]
                + f", noise={self.kind}, granularity={self.granularity}")


class NoisyConv2d(_Noisy, nn.Conv2d):
    """``nn.Conv2d`` with PNI noise on its weight (``pni-w``) or output (``pni-a``); made from
    a plain layer by :func:`inject`."""

    def forward(self, x: Tensor) -> Tensor:
        return self._noisy_output(self._conv_forward(x, self._noisy_weight(), self.bias))


class NoisyLinear(_Noisy, nn.Linear):
    """``nn.Linear`` with PNI noise on its weight (``pni-w``) or output (``pni-a``); made from
    a plain layer by :func:`inject`."""

    def forward(self, x: Tensor) -> Tensor:
        return self._noisy_output(F.linear(x, self._noisy_weight(), self.bias))


_NOISY: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: NoisyConv2d, nn.Linear: NoisyLinear}


def inject(model: nn.Module, kind: str = "pni-w", granularity: str = "layer",
           init: float = 0.25) -> dict[str, Any]:
    """Turn every plain ``nn.Conv2d`` and ``nn.Linear`` of ``model`` into its noisy subclass,
    in place (weights, biases and hooks are kept; each layer gets a learnable ``alpha``).

    Args:
        kind: ``"pni-w"`` (weight noise) or ``"pni-a"`` (output-activation noise).
        granularity: one ``alpha`` per ``"layer"``, per output ``"channel"`` or per weight
            ``"element"`` (PNI-W only).
        init: initial value of every ``alpha`` (>= 0; the paper uses 0.25).

    Returns:
        The options with defaults filled in (JSON-able), as recorded by ``models.create``.

    Raises:
        ValueError: unknown kind or granularity, a negative ``init``, element-wise PNI-A
            (its shape would depend on the input size), or a model with no such layers.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(KINDS)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown PNI granularity {granularity!r}; "
                         f"valid: {', '.join(GRANULARITIES)}")
    if kind == "pni-a" and granularity == "element":
        raise ValueError("element-wise pni-a is not supported (alpha's shape would depend on "
                         "the input size); use granularity 'layer' or 'channel'")
    if (isinstance(init, bool) or not isinstance(init, int | float)
            or not 0 <= init < float("inf")):
        raise ValueError(f"PNI init must be a finite number >= 0, got {init!r}")
    layers = [m for m in model.modules() if type(m) in _NOISY]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to "
                         "inject PNI noise into")
    for m in layers:
        m.__class__ = _NOISY[type(m)]
        m._add_alpha(kind, granularity, init)  # type: ignore[operator]
    return {"granularity": granularity, "init": float(init)}


def noisy_layers(model: nn.Module) -> list[nn.Module]:
    """The PNI layers of ``model`` (empty for a deterministic model)."""
    return [m for m in model.modules() if isinstance(m, _Noisy)]


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its PNI noise off (e.g. to check an attack on the frozen model);
    every layer's previous ``noise_enabled`` is restored on exit, even on exceptions."""
    layers = noisy_layers(model)
    before = [m.noise_enabled for m in layers]
    try:
        for m in layers:
            m.noise_enabled = False
        yield model
    finally:
        for m, state in zip(layers, before, strict=True):
            m.noise_enabled = state
