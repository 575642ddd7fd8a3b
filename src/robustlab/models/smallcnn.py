"""SmallCNN: the four-convolution MNIST network of TRADES."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from robustlab.models.factory import MODELS
from robustlab.models.layers import Normalize, Stat, make_activation


@MODELS.register("smallcnn")
class SmallCNN(nn.Module):
    """The TRADES MNIST CNN (Zhang et al., "Theoretically Principled Trade-off between
    Robustness and Accuracy", ICML 2019; ``models/small_cnn.py`` of yaodongyu/TRADES).

    Layout: Normalize; conv 32 3x3, act, conv 32 3x3, act, maxpool 2; conv 64 3x3, act,
    conv 64 3x3, act, maxpool 2; fc 200, act, dropout(``drop``), fc 200, act, fc num_classes.
    Convolutions are unpadded, so the flattened size follows the input: 64 x 4 x 4 for 28x28,
    64 x 5 x 5 for 32x32. 312,202 parameters for 1x28x28 and 10 classes.

    Submodule names (``feature_extractor.conv1`` ... ``classifier.fc3``) match TRADES. One
    deliberate difference: TRADES zero-initialises ``fc3``; we keep PyTorch's default, because
    an all-zero classifier has zero input gradients and makes attacks on untrained models
    meaningless. Convolutions use Kaiming-normal weights and zero biases, as in TRADES.

    Args:
        drop: dropout probability between fc1 and fc2, in [0, 1).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "relu",
        mean: Stat = None,
        std: Stat = None,
        drop: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"smallcnn drop must be in [0, 1), got {drop!r}")
        side = ((input_size - 4) // 2 - 4) // 2  # two unpadded 3x3 convs, pool 2, twice
        if side < 1:
            raise ValueError(f"smallcnn needs input_size >= 16 pixels, got {input_size}")
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 32, 3)),
                    ("act1", make_activation(activation)),
                    ("conv2", nn.Conv2d(32, 32, 3)),
                    ("act2", make_activation(activation)),
                    ("maxpool1", nn.MaxPool2d(2, 2)),
                    ("conv3", nn.Conv2d(32, 64, 3)),
                    ("act3", make_activation(activation)),
                    ("conv4", nn.Conv2d(64, 64, 3)),
                    ("act4", make_activation(activation)),
                    ("maxpool2", nn.MaxPool2d(2, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(64 * side * side, 200)),
                    ("act1", make_activation(activation)),
                    ("drop", nn.Dropout(drop)),
                    ("fc2", nn.Linear(200, 200)),
                    ("act2", make_activation(activation)),
                    ("fc3", nn.Linear(200, num_classes)),
                ]
            )
        )
        for m in self.feature_extractor:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:  # always: the layers are built with a bias
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        features = self.feature_extractor(self.normalize(x))
        return self.classifier(torch.flatten(features, 1))
