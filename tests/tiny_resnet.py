"""A tiny ResNet in the fashion-cnn layout (stem, identity block, projection block, global
mean, Linear): one tied group (stem + block 1 outputs, read by three convs), shared by tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TinyResNet(nn.Module):
    """The fashion-cnn layout at small width: stem, an identity block, a projection block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())  # fmt: skip
        self.l1, self.l2 = Block(8, 8, 1), Block(8, 12, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.l2(self.l1(self.stem(x)))), 1))


def make_tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    m = TinyResNet().eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


CALIB = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
