"""A tiny EfficientNet-Lite-like model for the structured tests: MBConv blocks (expand 1×1 →
BN → ReLU6 → depthwise → BN → ReLU6 → project 1×1 → BN), one without an expand conv, one
strided with TF "same" padding done by ``F.pad`` (as the zoo's ``SamePad`` hook does), one with
a residual add, then a head conv, the spatial mean and a Linear."""

import torch
import torch.nn.functional as F
from torch import nn


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, k: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False) if expand != 1 else None
        self.bn0 = nn.BatchNorm2d(hidden) if expand != 1 else None
        self.stride = stride
        pad = 0 if stride > 1 else k // 2
        self.dw = nn.Conv2d(hidden, hidden, k, stride, pad, groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand is not None:
            h = F.relu6(self.bn0(self.expand(h)))
        if self.stride > 1:  # TF "same": 0 left / top, 1 right / bottom
            h = F.pad(h, (0, 1, 0, 1))
        h = self.bn2(self.project(F.relu6(self.bn1(self.dw(h)))))
        return h + x if self.residual else h


class TinyMBConvNet(nn.Module):
    """stem 3→8 → b0 (no expand, 8→6) → b1 (expand 4, stride 2, 6→12) → b2 (expand 2,
    residual, 12→12) → head 12→16 → mean → fc 16→5. Input ``(n, 3, 8, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b0 = MBConv(8, 6, 1)
        self.b1 = MBConv(6, 12, 4, stride=2)
        self.b2 = MBConv(12, 12, 2)
        self.head = nn.Conv2d(12, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        x = self.b2(self.b1(self.b0(x)))
        return self.fc(F.relu6(self.head(x)).mean((2, 3)))


def make_mbconv(seed: int = 0) -> nn.Module:
    """The model with non-trivial batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    m = TinyMBConvNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(0.2 * torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=g))
    return m.eval()


def mbconv_calibration(seed: int = 1, n: int = 64, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return [x[i : i + batch] for i in range(0, n, batch)]
