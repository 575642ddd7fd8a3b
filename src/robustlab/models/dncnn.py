"""DnCNN, the residual image denoiser of denoised smoothing (``"dncnn"`` in the model
registry: saved and loaded by :func:`robustlab.models.save` / :func:`robustlab.models.load`).

Zhang, Zuo, Chen, Meng, Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for
Image Denoising", IEEE TIP 2017, https://arxiv.org/abs/1608.03981; as used by Salman et al.,
"Denoised Smoothing", NeurIPS 2020 (reference code github.com/microsoft/denoised-smoothing,
``code/archs/dncnn.py``). The defense that puts it in front of a classifier is
:class:`robustlab.defenses.denoise.Denoised`; its training loop is
:func:`robustlab.training.denoiser.train_denoiser`.

The paper's recipe, from its reference code [code checked]: 17 layers and 64 channels, 3x3
convolutions, BatchNorm (eps 1e-4) on the inner layers, orthogonal initialisation and a
zero-initialised last layer (the untrained denoiser is the identity), inputs in unnormalised
[0, 1] pixels, output not clamped. Our default is small (``depth=8, width=32``, about 56 k
parameters) so that Fashion-MNIST training runs on a CPU; pass ``depth=17, width=64`` for the
paper's. BatchNorm uses PyTorch's default momentum 0.1 (the reference's 0.95 makes the running
statistics follow the last batch almost entirely, which looks like a Keras-convention port).

Cost: DnCNN-17-64 on a 32x32 colour image is about 0.57 G multiply-adds (15 inner layers of
64 * 64 * 9 * 1024; computed); the default on a 28x28 grey image about 44 M.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustlab._modes import attached
from robustlab._validate import positive_int
from robustlab.models.checkpoint import load
from robustlab.models.factory import MODELS

__all__ = ["Denoiser", "load_denoiser"]


@MODELS.register("dncnn")
class Denoiser(nn.Module):
    """DnCNN-style residual denoiser: ``depth`` 3x3 convolutions (conv-ReLU, then
    ``depth - 2`` conv-BN-ReLU, then conv) predict the noise, and the output is
    ``x - predicted noise``.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10). Default 1.
        depth: number of convolutions, >= 2. Default 8 (the paper's DnCNN: 17).
        width: channels of the hidden layers, >= 1. Default 32 (the paper's: 64).

    Shapes and units: (N, C, H, W) -> (N, C, H, W), any H and W. Inputs are in [0, 1] pixel
    units plus noise, so they lie outside [0, 1]; nothing is clipped on the way in, and the
    output is not clamped either (as in the reference code): the classifier may see values
    slightly outside [0, 1]. The last convolution starts at zero, so an untrained denoiser is
    the identity. The build recipe is ``robustlab_arch`` (``{"name": "dncnn", "kwargs":
    ...}``), so :func:`robustlab.models.save` stores it like any model.
    """

    #: an image-to-image model, not a classifier: not listed by ``robustlab.models.names()``
    task: ClassVar[str] = "denoise"

    def __init__(self, in_channels: int = 1, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.depth = positive_int(depth, "depth", 2)
        self.width = positive_int(width, "width")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, eps=1e-4),
                nn.ReLU(),
            ]
        last = nn.Conv2d(width, in_channels, 3, padding=1, bias=False)
        layers.append(last)
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(last.weight)
        self.robustlab_arch = {"name": self.name, "kwargs": self.kwargs()}

    def kwargs(self) -> dict[str, int]:
        """The constructor arguments that rebuild this architecture."""
        return {"in_channels": self.in_channels, "depth": self.depth, "width": self.width}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs().items())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"the denoiser takes images (N, {self.in_channels}, H, W), got "
                f"shape {tuple(x.shape)}"
            )
        return x - self.body(x)


def load_denoiser(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> Denoiser:
    """:func:`robustlab.models.load` of a checkpoint that must hold a :class:`Denoiser`.

    Returns:
        The denoiser in ``eval()`` mode on ``device`` (default CPU), with ``robustlab_meta`` =
        the sidecar (sigma, noise, objective, epoch, seed, versions, sha256).

    Raises:
        FileNotFoundError, ValueError: as :func:`robustlab.models.load`; ValueError also for a
            checkpoint of another architecture.
    """
    model = load(path, device=device)
    if not isinstance(model, Denoiser):
        raise ValueError(
            f"{str(path)!r} holds a {attached(model, 'robustlab_arch')['name']!r} model, "
            "not a 'dncnn' denoiser"
        )
    return model
