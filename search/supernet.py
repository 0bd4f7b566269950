"""A supernet over a `SearchSpace`: every searchable layer holds every candidate op.

    stem -> [first block] -> MixedLayer_1 .. MixedLayer_L -> head

`MixedLayer` i holds one module per token of `space.layers()[i].candidates`, in that order: an
`MBConv` for `k<k>e<e>` and an identity for `skip` (ProxylessNAS's zero op: in a skippable layer
the MBConv carries the residual shortcut, so "zero + shortcut" is the identity).

Nothing here remembers an "active" sub-network. The caller passes the path explicitly:

    supernet(x, path)                      path[i] = index of the op layer i runs (one path)
    supernet.forward_gated(x, pairs, gates)   ProxylessNAS binary gates over a few ops per layer

With one path, only the chosen op of each layer runs, so activations, the autograd graph and the
parameters that receive gradients are those of one ordinary network, whatever the number of
candidates. `forward_gated` computes the gated ops too, but only the op whose gate is 1 keeps
its autograd graph; the others run under `torch.no_grad()` (their outputs are only needed for
the gate gradients dL/dg = <dL/dy, o>), so memory stays that of one path plus one output per
extra op.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import torch
from torch import nn

from codesign.arch import Arch
from codesign.errors import ArchError
from codesign.modules import MBConv, Network, build_block, init_weights
from codesign.search.space import Layer, SearchSpace

OpPath = tuple[int, ...]


class MixedLayer(nn.Module):
    """All candidate ops of one searchable layer, aligned with `layer.candidates`."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.layer = layer
        ops: list[nn.Module] = []
        for token in layer.candidates:
            spec = layer.block(token)
            ops.append(nn.Identity() if spec is None else MBConv(spec))
        self.candidates = nn.ModuleList(ops)

    def __len__(self) -> int:
        return len(self.candidates)

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.candidates[index](x)

    def forward_gated(
        self, x: torch.Tensor, indices: Sequence[int], gates: torch.Tensor
    ) -> torch.Tensor:
        """sum_j gates[j] * op[indices[j]](x) for binary `gates` (exactly one gate is 1).

        Only the op with gate 1 keeps its autograd graph (it is the one that trains); the
        others are computed without grad, as constants whose gates still receive gradients.
        """
        if gates.shape != (len(indices),):
            raise ValueError(f"{len(indices)} ops need {len(indices)} gates, got {gates.shape}")
        active = int(torch.argmax(gates.detach()))
        out = None
        for j, idx in enumerate(indices):
            if j == active:
                y = self.candidates[idx](x)
            else:
                with torch.no_grad():
                    y = self.candidates[idx](x).detach()  # identity would return x itself
            term = gates[j] * y
            out = term if out is None else out + term
        assert out is not None
        return out


INITS = ("equal", "independent")


@torch.no_grad()
def equalize(layer: MixedLayer) -> None:
    """Make every MBConv of `layer` compute the same function as its smallest op, in place.

    k5/k7 depthwise kernels get the smallest op's kernel in their centre (zeros around); an
    e6 op gets the e3 op's expansion and depthwise channels twice and half its projection
    weights on each copy. With the zero-initialised last BN of residual blocks, every op (and
    skip) starts as the same function, so the ops do not have to align their channel orders
    while they train on random paths: on tiny/mnist5k this cuts the supernet's loss after two
    epochs from 1.9 to 0.7 (independent random init, as in the ProxylessNAS code, stays at
    1.9). The ops still train independently afterwards.
    """
    ops = [op for op in layer.candidates if isinstance(op, MBConv)]
    if not ops:
        return
    ref = min(ops, key=lambda o: (o.spec.mid, o.spec.kernel))
    for op in ops:
        r = op.spec.mid // ref.spec.mid
        if (
            op is ref
            or op.spec.mid != r * ref.spec.mid
            or (op.expand is None) != (ref.expand is None)
        ):
            continue
        if op.expand is not None:
            assert ref.expand is not None  # both have one (checked above)
            op.expand[0].weight.copy_(ref.expand[0].weight.repeat(r, 1, 1, 1))
            _copy_bn(op.expand[1], ref.expand[1], r)
        w = torch.zeros_like(op.depthwise[0].weight)
        k, kr = op.spec.kernel, ref.spec.kernel
        o = (k - kr) // 2
        w[:, :, o : o + kr, o : o + kr] = ref.depthwise[0].weight.repeat(r, 1, 1, 1)
        op.depthwise[0].weight.copy_(w)
        _copy_bn(op.depthwise[1], ref.depthwise[1], r)
        op.project[0].weight.copy_(ref.project[0].weight.repeat(1, r, 1, 1) / r)
        _copy_bn(op.project[1], ref.project[1], 1)


