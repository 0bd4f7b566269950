"""The quantisable layers of a network, derived from its block list alone.

Every convolution and the classifier is one layer; HAQ chooses weight and activation bits per
layer. Layers are numbered in network order; `block` says which block holds them, because the
execution precision is chosen per block (all layers of a block run in one precision).

    conv block   conv                              module path  <i>.conv.0
    mb block     [expand 1x1], depthwise kxk, project 1x1       <i>.expand.0 / .depthwise.0 / .project.0
    head block   mix 1x1, classifier (linear)                   <i>.mix.0 / .classifier
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codesign.blocks import BlockSpec


@dataclass(frozen=True, slots=True)
class QLayer:
    """One quantisable layer. `h`, `w` are its input size; `role` its place in the block."""

    index: int
    block: int
    role: str  # conv | expand | depthwise | project | mix | classifier
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    h: int
    w: int

    @property
    def name(self) -> str:
        """Module path inside `codesign.modules.Network`."""
        if self.role == "classifier":
            return f"{self.block}.classifier"
        return f"{self.block}.{self.role}.0"

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    @property
    def linear(self) -> bool:
        return self.role == "classifier"

    @property
    def weights(self) -> int:
        """Number of weights (biases not included)."""
        return self.cout * (self.cin // self.groups) * self.kernel**2

    @property
    def out_h(self) -> int:
        return (
            1 if self.linear else (self.h + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1
        )

    @property
    def out_w(self) -> int:
        return (
            1 if self.linear else (self.w + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1
        )

    @property
    def macs(self) -> int:
        return self.weights * self.out_h * self.out_w


def quant_layers(blocks: Sequence[BlockSpec]) -> tuple[QLayer, ...]:
    """Every quantisable layer of the network made of `blocks`, in order."""
    out: list[QLayer] = []

    def add(bi: int, role: str, cin: int, cout: int, k: int, s: int, g: int, h: int, w: int):
        out.append(QLayer(len(out), bi, role, cin, cout, k, s, g, h, w))

    for bi, b in enumerate(blocks):
        if b.kind == "conv":
            add(bi, "conv", b.cin, b.cout, b.kernel, b.stride, 1, b.h, b.w)
        elif b.kind == "head":
            add(bi, "mix", b.cin, b.mid, 1, 1, 1, b.h, b.w)
            add(bi, "classifier", b.mid, b.cout, 1, 1, 1, 1, 1)
        else:
            if b.expand:
                add(bi, "expand", b.cin, b.mid, 1, 1, 1, b.h, b.w)
            add(bi, "depthwise", b.mid, b.mid, b.kernel, b.stride, b.mid, b.h, b.w)
            add(bi, "project", b.mid, b.cout, 1, 1, 1, b.out_h, b.out_w)
    return tuple(out)


def layers_per_block(blocks: Sequence[BlockSpec]) -> tuple[int, ...]:
    counts = [0] * len(blocks)
    for layer in quant_layers(blocks):
        counts[layer.block] += 1
    return tuple(counts)
