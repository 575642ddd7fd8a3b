"""LeNet-5 style network for 28x28 and 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from robustlab.models.factory import MODELS
from robustlab.models.layers import Normalize, Stat, make_activation


@MODELS.register("lenet")
class LeNet(nn.Module):
    """LeNet-5 style CNN (LeCun et al., "Gradient-Based Learning Applied to Document
    Recognition", Proc. IEEE 1998), in its common modern form.

    Layout: Normalize; conv 6 5x5 (padding 2), act, maxpool 2; conv 16 5x5, act, maxpool 2;
    fc 120, act, fc 84, act, fc num_classes. The padding makes 28x28 inputs reach the
    original 16 x 5 x 5 feature map; 32x32 inputs give 16 x 6 x 6. Max pooling and a
    configurable activation replace the paper's trainable subsampling and scaled tanh.
    61,706 parameters for 1x28x28, 83,126 for 3x32x32 (10 classes).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "relu",
        mean: Stat = None,
        std: Stat = None,
    ) -> None:
        super().__init__()
        side = (input_size // 2 - 4) // 2  # padded conv, pool 2, unpadded 5x5 conv, pool 2
        if side < 1:
            raise ValueError(f"lenet needs input_size >= 12 pixels, got {input_size}")
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            make_activation(activation),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            make_activation(activation),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            make_activation(activation),
            nn.Linear(120, 84),
            make_activation(activation),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))