def _copy_bn(dst: nn.Module, src: nn.Module, repeat: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name).repeat(repeat))


class Supernet(nn.Module):
    """stem, first block, one `MixedLayer` per searchable layer, head; seeded initial weights
    (`init="equal"`: every op of a layer starts as the same function, see `equalize`)."""

    def __init__(
        self, space: SearchSpace, *, seed: int = 0, dropout: float = 0.0, init: str = "equal"
    ) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        super().__init__()
        self.space = space
        self.stem = build_block(space.stem_block())
        first = space.first_block()
        self.first = build_block(first) if first is not None else None
        self.layers = nn.ModuleList(MixedLayer(layer) for layer in space.layers())
        self.head = build_block(space.head_block(), dropout)
        init_weights(self, seed)
        if init == "equal":
            for layer in self._mixed:
                equalize(layer)

    @property
    def _mixed(self) -> Iterable[MixedLayer]:
        """`self.layers` as the type checker should see it."""
        return cast("Iterable[MixedLayer]", self.layers)

    # ---------------------------------------------------------------- paths
    @property
    def num_candidates(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self._mixed)

    def check_path(self, path: Sequence[int]) -> OpPath:
        path = tuple(int(i) for i in path)
        if len(path) != len(self.layers):
            raise ArchError(f"a path needs {len(self.layers)} op indices, got {len(path)}")
        for i, (idx, n) in enumerate(zip(path, self.num_candidates, strict=True)):
            if not 0 <= idx < n:
                raise ArchError(f"layer {i}: op index {idx} out of range 0..{n - 1}")
        return path

    def path_of(self, arch: Arch) -> OpPath:
        """The op indices of `arch` (validated against the space)."""
        self.space.validate(arch)
        return tuple(
            layer.candidates.index(t)
            for layer, t in zip(self.space.layers(), arch.choices, strict=True)
        )

    def arch_of(self, path: Sequence[int]) -> Arch:
        path = self.check_path(path)
        flat = [layer.candidates[i] for layer, i in zip(self.space.layers(), path, strict=True)]
        return Arch.from_flat(self.space.name, flat, list(self.space.depths))

    # ---------------------------------------------------------------- forward
    def _body_in(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.first(x) if self.first is not None else x

    def forward(self, x: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """Run the one network given by `path` (op index per searchable layer)."""
        x = self._body_in(x)
        for layer, idx in zip(self.layers, self.check_path(path), strict=True):
            x = layer(x, idx)
        return self.head(x)

    def forward_gated(
        self,
        x: torch.Tensor,
        choices: Sequence[Sequence[int]],
        gates: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Per layer, the binary-gated sum over the ops `choices[i]` (see MixedLayer)."""
        if len(choices) != len(self.layers) or len(gates) != len(self.layers):
            raise ArchError(f"gated forward needs {len(self.layers)} choices and gates per layer")
        x = self._body_in(x)
        for layer, idx, g in zip(self._mixed, choices, gates, strict=True):
            x = layer.forward_gated(x, idx, g)
        return self.head(x)

    # ---------------------------------------------------------------- weights of one path
    def path_modules(self, path: Sequence[int]) -> Iterator[nn.Module]:
        """The modules one path runs, in network order (skip ops included)."""
        yield self.stem
        if self.first is not None:
            yield self.first
        for layer, idx in zip(self._mixed, self.check_path(path), strict=True):
            yield layer.candidates[idx]
        yield self.head

    def path_parameters(self, path: Sequence[int]) -> Iterator[nn.Parameter]:
        for m in self.path_modules(path):
            yield from m.parameters()

    def subnet(self, path: Sequence[int]) -> Network:
        """A standalone `Network` of the path with copies of the supernet's weights."""
        arch = self.arch_of(path)
        net = Network(self.space.arch_blocks(arch))
        mods = [m for m in self.path_modules(path) if not isinstance(m, nn.Identity)]
        if len(mods) != len(net):
            raise AssertionError("path modules and network blocks differ")
        for block, mod in zip(net, mods, strict=True):
            block.load_state_dict(mod.state_dict())
        return net


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as exact averages over `batches`.

    Weight-shared ops see inputs from many different paths while the supernet trains, so their
    running statistics do not fit any one path; evaluating a path needs its own statistics.
    Works in place on `net` (pass a `Supernet.subnet` copy); returns it in eval mode.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.train()
    for x in batches:
        net(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return net.eval()
