"""PyTorch modules built from BlockSpecs and architectures, and BatchNorm folding for export.

Every block module carries its `spec`, so a network is a plain `nn.Sequential` of blocks that
can be inspected, pruned and lowered block by block. Nothing here keeps hidden state about an
"active" sub-network: a network is exactly the blocks it holds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal, TypeVar, cast, overload

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from codesign.arch import Arch
from codesign.blocks import BlockSpec

_M = TypeVar("_M", bound=nn.Module)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> ReLU6 (or no activation). 'same' padding."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False) if act else nn.Identity(),
        )

    if TYPE_CHECKING:  # what its parts are, for the type checker (fold_bn swaps [1] out)

        @overload
        def __getitem__(self, idx: Literal[0]) -> nn.Conv2d: ...
        @overload
        def __getitem__(self, idx: Literal[1]) -> nn.BatchNorm2d: ...
        @overload
        def __getitem__(self, idx: int) -> nn.Module: ...
        @overload
        def __getitem__(self, idx: slice) -> nn.Sequential: ...
        def __getitem__(self, idx: int | slice) -> nn.Module: ...


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (+ identity shortcut)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        assert spec.kind == "mb", spec
        self.spec = spec
        self.expand = ConvBNAct(spec.cin, spec.mid, 1) if spec.expand else None
        self.depthwise = ConvBNAct(spec.mid, spec.mid, spec.kernel, spec.stride, groups=spec.mid)
        self.project = ConvBNAct(spec.mid, spec.cout, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.spec.residual else y


class Stem(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        assert spec.kind == "conv", spec
        self.spec = spec
        self.conv = ConvBNAct(spec.cin, spec.cout, spec.kernel, spec.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Head(nn.Module):
    """1x1 feature-mix conv -> global average pool -> (dropout) -> linear classifier."""

    def __init__(self, spec: BlockSpec, dropout: float = 0.0) -> None:
        super().__init__()
        assert spec.kind == "head", spec
        self.spec = spec
        self.mix = ConvBNAct(spec.cin, spec.mid, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(spec.mid, spec.cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x).mean(dim=(2, 3))
        return self.classifier(self.dropout(y))


def build_block(spec: BlockSpec, dropout: float = 0.0) -> nn.Module:
    if spec.kind == "mb":
        return MBConv(spec)
    if spec.kind == "conv":
        return Stem(spec)
    return Head(spec, dropout)


def init_weights(model: _M, seed: int = 0) -> _M:
    """Seeded He init for convs, unit BN, zero-init of every residual block's last BN."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0.0, 0.01, generator=gen)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, MBConv) and m.spec.residual:
            nn.init.zeros_(m.project[1].weight)
    return model


class Network(nn.Sequential):
    """A whole network: its blocks in order. `specs` lists their BlockSpecs."""

    def __init__(self, specs: Iterable[BlockSpec], dropout: float = 0.0) -> None:
        specs = tuple(specs)
        super().__init__(*[build_block(s, dropout) for s in specs])
        self.specs = specs

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.specs[0].input_shape

    if TYPE_CHECKING:  # its children are what build_block makes

        def __iter__(self) -> Iterator[Stem | MBConv | Head]: ...


def build_network(space, arch: Arch, seed: int = 0, dropout: float = 0.0) -> Network:
    """The network of `arch` in `space` (a SearchSpace), with seeded initial weights."""
    return init_weights(Network(space.arch_blocks(arch), dropout), seed)


def randomize_bn(model: _M, seed: int = 0) -> _M:
    """Give every BatchNorm non-trivial statistics (so that folding is really exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None  # tracked stats
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def fold_bn(model: _M) -> _M:
    """An eval-mode copy with every BatchNorm folded into the conv before it (conv gains a bias).

    The project's blocks fold by their structure (ConvBNAct); a user's model with BatchNorm left
    after that is folded through a torch.fx trace (`torch.fx.experimental.optimization.fuse`:
    every BatchNorm2d whose input is only a Conv2d's output); one that does not trace keeps its
    BatchNorm here, and `tvm_backend.lower.fold_batch_norm` folds the bias-less convs' later."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, ConvBNAct) and isinstance(m[1], nn.BatchNorm2d):
            m[0] = fuse_conv_bn_eval(m[0], m[1])
            m[1] = nn.Identity()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        from torch.fx.experimental.optimization import fuse

        try:
            return cast(_M, fuse(model, inplace=True))
        except Exception:  # noqa: BLE001 - not symbolically traceable: left to the Relax pass
            return model
    return model
