"""Noise injection into the weights or activations of a model: Parametric Noise Injection
(PNI, white noise with a learnable scale) and Colored Noise Injection (CNI, learnable
correlated noise).

PNI: He, Rakin, Fan, "Parametric Noise Injection: Trainable Randomness to Improve Deep Neural
Network Robustness against Adversarial Attack", CVPR 2019, https://arxiv.org/abs/1811.09310;
reference code github.com/elliothe/CVPR_2019_PNI.

CNI: Zheltonozhskii et al., "Colored Noise Injection for Training Adversarially Robust Neural
Networks", arXiv 2020, https://arxiv.org/abs/2003.02188; reference implementation
``layers.py::NoisedConv2DColored`` of github.com/yanemcovsky/SIAM (Nemcovsky et al.).

Three kinds, applied to every ``nn.Conv2d`` and ``nn.Linear`` of a model by :func:`inject`
(``robustlab.models.create(..., noise="pni-w")`` calls it):

- ``pni-w``: the layer uses ``W + alpha * eta`` with ``eta ~ N(0, std(W)^2)``, std(W) the
  standard deviation of all the layer's weights, computed without gradient. One draw per
  forward, shared by the whole batch.
- ``pni-a``: the layer's output ``a`` becomes ``a + alpha * eta`` with ``eta ~ N(0, std(a)^2)``,
  std(a) over the whole output tensor (batch included), without gradient; every element gets
  its own draw (as in the SIAM re-implementation; the PNI repository ships no source for it).
- ``cni-w``: for a weight W with N = numel(W) entries the layer uses ``W + eps_W``,

      eps_W = sqrt(|s * a|) * n_d + V n_f,   n_d ~ N(0, I_N),  n_f ~ N(0, I_r),

  so ``Cov(eps_W) = diag(s * a) + V V^T`` (diagonal plus rank r). ``s = std(W)`` (a scalar,
  without gradient), ``a`` (``<layer>.noise_diag``, shaped like W, initialised to
  ``init**2 = 0.0625``) and ``V`` (``<layer>.noise_factor``, (N, r), every entry initialised to
  ``factor_init = 0.01``) are learnable; rank ``r = 5``. One draw per forward, shared by the
  batch. As in the reference, the model's **last** ``nn.Linear`` (in module order: the
  classifier) gets white element-wise PNI-W (``alpha``, initialised to ``init = 0.25``)
  instead. Cost: as PNI plus the (N x r) matrix-vector product per layer and forward, and
  N * (r + 1) extra parameters per layer (V dominates the memory of wide layers).
  Differences from the reference: std(W) carries no gradient (the reference differentiates
  through it; we keep PNI's convention, so the noise parameters alone set the noise level),
  and ``|s * a|`` is floored at the dtype's smallest normal number before the square root, so
  an entry of ``a`` that reaches 0 gets a zero instead of an infinite gradient. The reference's
  colored *activation* noise (over C x H x W, which needs the activation shape when the layer
  is built) is not offered.

PNI's ``alpha`` is learnable, initialised to 0.25, one per layer (``granularity="layer"``, the
paper's default), per output channel (``"channel"``) or per weight (``"element"``, PNI-W only).
Every noise parameter (``alpha``, ``noise_diag``, ``noise_factor``) carries
``robustlab_no_decay = True`` so the trainer's optimiser excludes it from weight decay, as PNI
does (the flag lives on the Parameter object: ``copy.deepcopy`` of a model drops it in current
PyTorch, so build optimisers on the model itself).

The noise is on in train **and** eval mode, so the model's output is random: evaluate it with
EOT and repeated predictions. Noise draws use torch's global RNG (a forward takes no
generator): seed it with ``torch.manual_seed`` for reproducible outputs. :func:`disabled`
switches the noise off for analysis; each noisy layer's ``noise_enabled`` attribute does the
same for one layer.

Learnable input noise (the "I" of CNI-I+W, Nemcovsky et al. 2019, arXiv:1911.07198; SIAM's
``noise_sd`` with ``learn_noise``): ``kind="input"`` (or ``input_sigma=...`` with any other
kind) adds a :class:`InputNoise` module ``model.input_noise`` whose parameter ``sigma``
(pixels, initialised to ``init`` or ``input_sigma``) scales Gaussian noise added to the
model's input before its first layer, ``x + |sigma| n``, ``n ~ N(0, I)`` per element, through
a forward pre-hook on the model; it is a noise parameter like ``alpha`` (no weight decay,
listed by :func:`noise_parameter_names`, switched off by :func:`disabled`). Train it with
``noise-at`` and ``sigma="model"`` (the objective then adds no noise of its own). Like PNI's
alpha it is learned by the same minimisation, which favours less noise: it stays useful only
where the adversarial term pays for it.

The noisy layers are subclasses of the plain ones (:class:`NoisyConv2d`, :class:`NoisyLinear`),
converted in place, so the state-dict keys of the weights are unchanged; each layer adds its
noise parameters (:func:`noise_parameter_names` lists their keys).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import attach, attached
from robustlab._validate import number, positive_int

__all__ = [
    "CNI_FACTOR_INIT",
    "CNI_RANK",
    "GRANULARITIES",
    "KINDS",
    "InputNoise",
    "NoisyConv2d",
    "NoisyLinear",
    "disabled",
    "inject",
    "noise_parameter_names",
    "noisy_layers",
]

KINDS = ("pni-w", "pni-a", "cni-w", "input")
GRANULARITIES = ("layer", "channel", "element")
CNI_RANK = 5  # rank r of the low-rank part of CNI's covariance (reference default)
CNI_FACTOR_INIT = 0.01  # initial value of every entry of CNI's factor V (reference default)


class _Noisy:
    """What :class:`NoisyConv2d` and :class:`NoisyLinear` add to their plain base class."""

    weight: Tensor
    alpha: nn.Parameter
    noise_diag: nn.Parameter
    noise_factor: nn.Parameter
    kind: str
    granularity: str
    rank: int
    noise_enabled: bool
    #: attribute names of the layer's noise parameters (its extra state-dict entries)
    noise_params: tuple[str, ...] = ("alpha",)

    def _new_parameter(self, shape: tuple[int, ...], value: float) -> nn.Parameter:
        w = self.weight
        p = nn.Parameter(torch.full(shape, float(value), dtype=w.dtype, device=w.device))
        p.robustlab_no_decay = True  # type: ignore[attr-defined]
        return p

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
        self.noise_params = ("alpha",)
        self.alpha = self._new_parameter(shape, init)

    def _add_colored(self, rank: int, init: float, factor_init: float) -> None:
        w = self.weight
        self.kind, self.granularity, self.rank, self.noise_enabled = "cni-w", "element", rank, True
        self.noise_params = ("noise_diag", "noise_factor")
        self.noise_diag = self._new_parameter(tuple(w.shape), init**2)
        self.noise_factor = self._new_parameter((w.numel(), rank), factor_init)

    def _noisy_weight(self) -> Tensor:
        w = self.weight
        if self.kind == "pni-a" or not self.noise_enabled:
            return w
        with torch.no_grad():
            sigma = w.std()
        if self.kind == "pni-w":
            return w + self.alpha * sigma * torch.randn_like(w)
        variance = (sigma * self.noise_diag).abs().clamp_min(torch.finfo(w.dtype).tiny)
        n_f = torch.randn(self.rank, dtype=w.dtype, device=w.device)
        colored = (self.noise_factor @ n_f).view_as(w)
        return w + variance.sqrt() * torch.randn_like(w) + colored

    def _noisy_output(self, a: Tensor) -> Tensor:
        if self.kind != "pni-a" or not self.noise_enabled:
            return a
        with torch.no_grad():
            sigma = a.std()
        return a + self.alpha * sigma * torch.randn_like(a)

    def extra_repr(self) -> str:
        what = f"rank={self.rank}" if self.kind == "cni-w" else f"granularity={self.granularity}"
        return super().extra_repr() + f", noise={self.kind}, {what}"  # type: ignore[misc]


class NoisyConv2d(_Noisy, nn.Conv2d):
    """``nn.Conv2d`` with PNI noise on its weight (``pni-w``) or output (``pni-a``), or CNI
    noise on its weight (``cni-w``); made from a plain layer by :func:`inject`."""

    def forward(self, x: Tensor) -> Tensor:
        return self._noisy_output(self._conv_forward(x, self._noisy_weight(), self.bias))


class NoisyLinear(_Noisy, nn.Linear):
    """``nn.Linear`` with PNI noise on its weight (``pni-w``) or output (``pni-a``), or CNI
    noise on its weight (``cni-w``); made from a plain layer by :func:`inject`."""

    def forward(self, x: Tensor) -> Tensor:
        return self._noisy_output(F.linear(x, self._noisy_weight(), self.bias))


class InputNoise(nn.Module):
    """``x -> x + |sigma| n``, ``n ~ N(0, I)`` from torch's global RNG, with a learnable scalar
    ``sigma`` in input units (pixels); the identity while ``noise_enabled`` is False."""

    kind = "input"
    noise_params = ("sigma",)

    def __init__(self, init: float) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor([float(init)]))
        self.sigma.robustlab_no_decay = True  # type: ignore[attr-defined]
        self.noise_enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.noise_enabled:
            return x
        return x + self.sigma.abs().to(x.dtype) * torch.randn_like(x)


def _noisy_input(model: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a model with an ``input_noise`` module: noise on its first input."""
    return (attached(model, "input_noise")(args[0]), *args[1:])


