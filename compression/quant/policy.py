"""`QuantPolicy`: per-layer weight/activation bits and per-block execution precision.

Granularity: HAQ chooses bits per layer (weights and activations: accuracy and size); the
target executes whole blocks in one precision (latency). A block runs int8 when every layer
has <= 8 bits and the target's int8 kernel is exact for them (menu.int8_exact); otherwise it
runs in float (fp16 if on the menu and no layer asks for 32 bits, else fp32), its activations
unquantised and its weights stored at their bits (<= 8) or in float.

String form, blocks separated by '_', layers by '-', a layer as w<bits>a<bits>:

    int8:w8a8_int8:w7a8-w6a8-w5a8_fp32:w32a32-w4a32-w32a32_int8:w6a8-w6a8

Model size is exact: weights at their bits, plus fp32 biases, fp32 per-channel weight scales
for quantised weights and an fp32 scale + int32 zero point per quantised activation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codesign.blocks import PRECISIONS, BlockSpec
from codesign.compression.quant.layers import QLayer, layers_per_block, quant_layers
from codesign.errors import CodesignError
from codesign.tvm_backend.precision import FLOAT_BITS, PrecisionMenu

FORMAT = "codesign-quant-policy/1"
INT_BITS = tuple(range(2, 9))
MIB = 2**20
_LAYER_RE = re.compile(r"^w(\d+)a(\d+)$")


class PolicyError(CodesignError, ValueError):
    """A malformed quantisation policy, or one that does not fit the network or target."""


@dataclass(frozen=True, slots=True)
class LayerBits:
    w: int
    a: int

    def __post_init__(self) -> None:
        for name, v in (("weight", self.w), ("activation", self.a)):
            if v not in INT_BITS and v not in (16, 32):
                raise PolicyError(f"{name} bits must be 2..8, 16 or 32, got {v!r}")

    @property
    def token(self) -> str:
        return f"w{self.w}a{self.a}"

    @property
    def integer(self) -> bool:
        return self.w <= 8 and self.a <= 8


@dataclass(frozen=True, slots=True)
class QuantPolicy:
    """Per block: its execution precision and the bits of each of its layers."""

    precisions: tuple[str, ...]
    bits: tuple[tuple[LayerBits, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "bits", tuple(tuple(b) for b in self.bits))
        if len(self.precisions) != len(self.bits):
            raise PolicyError("a policy needs one precision per block of layer bits")
        for i, (p, layers) in enumerate(zip(self.precisions, self.bits, strict=True)):
            where = f"block {i + 1} ({p})"
            if p not in PRECISIONS:
                raise PolicyError(f"{where}: unknown precision; expected one of {PRECISIONS}")
            if not layers:
                raise PolicyError(f"{where}: no layers")
            for j, lb in enumerate(layers):
                if p == "int8" and not lb.integer:
                    raise PolicyError(f"{where}, layer {j + 1}: int8 needs <= 8 bits, {lb.token}")
                if p != "int8" and (lb.a != FLOAT_BITS[p] or lb.w not in (*INT_BITS, lb.a)):
                    raise PolicyError(
                        f"{where}, layer {j + 1}: a {p} block has a{FLOAT_BITS[p]} activations "
                        f"and weights of 2..8 or {FLOAT_BITS[p]} bits, got {lb.token}"
                    )

    # ------------------------------------------------------------ views
    @property
    def layers(self) -> tuple[LayerBits, ...]:
        """Bits of every layer, flattened in network order."""
        return tuple(lb for block in self.bits for lb in block)

    def layer_precisions(self) -> tuple[str, ...]:
        return tuple(p for p, block in zip(self.precisions, self.bits, strict=True) for _ in block)

    def check(self, blocks: Sequence[BlockSpec]) -> QuantPolicy:
        """Raise PolicyError unless this policy has the block/layer structure of `blocks`."""
        want = layers_per_block(blocks)
        got = tuple(len(b) for b in self.bits)
        if want != got:
            raise PolicyError(
                f"policy has {len(got)} blocks with {list(got)} layers; the network has "
                f"{len(want)} blocks with {list(want)} layers"
            )
        return self

    def check_menu(self, menu: PrecisionMenu) -> QuantPolicy:
        """Raise PolicyError unless the target runs every block as the policy says."""
        for i, (p, layers) in enumerate(zip(self.precisions, self.bits, strict=True)):
            if p not in menu.precisions:
                raise PolicyError(
                    f"block {i + 1} is {p}, not on the precision menu of {menu.target_key} "
                    f"({', '.join(menu.precisions)})"
                )
            bad = [lb.token for lb in layers if p == "int8" and not menu.int8_exact(lb.w, lb.a)]
            if bad:
                raise PolicyError(
                    f"block {i + 1}: {', '.join(bad)} is not exact on {menu.int8_kernel} "
                    f"(weight + activation bits must be <= {menu.int8_bits_sum})"
                )
        return self

    def apply(self, blocks: Sequence[BlockSpec]) -> tuple[BlockSpec, ...]:
        """`blocks` with the policy's execution precisions (their LUT keys)."""
        self.check(blocks)
        return tuple(b.with_precision(p) for b, p in zip(blocks, self.precisions, strict=True))

    # ------------------------------------------------------------ size
    def size_bits(self, layers: Sequence[QLayer]) -> int:
        if len(layers) != len(self.layers):
            raise PolicyError(f"{len(self.layers)} layer bits for {len(layers)} layers")
        total = 0
        for ly, lb in zip(layers, self.layers, strict=True):
            total += ly.weights * lb.w + 32 * ly.cout  # weights, bias
            if lb.w <= 8:
                total += 32 * ly.cout  # per-channel weight scales
            if lb.a <= 8:
                total += 64  # activation scale and zero point
        return total

    def size_mb(self, blocks: Sequence[BlockSpec]) -> float:
        """Exact model size in MiB (2^20 bytes)."""
        self.check(blocks)
        return self.size_bits(quant_layers(blocks)) / 8 / MIB

    # ------------------------------------------------------------ constructors
    @classmethod
    def derive(
        cls,
        blocks: Sequence[BlockSpec],
        bits: Sequence[tuple[int, int]],
        menu: PrecisionMenu,
        int8: Sequence[bool] | None = None,
        fp16: Sequence[bool] | None = None,
    ) -> QuantPolicy:
        """The policy the target executes for raw per-layer (w, a) bits (see module docstring).

        `int8` (per block) limits int8 execution to the blocks where it is wanted, e.g. where
        the LUT says int8 is faster than float; the others run in float with their weight bits.
        `fp16` (per block) likewise limits fp16 execution (e.g. to where it is measured faster
        than fp32); elsewhere a block whose bits fit 16 runs in fp32.
        """
        return cls.derive_units(layers_per_block(blocks), bits, menu, int8, fp16)

    @classmethod
    def derive_units(
        cls,
        counts: Sequence[int],
        bits: Sequence[tuple[int, int]],
        menu: PrecisionMenu,
        int8: Sequence[bool] | None = None,
        fp16: Sequence[bool] | None = None,
    ) -> QuantPolicy:
        """`derive` for units of execution precision given by their layer counts (a network
        without BlockSpecs: one unit per layer, `codesign.compression.quant.graph`)."""
        if len(bits) != sum(counts):
            raise PolicyError(f"{len(bits)} layer bits for a network of {sum(counts)} layers")
        for name, mask in (("int8", int8), ("fp16", fp16)):
            if mask is not None and len(mask) != len(counts):
                raise PolicyError(f"{name} mask of {len(mask)} for {len(counts)} blocks")
        precisions, out, i = [], [], 0
        for bi, n in enumerate(counts):
            raw = [tuple(int(v) for v in b) for b in bits[i : i + n]]
            i += n
            wanted = int8 is None or int8[bi]
            if wanted and all(menu.int8_exact(w, a) for w, a in raw):
                precisions.append("int8")
                out.append(tuple(LayerBits(w, a) for w, a in raw))
                continue
            half = "fp16" in menu.precisions and (fp16 is None or fp16[bi])
            fp = "fp16" if half and all(max(b) <= 16 for b in raw) else "fp32"
            f = FLOAT_BITS[fp]
            precisions.append(fp)
            out.append(tuple(LayerBits(w if w <= 8 else f, f) for w, _ in raw))
        return cls(tuple(precisions), tuple(out))

    @classmethod
    def uniform(
        cls, blocks: Sequence[BlockSpec], w: int, a: int, menu: PrecisionMenu
    ) -> QuantPolicy:
        """Every layer at (w, a) bits (32, 32: the float network)."""
        return cls.derive(blocks, [(w, a)] * len(quant_layers(blocks)), menu)

    # ------------------------------------------------------------ encoding
    def encode(self) -> str:
        return "_".join(
            f"{p}:" + "-".join(lb.token for lb in layers)
            for p, layers in zip(self.precisions, self.bits, strict=True)
        )

    def __str__(self) -> str:
        return self.encode()

    @classmethod
    def decode(cls, text: str) -> QuantPolicy:
        if not isinstance(text, str) or not text.strip():
            raise PolicyError("empty quantisation policy string")
        precisions, bits = [], []
        for i, part in enumerate(text.strip().split("_")):
            p, sep, body = part.partition(":")
            if not sep or p not in PRECISIONS:
                raise PolicyError(
                    f"block {i + 1} {part!r}: expected '<precision>:<layers>' with a precision "
                    f"of {', '.join(PRECISIONS)}, e.g. 'int8:w8a8-w6a8'"
                )
            layers = []
            for j, tok in enumerate(body.split("-")):
                m = _LAYER_RE.match(tok)
                if not m:
                    raise PolicyError(
                        f"block {i + 1}, layer {j + 1}: bad token {tok!r}; expected w<bits>a<bits>"
                    )
                try:
                    layers.append(LayerBits(int(m.group(1)), int(m.group(2))))
                except PolicyError as err:
                    raise PolicyError(f"block {i + 1}, layer {j + 1}: {err}") from None
            precisions.append(p)
            bits.append(tuple(layers))
        return cls(tuple(precisions), tuple(bits))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "policy": self.encode(),
            "precisions": list(self.precisions),
            "bits": [[[lb.w, lb.a] for lb in block] for block in self.bits],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPolicy:
        if not isinstance(d, dict) or d.get("format") != FORMAT or "policy" not in d:
            raise PolicyError(f"not a quantisation policy ({FORMAT}) record")
        return cls.decode(d["policy"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> QuantPolicy:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise PolicyError(f"quantisation policy JSON is invalid: {err}") from None
