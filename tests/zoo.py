"""Small models that reproduce real architectures' traits (no torchvision).

Each is tiny so tests run in seconds on 2 CPU cores, yet keeps the trait that matters to
relu_doctor: a ReLU module reused twice or three times, inplace ReLU, functional F.relu,
ReLU6, BatchNorm before ReLU, (N, L, F) sequence outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(d_in: int = 10, hidden: int = 32, d_out: int = 3, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, d_out)
    )


class SmallCNN(nn.Module):
    """conv + BatchNorm + inplace ReLU, twice, then a linear head (conv-to-linear flatten)."""

    def __init__(self, c: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * c * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: one inplace ReLU module called twice per forward."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet Bottleneck: one inplace ReLU called three times on different widths."""

    def __init__(self, c_in: int = 16, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.conv3 = nn.Conv2d(width * 2, c_in, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x
        return self.relu(out)


class ResNetish(nn.Module):
    """Stem + two BasicBlocks + head: the residual trait end to end."""

    def __init__(self, c: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        return self.head(x.mean((2, 3)))


class SequenceModel(nn.Module):
    """(N, L, F) outputs: units are the last dim."""

    def __init__(self, d: int = 12, hidden: int = 24, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.proj = nn.Linear(d, hidden)
        self.act = act()
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.proj(x)))


class DenseLayer(nn.Module):
    """DenseNet-style: BN -> F.relu -> conv, with the activation called functionally."""

    def __init__(self, c_in: int = 8, growth: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project."""

    def __init__(self, c: int = 8, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def transformer_layer(d: int = 16, heads: int = 2) -> nn.TransformerEncoderLayer:
    """nn.TransformerEncoderLayer with its default activation (functional F.relu)."""
    return nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0, batch_first=True)


def gelu_mlp() -> nn.Sequential:
    return mlp(act=nn.GELU)


FAMILY_MODULES: dict[str, nn.Module] = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "leaky_relu": nn.LeakyReLU(0.1),
    "prelu": nn.PReLU(),
    "rrelu": nn.RReLU(),
    "elu": nn.ELU(),
    "celu": nn.CELU(),
    "selu": nn.SELU(),
    "gelu": nn.GELU(),
    "silu": nn.SiLU(),
    "hardtanh": nn.Hardtanh(-1.0, 1.0),
}


def family_model(name: str, d: int = 6, hidden: int = 16) -> nn.Sequential:
    """Linear -> <family activation> -> Linear (a fresh activation instance)."""
    import copy

    return nn.Sequential(nn.Linear(d, hidden), copy.deepcopy(FAMILY_MODULES[name]), nn.Linear(hidden, 2))
