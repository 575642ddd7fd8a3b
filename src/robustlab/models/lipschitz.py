"""Lipschitz control as a model option: spectral normalisation of every convolution and linear
layer (``robustlab.models.create(..., lipschitz="spectral")``).

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

Not offered: Parseval networks (Cisse, Bojanowski, Grave, Dauphin, Usunier, ICML 2017,
arXiv:1704.08847), whose retraction ``W <- (1 + beta) W - beta W W^T W`` runs after every
optimiser step, a point the trainer has no hook for, and whose convex residual combinations
change the architectures themselves. Cost of SN: two matrix-vector products per layer and
training forward.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from robustlab._validate import one_of

__all__ = ["LIPSCHITZ", "apply", "normalised_layers"]

LIPSCHITZ = ("spectral",)


def apply(model: nn.Module, kind: str) -> None:
    """Normalise every ``nn.Conv2d`` and ``nn.Linear`` weight of ``model`` in place (``kind``
    ``"spectral"``: spectral normalisation, one power iteration per training forward).

    Raises:
        ValueError: an unknown kind (the valid ones are listed), or a model with no such layer.
    """
    one_of(kind, "lipschitz", LIPSCHITZ)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to "
                         "normalise; lipschitz= needs one")
    for m in layers:
        spectral_norm(m, name="weight", n_power_iterations=1, eps=1e-12)


def normalised_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose weight is spectrally normalised."""
    return [m for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and nn.utils.parametrize.is_parametrized(
                m, "weight")]
