"""The small CNN of IBP training ("DM-small"): a ReLU chain without max pooling, so that every
bound method of :mod:`robustlab.models.bounds` (CROWN included) can verify it."""

from __future__ import annotations

import torch
from torch import nn

from robustlab._validate import positive_int
from robustlab.models.factory import MODELS
from robustlab.models.layers import Normalize, Stat, make_activation


@MODELS.register("ibp-small")
class IBPSmall(nn.Module):
    """The "small" model of Gowal et al., "On the Effectiveness of Interval Bound Propagation
    for Training Verifiably Robust Models", 2018, arXiv:1810.12715 (``layers('small')`` in
    ``examples/train.py`` of deepmind/interval-bound-propagation), also CROWN-IBP's
    "DM-small" (Zhang et al., ICLR 2020, arXiv:1906.06316).

    Layout: Normalize; conv 16 4x4 stride 2, act; conv 32 4x4 stride 1, act; flatten;
    fc ``hidden``, act; fc num_classes. Convolutions are unpadded ("VALID"), so a side of s
    pixels becomes (s - 4) // 2 + 1, then 3 fewer: 32 x 10 x 10 for 28x28, 32 x 12 x 12 for
    32x32. 329,606 parameters for 1x28x28 and 10 classes. The forward is exactly the chain of
    its modules, which :func:`robustlab.models.bounds.network` reads. PyTorch's default
    initialisation (the reference uses Sonnet's truncated normal).

    Args:
        hidden: width of the hidden fully connected layer (>= 1); 100 in the paper.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "relu",
        mean: Stat = None,
        std: Stat = None,
        hidden: int = 100,
    ) -> None:
        super().__init__()
        positive_int(hidden, "ibp-small hidden")
        if input_size < 10:
            raise ValueError(f"ibp-small needs input_size >= 10 pixels, got {input_size}")
        side = (input_size - 4) // 2 + 1 - 3  # 4x4 stride 2, then 4x4 stride 1, unpadded
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 4, stride=2),
            make_activation(activation),
            nn.Conv2d(16, 32, 4, stride=1),
            make_activation(activation),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * side * side, hidden),
            make_activation(activation),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        return self.classifier(self.features(self.normalize(x)))
