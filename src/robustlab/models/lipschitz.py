"""Lipschitz control as a model option on every convolution and linear layer:
spectral normalisation (``robustlab.models.create(..., lipschitz="spectral")``) or Parseval
networks (``lipschitz="parseval"``).

Spectral normalisation (Miyato, Kataoka, Koyama, Yoshida, "Spectral Normalization for
Generative Adversarial Networks", ICLR 2018, arXiv:1802.05957): each weight W (a convolution
kernel reshaped to (out, in * kh * kw)) is used as ``W / sigma(W)``, sigma the largest singular
value estimated by power iteration with persistent vectors u, v (``v <- W^T u / ||W^T u||``,
``u <- W v / ||W v||``, ``sigma = u^T W v``): one iteration per forward in train mode, none in
eval mode, 15 when the layer is built. PyTorch's
``torch.nn.utils.parametrizations.spectral_norm`` does it; the state-dict keys become
``<layer>.parametrizations.weight.original`` plus the vectors ``..._u`` and ``..._v``, and a
saved model loads back with its normalisation (the option is part of the recorded
architecture).

What it promises: after a forward in train mode, every normalised weight matrix has spectral
norm at most 1 up to the power iteration's error (u^T W v underestimates sigma, so the norm
is >= 1 and falls to 1 as the iteration converges). What it does not: the reshaped kernel's
norm is not the operator norm of the convolution (it can be off by a factor of the order of
the kernel size), BatchNorm after a normalised layer rescales it again (resnets), and the
product of per-layer norms is a loose bound: no certificate follows, and without adversarial
training the robustness gain is small (card H9).

Cost of SN: two matrix-vector products per layer and training forward.

Parseval networks (Cisse, Bojanowski, Grave, Dauphin, Usunier, "Parseval Networks: Improving
Robustness to Adversarial Examples", ICML 2017, arXiv:1704.08847): after every optimiser step
each weight W (reshaped to (out, in * kh * kw) as above) takes one retraction step towards a
Parseval tight frame,

    W <- (1 + beta) W - beta W W^T W,      beta = 3e-4 (card H9; the paper's value unverified),

which maps each singular value s of W to s + beta s (1 - s^2): values above 1 shrink, values in
(0, 1) grow, 1 stays. The trainer runs it: every layer gets a ``robustlab_after_step()`` hook,
and the trainer calls that hook on every module that has one right after each optimiser step
(:mod:`robustlab.training.trainer`); a model trained by other code must call it itself. The
weights and state-dict keys are the plain ones, so a saved model loads back with the option
(and the hooks) from its recorded architecture. What it promises: after each optimiser step,
each singular value s < 1/sqrt(beta) of a reshaped weight moves to s + beta s (1 - s^2), towards
1; the weights stay near-Parseval only as far as that pull outweighs the gradient steps: no
bound on the norm follows.

Differences from the paper: every row of every layer is retracted at every step (the paper
samples a subset of rows to save time; no randomness here, so DDP ranks stay equal); no
rescaling of convolution kernels by their size (the paper's conv scaling is unverified); and
the paper's convexity constraint on aggregation layers (a residual sum x + f(x) replaced by
alpha x + (1 - alpha) f(x), alpha kept in [0, 1]) is not applied: our resnet20,
preact-resnet18 and wrn-34-10 have plain residual sums (smallcnn, lenet and ibp-small have
none), so their blocks stay (1 + Lip f)-Lipschitz. BatchNorm rescales after the layer, as for
SN. Cost of Parseval: one (out x out) Gram matrix and one product, O(out^2 * in * kh * kw), per
layer and optimiser step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from robustlab._modes import attach
from robustlab._validate import one_of

__all__ = [
    "LIPSCHITZ",
    "PARSEVAL_BETA",
    "ParsevalRetraction",
    "apply",
    "normalised_layers",
    "parseval_layers",
    "retract",
]

LIPSCHITZ = ("spectral", "parseval")
#: the retraction's step beta (card H9 of METHODS-2.md; unverified against the paper)
PARSEVAL_BETA = 3e-4


def retract(weight: Tensor, beta: float = PARSEVAL_BETA) -> Tensor:
    """``(1 + beta) W - beta W W^T W`` for ``W = weight.flatten(1)``, shaped like ``weight``."""
    w = weight.flatten(1)
    return ((1 + beta) * w - beta * (w @ w.T) @ w).view_as(weight)


class ParsevalRetraction:
    """A layer's ``robustlab_after_step`` hook: one retraction of its weight, in place."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, beta: float = PARSEVAL_BETA) -> None:
        self.layer, self.beta = layer, beta

    def __call__(self) -> None:
        weight = self.layer.weight
        with torch.no_grad():
            weight.copy_(retract(weight, self.beta))


def apply(model: nn.Module, kind: str) -> None:
    """Put Lipschitz control on every ``nn.Conv2d`` and ``nn.Linear`` weight of ``model`` in
    place: ``"spectral"`` normalises it (one power iteration per training forward),
    ``"parseval"`` gives the layer the ``robustlab_after_step`` hook of
    :class:`ParsevalRetraction` (run by the trainer after every optimiser step; layers whose
    weight is frozen, such as fixed heads, are left alone).

    Raises:
        ValueError: an unknown kind (the valid ones are listed), or a model with no such layer.
    """
    one_of(kind, "lipschitz", LIPSCHITZ)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to "
            "normalise; lipschitz= needs one"
        )
    for m in layers:
        if kind == "spectral":
            spectral_norm(m, name="weight", n_power_iterations=1, eps=1e-12)
        elif m.weight.requires_grad:
            attach(m, "robustlab_after_step", ParsevalRetraction(m))


def normalised_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose weight is spectrally normalised."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
        and nn.utils.parametrize.is_parametrized(m, "weight")
    ]


def parseval_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that carry Parseval's retraction hook."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "robustlab_after_step", None), ParsevalRetraction)
    ]
