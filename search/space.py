"""Search spaces: a stem, a fixed first block, searchable stages of inverted residuals, a head.

Each searchable layer chooses an MBConv with kernel in `kernels` and expansion in `expansions`,
or `skip` where the layer keeps shape (stride 1, same width), as in ProxylessNAS.

Registered spaces (see `get_space`):
  proxyless      ProxylessNAS mobile space at the widths of the published proxyless_mobile net:
                 3x224x224, stem 32, first block 16, stages 32/40/80/96/192/320 of depth
                 4/4/4/4/4/1, head 1280, 1000 classes.
  proxyless-cpu  the same layout at the widths of the published proxyless_cpu net.
  proxyless-gpu  the same layout at the widths of the published proxyless_gpu net.
  tiny           1x28x28 (MNIST-sized), stem 16 stride 2, first 8, stages 16/24/32 of depth 2
                 (strides 2/1/2: 14x14 -> 7x7 -> 4x4), head 128, 10 classes: for tests and the
                 embedded default (cheap enough to train on 2 CPU cores in minutes).
A width multiplier is written as a suffix: `tiny-w0.5`, `proxyless-w1.4`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from codesign.arch import SKIP, Arch, make_token, parse_token
from codesign.blocks import BlockSpec, conv_out
from codesign.errors import ArchError, SpaceError


@dataclass(frozen=True, slots=True)
class Stage:
    width: int
    depth: int
    stride: int


@dataclass(frozen=True, slots=True)
class Layer:
    """One searchable layer: where it sits and what it may become."""

    index: int
    stage: int
    position: int
    cin: int
    cout: int
    stride: int
    h: int
    w: int
    candidates: tuple[str, ...]

    @property
    def skippable(self) -> bool:
        return SKIP in self.candidates

    def block(self, token: str, precision: str = "fp32") -> BlockSpec | None:
        """The BlockSpec of `token` at this layer (None for skip)."""
        choice = parse_token(token)
        if choice is None:
            return None
        kernel, expansion = choice
        return BlockSpec.mb(
            kernel, expansion, self.cin, self.cout, self.stride, self.h, self.w, precision=precision
        )


@dataclass(frozen=True, slots=True)
class SearchSpace:
    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    stem: int
    stem_stride: int
    first: int  # width of the fixed expansion-1 block after the stem (0: none)
    stages: tuple[Stage, ...]
    head: int
    num_classes: int
    kernels: tuple[int, ...] = (3, 5, 7)
    expansions: tuple[int, ...] = (3, 6)
    allow_skip: bool = True

    # ------------------------------------------------------------- structure
    @property
    def ops(self) -> tuple[str, ...]:
        """Every op token of the space, in canonical order (skip last)."""
        ops = tuple(make_token(k, e) for k in self.kernels for e in self.expansions)
        return ops + ((SKIP,) if self.allow_skip else ())

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    @property
    def num_layers(self) -> int:
        return sum(self.depths)

    def stem_block(self) -> BlockSpec:
        c, h, w = self.input_shape
        return BlockSpec("conv", 3, c, self.stem, self.stem_stride, h, w)

    def first_block(self) -> BlockSpec | None:
        if not self.first:
            return None
        s = self.stem_block()
        return BlockSpec.mb(3, 1, self.stem, self.first, 1, s.out_h, s.out_w)

    def layers(self) -> tuple[Layer, ...]:
        return _layers(self)

    def head_block(self) -> BlockSpec:
        last = self.layers()[-1]
        h, w = conv_out(last.h, 3, last.stride), conv_out(last.w, 3, last.stride)
        return BlockSpec("head", 1, last.cout, self.num_classes, 1, h, w, mid=self.head)

    def fixed_blocks(self) -> tuple[BlockSpec, ...]:
        """Blocks every network of the space has: stem, first block (if any), head."""
        first = self.first_block()
        return (self.stem_block(),) + ((first,) if first else ()) + (self.head_block(),)

    def blocks(self, precision: str = "fp32") -> tuple[BlockSpec, ...]:
        """Every distinct BlockSpec a network of this space can contain, in network order."""
        seen: dict[str, BlockSpec] = {}
        fixed = self.fixed_blocks()
        for b in fixed[:-1]:
            seen.setdefault(b.key, b)
        for layer in self.layers():
            for token in layer.candidates:
                b = layer.block(token, precision)
                if b is not None:
                    seen.setdefault(b.key, b)
        seen.setdefault(fixed[-1].key, fixed[-1])
        return tuple(seen.values())

    def arch_blocks(self, arch: Arch) -> tuple[BlockSpec, ...]:
        """The blocks of one network, in order (skipped layers contribute nothing)."""
        self.validate(arch)
        fixed = self.fixed_blocks()
        body = [layer.block(t) for layer, t in zip(self.layers(), arch.choices, strict=True)]
        return fixed[:-1] + tuple(b for b in body if b is not None) + fixed[-1:]

    # ------------------------------------------------------------- architectures
    def validate(self, arch: Arch) -> Arch:
        """Raise ArchError naming the first token that does not fit this space."""
        if arch.space != self.name:
            raise ArchError(f"architecture is for space {arch.space!r}, not {self.name!r}")
        got = tuple(len(s) for s in arch.stages)
        if got != self.depths:
            raise ArchError(
                f"{arch.encode()!r}: space {self.name!r} has stages of depths "
                f"{'-'.join(map(str, self.depths))}, got {'-'.join(map(str, got))}"
            )
        for layer, token in zip(self.layers(), arch.choices, strict=True):
            if token not in layer.candidates:
                raise ArchError(
                    f"{arch.encode()!r}: token {token!r} at stage {layer.stage + 1}, layer "
                    f"{layer.position + 1} is not allowed here; choose one of "
                    f"{', '.join(layer.candidates)}"
                )
        return arch

    def decode(self, text: str) -> Arch:
        """Parse an architecture string; a bare token list (no 'space:') is taken as this space."""
        if ":" not in text:
            text = f"{self.name}:{text}"
        return self.validate(Arch.decode(text))

    def uniform(self, token: str) -> Arch:
        """Every layer `token` (where a layer cannot take it, its first candidate)."""
        flat = [
            token if token in layer.candidates else layer.candidates[0] for layer in self.layers()
        ]
        return Arch.from_flat(self.name, flat, list(self.depths))

    def sample(self, rng: random.Random) -> Arch:
        flat = [rng.choice(layer.candidates) for layer in self.layers()]
        return Arch.from_flat(self.name, flat, list(self.depths))

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.1) -> Arch:
        self.validate(arch)
        flat = [
            rng.choice(layer.candidates) if rng.random() < prob else token
            for layer, token in zip(self.layers(), arch.choices, strict=True)
        ]
        return Arch.from_flat(self.name, flat, list(self.depths))

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        self.validate(a)
        self.validate(b)
        flat = [x if rng.random() < 0.5 else y for x, y in zip(a.choices, b.choices, strict=True)]
        return Arch.from_flat(self.name, flat, list(self.depths))

    def size(self) -> int:
        """Number of distinct architectures."""
        n = 1
        for layer in self.layers():
            n *= len(layer.candidates)
        return n

    # ------------------------------------------------------------- variants / identity
    def scaled(self, mult: float) -> SearchSpace:
        """The same layout with every width multiplied by `mult` (rounded to multiples of 8)."""
        if mult <= 0:
            raise SpaceError(f"width multiplier must be positive, got {mult}")
        base = re.sub(r"-w[0-9.]+$", "", self.name)

        def w(c: int) -> int:
            return _make_divisible(c * mult)

        return replace(
            self,
            name=f"{base}-w{mult:g}",
            stem=w(self.stem),
            first=w(self.first) if self.first else 0,
            stages=tuple(Stage(w(s.width), s.depth, s.stride) for s in self.stages),
            head=w(self.head) if mult > 1 else self.head,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        data = dict(data)
        data["stages"] = tuple(Stage(**s) for s in data["stages"])
        for key in ("input_shape", "kernels", "expansions"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _layers(space: SearchSpace) -> tuple[Layer, ...]:
    out: list[Layer] = []
    first = space.first_block()
    prev = first if first is not None else space.stem_block()
    cin, h, w = prev.cout, prev.out_h, prev.out_w
    mb_ops = tuple(make_token(k, e) for k in space.kernels for e in space.expansions)
    for si, stage in enumerate(space.stages):
        for pi in range(stage.depth):
            stride = stage.stride if pi == 0 else 1
            skip_ok = space.allow_skip and stride == 1 and cin == stage.width
            cands = mb_ops + ((SKIP,) if skip_ok else ())
            out.append(Layer(len(out), si, pi, cin, stage.width, stride, h, w, cands))
            cin, h, w = stage.width, conv_out(h, 3, stride), conv_out(w, 3, stride)
    return tuple(out)


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
    if space.name in _REGISTRY and _REGISTRY[space.name] != space:
        raise SpaceError(f"a different space named {space.name!r} is already registered")
    _REGISTRY[space.name] = space
    return space


def get_space(name: str | SearchSpace) -> SearchSpace:
    """Look up a registered space by name; `NAME-w<mult>` scales a registered space's widths."""
    if isinstance(name, SearchSpace):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    m = re.match(r"^(?P<base>.+)-w(?P<mult>[0-9]*\.?[0-9]+)$", name or "")
    if m and m.group("base") in _REGISTRY:
        return _REGISTRY[m.group("base")].scaled(float(m.group("mult")))
    raise SpaceError(
        f"unknown search space {name!r}; known spaces: {', '.join(sorted(_REGISTRY))} "
        "(append -w<mult> to scale widths, e.g. tiny-w0.5)"
    )


def list_spaces() -> Iterator[SearchSpace]:
    yield from (_REGISTRY[k] for k in sorted(_REGISTRY))


def _proxyless(name: str, stem: int, first: int, widths: tuple[int, ...], head: int) -> SearchSpace:
    depths, strides = (4, 4, 4, 4, 4, 1), (2, 2, 2, 1, 2, 1)
    stages = tuple(Stage(w, d, s) for w, d, s in zip(widths, depths, strides, strict=True))
    return SearchSpace(name, (3, 224, 224), stem, 2, first, stages, head, 1000)


register_space(_proxyless("proxyless", 32, 16, (32, 40, 80, 96, 192, 320), 1280))
register_space(_proxyless("proxyless-cpu", 40, 24, (32, 48, 88, 104, 216, 360), 1432))
register_space(_proxyless("proxyless-gpu", 40, 24, (32, 56, 112, 128, 256, 432), 1728))
register_space(
    SearchSpace(
        "tiny",
        (1, 28, 28),
        stem=16,
        stem_stride=2,
        first=8,
        stages=(Stage(16, 2, 2), Stage(24, 2, 1), Stage(32, 2, 2)),
        head=128,
        num_classes=10,
    )
)
