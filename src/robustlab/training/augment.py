"""Data augmentation of training batches: random crop after padding, random horizontal flip.

The standard augmentation of adversarial training on CIFAR-10 (Madry et al., Rice et al.,
Wu et al.: torchvision's ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()``): each
image is padded by ``pad`` pixels on every side with ``fill``, a window of the original size is
cut at an offset drawn uniformly from ``{0, ..., 2 pad}`` in each direction, and the image is
mirrored left-right with probability 1/2. The trainer draws the offsets and flips for the whole
global batch from a generator seeded by ``(seed, epoch)``, so a resumed run and a run on several
processes augment every example as one uninterrupted process does.

Flipping is for data sets whose :class:`~robustlab.data.datasets.DatasetInfo` says
``mirrorable`` (CIFAR-10/100); it is off for the others unless asked (``flip = true``): a
mirrored Fashion-MNIST shoe points the other way than every shoe of the data set, a mirrored
digit is another glyph. Cost: one padded copy of the batch, no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab import data


def flips_for(flip: bool | None, dataset: str | None) -> bool:
    """Whether to flip: ``flip`` if set, else whether ``dataset`` is mirrorable (False for
    no data set name)."""
    if flip is not None:
        return flip
    return dataset is not None and data.info(dataset).mirrorable


@dataclass(frozen=True)
class Augment:
    """Random crop with ``pad`` pixels of padding (0: none) filled with ``fill``, and random
    horizontal flips if ``flip``, on image batches ``(N, C, H, W)``."""

    pad: int = 4
    flip: bool = False
    fill: float = 0.0

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Offsets ``(n, 2)`` (top, left) in ``[0, 2 pad]`` and flip flags ``(n,)`` for ``n``
        images, from ``generator`` (CPU)."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return offsets, flips & self.flip

    def apply(self, x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """``x`` cropped at ``offsets`` from its padded copy and mirrored where ``flips``: a
        tensor of ``x``'s shape, dtype and device (``x`` itself if nothing changes)."""
        n, _, h, w = x.shape
        offsets, flips = offsets.to(x.device), flips.to(x.device)
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.fill)
            rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (N, H)
            cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
            idx = torch.arange(n, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2).contiguous()
        if flips.any():
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x
