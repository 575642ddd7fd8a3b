"""WideResNet-34-10 as used by TRADES and MART."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustlab._validate import positive_int
from robustlab.models.factory import MODELS
from robustlab.models.layers import Normalize, Stat, make_activation


class WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-act-conv-BN-act-[dropout]-conv); where the shape
    changes, a 1x1-conv shortcut is applied to the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str, drop: float) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), make_activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop = drop
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.act2(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.drop, training=self.training)
        return self.conv2(out) + shortcut


@MODELS.register("wrn-34-10")
class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) in the form
    used by TRADES (Zhang et al., ICML 2019) and MART (Wang et al., ICLR 2020).

    Layout: conv 16 3x3; three groups of (depth - 4) / 6 wide blocks with 16k, 32k and 64k
    channels (k = ``widen_factor``; stride 2 at groups 2 and 3); BN, act, global average
    pooling, fc. Defaults give WRN-34-10: 46,160,474 parameters for 3x32x32, 10 classes. TRADES'
    unused ``sub_block1`` (parameters never reached by ``forward``) is left out. Adaptive
    average pooling replaces the fixed 8x8 pooling so 28x28 inputs work too.
    Initialisation as in TRADES: Kaiming-normal (fan-out) conv weights, zero fc bias.

    Args:
        depth: total depth, with (depth - 4) divisible by 6 (34, 28, 16, 10, ...).
        widen_factor: channel multiplier k >= 1.
        drop: dropout probability inside each block, in [0, 1).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "relu",
        mean: Stat = None,
        std: Stat = None,
        depth: int = 34,
        widen_factor: int = 10,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n + 4 with n >= 1 (10, 16, 28, 34), got {depth}")
        positive_int(widen_factor, "wrn widen_factor")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"wrn drop must be in [0, 1), got {drop!r}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, cin = [], 16
        for cout, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation, drop)
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[-1])
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(torch.flatten(self.pool(self.act(self.bn(out))), 1))
