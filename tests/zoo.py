"""Small models that reproduce real architectures' traits (no torchvision).

Each is tiny so tests run in seconds on 2 CPU cores, yet keeps the trait that matters to
relu_doctor: a ReLU module reused twice or three times, inplace ReLU, functional F.relu,
ReLU6, BatchNorm before ReLU, (N, L, F) sequence outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------
# Cases for the foundation tests: a model factory and a batch factory, and a training loop.

@dataclass(frozen=True)
class Case:
    """A model and the input it takes. ``batch(n)`` draws a fresh batch of ``n`` samples."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[int], torch.Tensor]


def _family_input(n: int) -> torch.Tensor:
    # Wide enough that capped members (ReLU6, Hardtanh) saturate on part of the batch.
    return 8.0 * torch.randn(n, 6)


ARCH_CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("mlp", mlp, lambda n: torch.randn(n, 10)),
        Case("small_cnn", SmallCNN, lambda n: torch.randn(n, 3, 8, 8)),
        Case("resnetish", ResNetish, lambda n: torch.randn(n, 3, 8, 8)),
        Case("bottleneck", Bottleneck, lambda n: torch.randn(n, 16, 6, 6)),
        Case("sequence", SequenceModel, lambda n: torch.randn(n, 7, 12)),
        Case("inverted_residual", InvertedResidual, lambda n: 3.0 * torch.randn(n, 8, 5, 5)),
    )
}
FAMILY_CASES: dict[str, Case] = {
    name: Case(name, lambda name=name: family_model(name), _family_input)
    for name in FAMILY_MODULES
}
CASES: dict[str, Case] = {**ARCH_CASES, **{f"family_{k}": v for k, v in FAMILY_CASES.items()}}


