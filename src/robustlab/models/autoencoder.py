"""MagNet's small convolutional autoencoder (``"magnet-ae"`` in the model registry: saved and
loaded by :func:`robustlab.models.save` / :func:`robustlab.models.load`).

Meng, Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017,
https://arxiv.org/abs/1705.09064; reference code github.com/Trevillie/MagNet
(``defensive_models.py``: ``DenoisingAutoEncoder``; ``train_defense.py``) [code checked]. The
defense that uses it is :class:`robustlab.defenses.magnet.MagNet`; its training loop is
:func:`robustlab.training.autoencoder.train_autoencoder`.

The paper's MNIST autoencoders (its Table 1; the reference's ``structure`` lists
``[3, "average", 3]`` and ``[3]``), every convolution 3x3, "same" padding, sigmoid:

- detector I and reformer (``pool=True``): conv(C -> 3), average-pool 2x2, conv(3 -> 3),
  conv(3 -> 3), nearest upsampling 2x2, conv(3 -> 3), conv(3 -> C);
- detector II (``pool=False``): conv(C -> 3), conv(3 -> 3), conv(3 -> C).

``width`` (3 in the paper) is the channels of the hidden layers. Weights start as Keras's
defaults (Glorot-uniform, zero bias). Difference from the reference: its L2 activity
regulariser (strength 1e-9 on every layer's output) is left out.

Cost: tiny. On a 28x28 grey image ``pool=True`` is about 138 k multiply-adds, ``pool=False``
about 106 k (computed: 9 per input channel, output channel and output pixel of each conv).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab._modes import attached
from robustlab._validate import positive_int
from robustlab.models.checkpoint import load
from robustlab.models.factory import MODELS

__all__ = ["MagNetAutoencoder", "load_autoencoder"]


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:  # always: the layer is built with a bias
        nn.init.zeros_(conv.bias)
    return conv


@MODELS.register("magnet-ae")
class MagNetAutoencoder(nn.Module):
    """MagNet's autoencoder: images in [0, 1] to their reconstruction in (0, 1).

    Args:
        in_channels: image channels C (1 for (Fashion-)MNIST, 3 for CIFAR-10). Default 1.
        width: channels of the hidden convolutions, >= 1. Default 3 (the paper's).
        pool: True: the paper's detector-I / reformer autoencoder (with a 2x2 average pooling
            and upsampling; H and W must be even); False: its detector-II autoencoder.
            Default True.

    Shapes and units: (N, C, H, W) -> (N, C, H, W); the output is a sigmoid, so it lies in
    (0, 1). The build recipe is ``robustlab_arch`` (``{"name": "magnet-ae", "kwargs": ...}``),
    so :func:`robustlab.models.save` stores it like any model.
    """

    #: an image-to-image model, not a classifier: not listed by ``robustlab.models.names()``
    task: ClassVar[str] = "autoencode"

    def __init__(self, in_channels: int = 1, width: int = 3, pool: bool = True) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.width = positive_int(width, "width")
        if not isinstance(pool, bool):
            raise TypeError(
                f"pool must be True (detector I / reformer) or False (detector II), got {pool!r}"
            )
        self.pool = pool
        c, w = in_channels, width
        if pool:
            self.encoder = nn.Sequential(
                _conv(c, w), nn.Sigmoid(), nn.AvgPool2d(2), _conv(w, w), nn.Sigmoid()
            )
            self.decoder = nn.Sequential(
                _conv(w, w),
                nn.Sigmoid(),
                nn.Upsample(scale_factor=2),
                _conv(w, w),
                nn.Sigmoid(),
                _conv(w, c),
                nn.Sigmoid(),
            )
        else:
            self.encoder = nn.Sequential(_conv(c, w), nn.Sigmoid())
            self.decoder = nn.Sequential(_conv(w, w), nn.Sigmoid(), _conv(w, c), nn.Sigmoid())
        self.robustlab_arch = {"name": self.name, "kwargs": self.kwargs()}

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture."""
        return {"in_channels": self.in_channels, "width": self.width, "pool": self.pool}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs().items())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"the autoencoder takes images (N, {self.in_channels}, H, W), got "
                f"shape {tuple(x.shape)}"
            )
        if self.pool and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(
                f"the pooling autoencoder needs even H and W, got "
                f"{tuple(x.shape[2:])}; pad the images or use pool=False"
            )
        return self.decoder(self.encoder(x))


def load_autoencoder(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> MagNetAutoencoder:
    """:func:`robustlab.models.load` of a checkpoint that must hold a
    :class:`MagNetAutoencoder`.

    Returns:
        The autoencoder in ``eval()`` mode on ``device`` (default CPU), with
        ``robustlab_meta`` = the sidecar (noise, epoch, seed, versions, sha256).

    Raises:
        FileNotFoundError, ValueError: as :func:`robustlab.models.load`; ValueError also for a
            checkpoint of another architecture.
    """
    model = load(path, device=device)
    if not isinstance(model, MagNetAutoencoder):
        raise ValueError(
            f"{str(path)!r} holds a {attached(model, 'robustlab_arch')['name']!r} model, not "
            "a 'magnet-ae' autoencoder"
        )
    return model
