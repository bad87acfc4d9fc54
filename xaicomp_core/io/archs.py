"""Architectures of the built-in models.

All are plain ``nn.Module`` trees whose leaves are registered in forward order and whose every module is called
once per forward pass, so that zennit's canonizers and rules see them correctly. The residual blocks of
:class:`FashionResNet` are torchvision's ``BasicBlock``, so zennit's ``ResNetCanonizer`` routes their additions
through a ``Sum`` layer exactly as for torchvision ResNets.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class FashionVGG(nn.Module):
    """VGG-style network with BatchNorm for 28x28 grayscale images (about 0.44 M parameters).

    Five 3x3 conv-BN-ReLU layers in three stages (32, 64, 128 channels) with max pooling, then two linear layers.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 3 * 3, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, for 28x28 grayscale images (61,706 parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


class FashionResNet(nn.Module):
    """Small ResNet (three stages of torchvision ``BasicBlock``) with BatchNorm and skip connections.

    Stem 3x3 conv to ``width`` channels, then one block per stage at ``width``, ``2*width`` (stride 2) and
    ``4*width`` (stride 2) channels, global average pooling and a linear classifier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w))
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2, downsample=self._down(w, 2 * w))
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2, downsample=self._down(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _down(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):  # noqa: D102
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))