def train(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    doc: object | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[torch.Tensor]:
    """One forward, backward and (optional) optimizer step per batch; ``doc.step()`` after
    each when a Doctor is given. Returns the detached outputs."""
    outs = []
    for x in batches:
        out = model(x)
        out.float().square().mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if doc is not None:
            doc.step()  # type: ignore[attr-defined]
        outs.append(out.detach())
    return outs


# ---------------------------------------------------------------------- added for issue 7


def dense_block(c_in: int = 8, growth: int = 4, layers: int = 2) -> nn.Sequential:
    """DenseNet block: DenseLayers in a Sequential (functional sites ``0:relu#0`` ...)."""
    return nn.Sequential(*[DenseLayer(c_in + i * growth, growth) for i in range(layers)])


DenseBlock = dense_block


class _FunctionalReLUBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class MixedActivations(nn.Module):
    """An nn.ReLU module, F.relu and Tensor.relu in one forward, and a child calling F.relu.

    Sites: ``act`` (module), ``(root):relu#0`` (F.relu), ``(root):relu#1`` (Tensor.relu),
    ``block:relu#0`` (F.relu inside the child).
    """

    def __init__(self, d: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.block = _FunctionalReLUBlock(hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = F.relu(self.fc2(h))
        h = self.fc3(h).relu()
        return self.out(self.block(h))


class CheckpointedNet(nn.Module):
    """A stem, two checkpointed blocks (BasicBlock with a reused ReLU, DenseLayer with F.relu)
    and a head; ``checkpoint`` is None (plain), ``"reentrant"`` or ``"non_reentrant"``."""

    def __init__(self, c: int = 8, checkpoint: str | None = None) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.block = BasicBlock(c)
        self.dense = DenseLayer(c, 4)
        self.head = nn.Linear(c + 4, 2)

    def _run(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint is None:
            return mod(x)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(mod, x, use_reentrant=self.checkpoint == "reentrant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self._run(self.block, x)
        x = self._run(self.dense, x)
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------------- added for issue 11 (remedies)


class FxNet(nn.Module):
    """Not a Sequential: conv + BN + module ReLU, pooling, a view-flatten, a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv(x))))
        h = h.view(h.size(0), -1)
        return self.out(F.dropout(F.relu(self.fc(h)), 0.0, self.training))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


def odd_name_net(name: str, d_in: int = 4, hidden: int = 8, d_out: int = 2) -> nn.Sequential:
    """``fc`` -> an nn.ReLU registered as ``name`` -> a child ``<name>_blk`` calling F.relu ->
    ``out``. For names holding the characters site display names use (``enc:act``, ``a#1``):
    sites ``<name>`` and ``<name>_blk:relu#0``."""
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(d_in, hidden))
    net.add_module(name, nn.ReLU())
    net.add_module(f"{name}_blk", _FunctionalReLUBlock(hidden))
    net.add_module("out", nn.Linear(hidden, d_out))
    return net


# ---------------------------------------------------------------------- added for issue 12 (units)
# torchvision and timm do not install beside the CPU torch here: these reproduce the traits of
# their models that decide where an activation's units are. ``UNIT_CASES`` lists, for each,
# the activation modules' expected unit dim and count, taken from the layer that feeds them.


class UnitsConvNeXtBlock(nn.Module):
    """torchvision/timm ConvNeXt block: depthwise conv, permute to (N, H, W, C), LayerNorm,
    Linear -> GELU -> Linear on channels-last, permute back, residual. Units: 4C on dim 3."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class UnitsSwinMlp(nn.Module):
    """Swin's MLP on (N, H, W, C) windows (timm ``Mlp``): fc1 -> GELU -> dropout -> fc2."""

    def __init__(self, c: int = 8, hidden: int = 20) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, H, W, C)
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class UnitsDenseNet(nn.Module):
    """DenseNet: a stem, then DenseLayers whose input is the channel concatenation of all
    earlier outputs (BN -> F.relu on a ``torch.cat``)."""

    def __init__(self, c: int = 6, growth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = dense_block(c, growth, layers=2)
        self.head = nn.Linear(c + 2 * growth, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class UnitsBatchNormAct2d(nn.BatchNorm2d):
    """timm's norm-act module: a BatchNorm2d subclass whose forward also applies the
    activation (an nn.ReLU child), after an (identity) dropout."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )
        return self.act(self.drop(x))


class UnitsRegNetBlock(nn.Module):
    """RegNetX bottleneck (timm): 1x1 conv -> BN-act -> 3x3 group conv -> BN-act -> 1x1 conv
    -> BN, plus the shortcut, then a functional ReLU."""

    def __init__(self, c: int = 8, width: int = 12, groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = UnitsBatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = UnitsBatchNormAct2d(width)
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return F.relu(h + x)


class UnitsConv1dNet(nn.Module):
    """Wav2Vec2-style feature encoder: Conv1d (N, C, L) -> GroupNorm -> GELU, then Conv1d ->
    ReLU. The shape rule would take L (the last dim of a 3-D output) for the units."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(1, c, 5, stride=2)
        self.norm0 = nn.GroupNorm(c, c)
        self.act0 = nn.GELU()
        self.conv1 = nn.Conv1d(c, 2 * c, 3, stride=2)
        self.act1 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L)
        return self.act1(self.conv1(self.act0(self.norm0(self.conv0(x[:, None])))))


@dataclass(frozen=True)
class UnitCase:
    """A model, two batch makers of different spatial/sequence size, and the sites expected:
    ``{(module path, call index, op or None): (unit dim, units, producer path)}``."""

    name: str
    model: Callable[[], nn.Module]
    batches: tuple[Callable[[int], torch.Tensor], ...]
    sites: dict[tuple[str, int, str | None], tuple[int, int, str]]


UNIT_CASES: dict[str, UnitCase] = {
    c.name: c
    for c in (
        UnitCase(
            "convnext_block", lambda: nn.Sequential(UnitsConvNeXtBlock(8), UnitsConvNeXtBlock(8)),
            (lambda n: torch.randn(n, 8, 6, 6), lambda n: torch.randn(n, 8, 9, 7)),
            {("0.act", 0, None): (3, 32, "0.pwconv1"), ("1.act", 0, None): (3, 32, "1.pwconv1")},
        ),
        UnitCase(
            "swin_mlp", lambda: UnitsSwinMlp(8, 20),
            (lambda n: torch.randn(n, 4, 4, 8), lambda n: torch.randn(n, 2, 6, 8)),
            {("act", 0, None): (3, 20, "fc1")},
        ),
        UnitCase(
            "densenet", UnitsDenseNet,
            (lambda n: torch.randn(n, 3, 6, 6), lambda n: torch.randn(n, 3, 5, 8)),
            {
                ("block.0", 0, "relu"): (1, 6, "Conv2d `stem`"),
                ("block.0", 1, "relu"): (1, 16, "block.0.conv1"),
                ("block.1", 0, "relu"): (1, 10, "torch.cat along dim 1"),
                ("block.1", 1, "relu"): (1, 16, "block.1.conv1"),
            },
        ),
        UnitCase(
            "regnet_block", lambda: UnitsRegNetBlock(8, 12, 3),
            (lambda n: torch.randn(n, 8, 5, 5), lambda n: torch.randn(n, 8, 3, 7)),
            {
                ("bn1.act", 0, None): (1, 12, "conv1"),
                ("bn2.act", 0, None): (1, 12, "conv2"),
                ("", 0, "relu"): (1, 8, "conv3"),
            },
        ),
        UnitCase(
            "conv1d", UnitsConv1dNet,
            (lambda n: torch.randn(n, 40), lambda n: torch.randn(n, 57)),
            {("act0", 0, None): (1, 6, "conv0"), ("act1", 0, None): (1, 12, "conv1")},
        ),
    )
}


# ---------------------------------------------------------------------- added for issue 12 (ReDo on any architecture)


class DenseNetish(nn.Module):
    """torchvision DenseNet's traits: a stem, dense layers concatenating their features
    (``torch.cat`` in a child's forward), a transition (BN -> ReLU -> conv -> avg pool) and
    the final BN -> ReLU -> pool -> classifier; the activations are modules (``relu0``,
    ``*.relu1``, ``*.relu2``, ``transition.relu``, ``relu5``)."""

    def __init__(self, c: int = 8, growth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(c)
        self.relu0 = nn.ReLU(inplace=True)
        self.pool0 = nn.MaxPool2d(2)
        self.block = nn.ModuleList([_TVDenseLayer(c + i * growth, growth) for i in range(2)])
        width = c + 2 * growth
        self.transition = nn.Sequential()
        self.transition.add_module("norm", nn.BatchNorm2d(width))
        self.transition.add_module("relu", nn.ReLU(inplace=True))
        self.transition.add_module("conv", nn.Conv2d(width, width // 2, 1, bias=False))
        self.transition.add_module("pool", nn.AvgPool2d(2))
        self.norm5 = nn.BatchNorm2d(width // 2)
        self.relu5 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(width // 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.pool0(self.relu0(self.norm0(self.conv0(x))))]
        for layer in self.block:
            feats.append(layer(feats))
        x = self.transition(torch.cat(feats, 1))
        x = F.adaptive_avg_pool2d(self.relu5(self.norm5(x)), 1)
        return self.classifier(torch.flatten(x, 1))


class _TVDenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class BatchNormAct2d(UnitsBatchNormAct2d):
    """timm's norm-act module (:class:`UnitsBatchNormAct2d`), with ``act=False`` for the
    norm-only use after a block's last conv."""

    def __init__(self, c: int, act: bool = True) -> None:
        super().__init__(c)
        if not act:
            self.act = nn.Identity()  # type: ignore[assignment]


class RegNetBlock(nn.Module):
    """timm RegNetX's bottleneck: 1x1 conv -> BNAct -> 3x3 group conv -> BNAct -> 1x1 conv ->
    BN (no act), plus a downsample or identity shortcut, then a ReLU after the sum."""

    def __init__(self, c_in: int = 8, c_out: int = 8, group_width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False))
        self.conv1.add_module("bn", BatchNormAct2d(c_out))
        self.conv2 = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out // group_width, bias=False)
        )
        self.conv2.add_module("bn", BatchNormAct2d(c_out))
        self.conv3 = nn.Sequential(nn.Conv2d(c_out, c_out, 1, bias=False))
        self.conv3.add_module("bn", BatchNormAct2d(c_out, act=False))
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
            if c_in != c_out
            else None
        )
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act3(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class RegNetish(nn.Module):
    """A stem (conv + BNAct), a block with a downsample shortcut, one with an identity
    shortcut, a pooled linear head."""

    def __init__(self, c: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False))
        self.stem.add_module("bn", BatchNormAct2d(c))
        self.s1 = nn.Sequential(RegNetBlock(c, 2 * c), RegNetBlock(2 * c, 2 * c))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s1(self.stem(x)).mean((2, 3)))


class ConvNeXtBlock(UnitsConvNeXtBlock):
    """:class:`UnitsConvNeXtBlock` with ConvNeXt's layer scale (``gamma * x``) before the
    permute back: a product the recycled units pass on the way to nothing (pwconv2 is first)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__(c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class TransformerMLP(nn.Module):
    """A transformer layer's MLP (no Keras, no HF): LayerNorm(x + fc2(dropout(act(fc1(x)))))
    on (N, L, D), with an activation given as a module class or a function."""

    def __init__(self, d: int = 8, hidden: int = 16, act: Callable[..., torch.Tensor] | type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = act() if isinstance(act, type) else None
        self.fn = None if isinstance(act, type) else act
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.act(h) if self.act is not None else self.fn(h)  # type: ignore[misc]
        return self.norm(x + self.fc2(self.drop(h)))


class NormAfterAct(nn.Module):
    """Traits recycling must refuse: an activation read through LayerNorm, one read by a
    GroupNorm mixing channels, one feeding the output directly, and one whose producer's
    output also goes elsewhere."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.act1 = nn.ReLU()
        self.ln = nn.LayerNorm(d)
        self.fc2 = nn.Linear(d, d)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(d, d)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.ln(self.act1(self.fc1(x))))
        p = self.fc3(h)
        return self.act3(p) + p.mean() + self.act2(h)
