"""CIFAR ResNets: ResNet-20 (He et al. 2016) and PreAct ResNet-18 (fast_adversarial)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.models.factory import MODELS
from robustlab.models.layers import Normalize, Stat, make_activation


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no weights)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN plus shortcut, then act (He et al. 2016, Fig. 2)."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.act1, self.act2 = make_activation(activation), make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _PadShortcut(cout - cin, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet20")
class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016, Sec. 4.2): conv 16 3x3, then three stages of three basic blocks with 16, 32
    and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling, fc.

    Shortcuts follow the paper's option A: identity, or stride-2 subsampling with zero-padded
    extra channels where the shape changes, so shortcuts carry no parameters.
    Adaptive average pooling makes any input_size >= 1 work (28 and 32 in practice).
    269,722 parameters for 3x32x32 inputs and 10 classes. Kaiming-normal (fan-in) init.
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
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.conv1, self.bn1 = _conv3x3(in_channels, 16), nn.BatchNorm2d(16)
        self.act = make_activation(activation)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, activation))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        return self.fc(torch.flatten(self.pool(self.blocks(out)), 1))


class PreActBlock(nn.Module):
    """BN-act-conv-BN-act-conv with a 1x1-conv shortcut from the activated input
    where the shape changes (He et al., "Identity Mappings in Deep Residual Networks", 2016).
    """

    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.act1, self.act2 = make_activation(activation), make_activation(activation)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + shortcut


@MODELS.register("preact-resnet18")
class PreActResNet18(nn.Module):
    """PreAct ResNet-18 as used by Wong et al., "Fast is better than free" (ICLR 2020,
    locuslab/fast_adversarial) and Rice et al., "Overfitting in adversarially robust deep
    learning" (ICML 2020): conv 64 3x3, four stages of two pre-activation blocks with
    64, 128, 256 and 512 channels (stride 2 from stage 2 on), final BN and act, global average
    pooling, fc. 11,172,170 parameters for 3x32x32 inputs and 10 classes; PyTorch default init.
    Adaptive average pooling replaces the fixed 4x4 pooling so 28x28 inputs work too.
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
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.conv1 = _conv3x3(in_channels, 64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            first = PreActBlock(cin, cout, stride, activation)
            layers.append(nn.Sequential(first, PreActBlock(cout, cout, 1, activation)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for inputs (N, C, H, W) in [0, 1]."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(self.act(self.bn(out))), 1))