def add_input_noise(model: nn.Module, init: float) -> None:
    """Give ``model`` learnable input noise of initial scale ``init`` (>= 0, pixels), in place:
    ``model.input_noise`` (:class:`InputNoise`; state-dict key ``input_noise.sigma``) and a
    forward pre-hook applying it to the model's input."""
    _check_scale(init, "input noise sigma")
    if hasattr(model, "input_noise"):
        raise ValueError(f"{type(model).__name__} already has an input_noise attribute")
    model.input_noise = InputNoise(init).to(next(model.parameters()).device)
    model.register_forward_pre_hook(_noisy_input)


_NOISY: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: NoisyConv2d, nn.Linear: NoisyLinear}


def _check_scale(value: Any, what: str) -> None:
    number(value, what, low=0)


def inject(
    model: nn.Module,
    kind: str = "pni-w",
    granularity: str | None = None,
    init: float = 0.25,
    rank: int | None = None,
    factor_init: float | None = None,
    input_sigma: float | None = None,
) -> dict[str, Any]:
    """Turn every plain ``nn.Conv2d`` and ``nn.Linear`` of ``model`` into its noisy subclass,
    in place (weights, biases and hooks are kept; each layer gets its noise parameters).

    Args:
        kind: ``"pni-w"`` (weight noise), ``"pni-a"`` (output-activation noise), ``"cni-w"``
            (colored weight noise; the last ``nn.Linear`` gets element-wise ``pni-w``) or
            ``"input"`` (learnable input noise only, initial sigma ``init``; no layer changes).
        granularity: PNI only: one ``alpha`` per ``"layer"`` (default), per output
            ``"channel"`` or per weight ``"element"`` (PNI-W only).
        init: PNI: initial value of every ``alpha`` (>= 0; the paper uses 0.25). CNI: the
            diagonal scales ``a`` start at ``init**2`` (0.0625) and the last layer's PNI
            ``alpha`` at ``init``.
        rank: CNI only: rank r >= 1 of the low-rank part of the covariance. Default 5.
        factor_init: CNI only: initial value (>= 0) of every entry of the factor V. Default 0.01.
        input_sigma: PNI/CNI: also add learnable input noise of this initial scale (>= 0,
            pixels; :class:`InputNoise`). Default None (none).

    Returns:
        The options with defaults filled in (JSON-able), as recorded by ``models.create``:
        ``{"granularity", "init"}`` for PNI, ``{"rank", "init", "factor_init"}`` for CNI,
        ``{"init"}`` for ``"input"``; plus ``"input_sigma"`` when given.

    Raises:
        ValueError: unknown kind or granularity, a negative ``init`` or ``factor_init``, a rank
            below 1, an option of the other family (``granularity`` for CNI, ``rank`` or
            ``factor_init`` for PNI), element-wise PNI-A (its shape would depend on the input
            size), or a model with no such layers.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(KINDS)}")
    _check_scale(init, f"{kind} init")
    if kind == "input":
        if (
            granularity is not None
            or rank is not None
            or factor_init is not None
            or input_sigma is not None
        ):
            raise ValueError("noise 'input' takes only init (the initial sigma in pixels)")
        add_input_noise(model, init)
        return {"init": float(init)}
    extra = {}
    if input_sigma is not None:
        _check_scale(input_sigma, "input_sigma")
        extra = {"input_sigma": float(input_sigma)}
    if kind == "cni-w":
        if granularity is not None:
            raise ValueError(
                "cni-w has no granularity (its diagonal scales are per weight); "
                "drop the option, or use pni-w"
            )
        rank = CNI_RANK if rank is None else rank
        rank = positive_int(rank, "cni-w rank")
        factor = CNI_FACTOR_INIT if factor_init is None else factor_init
        _check_scale(factor, "cni-w factor_init")
    else:
        if rank is not None or factor_init is not None:
            raise ValueError(f"rank and factor_init are options of cni-w, not {kind}")
        granularity = "layer" if granularity is None else granularity
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown PNI granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}"
            )
        if kind == "pni-a" and granularity == "element":
            raise ValueError(
                "element-wise pni-a is not supported (alpha's shape would depend "
                "on the input size); use granularity 'layer' or 'channel'"
            )
    layers = [m for m in model.modules() if type(m) in _NOISY]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to "
            f"inject {kind} noise into"
        )
    linears = [m for m in layers if type(m) is nn.Linear]
    last = linears[-1] if kind == "cni-w" and linears else None
    for m in layers:
        m.__class__ = _NOISY[type(m)]
        if m is last:  # the classifier: white element-wise PNI-W, as in the reference
            m._add_alpha("pni-w", "element", init)  # type: ignore[operator]
        elif kind == "cni-w":
            m._add_colored(rank, init, factor)  # type: ignore[operator]
        else:
            m._add_alpha(kind, granularity, init)  # type: ignore[operator]
    if input_sigma is not None:
        add_input_noise(model, input_sigma)
    if kind == "cni-w":
        return {"rank": rank, "init": float(init), "factor_init": float(factor)} | extra
    return {"granularity": granularity, "init": float(init)} | extra


def noisy_layers(model: nn.Module) -> list[nn.Module]:
    """The PNI and CNI layers of ``model`` (empty for a deterministic model)."""
    return [m for m in model.modules() if isinstance(m, _Noisy)]


def noise_parameter_names(model: nn.Module) -> list[str]:
    """State-dict keys of the noise parameters of ``model`` (PNI ``alpha``, CNI
    ``noise_diag`` and ``noise_factor``, the input noise's ``sigma``), in module order; empty
    for a deterministic model."""
    return [
        f"{name}.{p}" if name else p
        for name, m in model.named_modules()
        if isinstance(m, _Noisy | InputNoise)
        for p in m.noise_params
    ]


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its PNI and CNI noise off (e.g. to check an attack on the frozen model);
    every layer's previous ``noise_enabled`` is restored on exit, even on exceptions. Learnable
    input noise (:class:`InputNoise`) is switched off too."""
    layers = noisy_layers(model) + [m for m in model.modules() if isinstance(m, InputNoise)]
    before = [m.noise_enabled for m in layers]
    try:
        for m in layers:
            attach(m, "noise_enabled", False)
        yield model
    finally:
        for m, state in zip(layers, before, strict=True):
            attach(m, "noise_enabled", state)
