"""`BlockSpec`: one concrete block of a network, the unit the latency table measures.

A block is fully determined by its kind, shapes and precision, so two layers of different
networks that share a BlockSpec share one LUT entry. Every BlockSpec has a stable, readable
string key that round-trips through `BlockSpec.from_key`:

    mb_k5_e6_i32_o32_s1_h28_w28     inverted residual, kernel 5, expansion 6
    mb_k3_e1_i32_o16_s1_h112_w112   expansion 1: no expansion conv (MobileNetV2's first block)
    mb_k3_m150_i32_o32_s1_h28_w28   150 expanded channels (a pruned block; expansion conv present)
    conv_k3_i3_o32_s2_h224_w224     stem: conv + BN + ReLU6
    head_i320_m1280_o1000_h7_w7     1x1 conv to 1280 + ReLU6, global pool, linear to 1000 classes
    ..._int8 / ..._fp16             precision suffix; fp32 is the default and is not written
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from codesign.errors import BlockSpecError

KINDS = ("mb", "conv", "head")
PRECISIONS = ("fp32", "fp16", "int8")

_KEY_RE = {
    "mb": re.compile(
        r"^mb_k(?P<k>\d+)_(?:e(?P<e>\d+)|m(?P<m>\d+))_i(?P<i>\d+)_o(?P<o>\d+)"
        r"_s(?P<s>\d+)_h(?P<h>\d+)_w(?P<w>\d+)$"
    ),
    "conv": re.compile(
        r"^conv_k(?P<k>\d+)_i(?P<i>\d+)_o(?P<o>\d+)_s(?P<s>\d+)_h(?P<h>\d+)_w(?P<w>\d+)$"
    ),
    "head": re.compile(r"^head_i(?P<i>\d+)_m(?P<m>\d+)_o(?P<o>\d+)_h(?P<h>\d+)_w(?P<w>\d+)$"),
}


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a 'same'-padded convolution (padding = kernel // 2)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """One block: kind, kernel, channels (in / mid / out), stride, input size, precision.

    For `mb`, `mid` is the number of expanded channels and `expand` says whether an expansion
    1x1 conv exists (False only for expansion-1 blocks, where mid == cin). For `head`, `mid` is
    the feature-mix width and `cout` the number of classes. For `conv`, mid is unused (0).
    """

    kind: str
    kernel: int
    cin: int
    cout: int
    stride: int
    h: int
    w: int
    mid: int = 0
    expand: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BlockSpecError(f"unknown block kind {self.kind!r}; expected one of {KINDS}")
        if self.precision not in PRECISIONS:
            raise BlockSpecError(
                f"unknown precision {self.precision!r}; expected one of {PRECISIONS}"
            )
        for name in ("kernel", "cin", "cout", "stride", "h", "w"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BlockSpecError(f"{name} must be a positive integer, got {value!r}")
        if self.kernel % 2 == 0:
            raise BlockSpecError(f"kernel must be odd, got {self.kernel}")
        if self.stride not in (1, 2):
            raise BlockSpecError(f"stride must be 1 or 2, got {self.stride}")
        if self.kind == "mb":
            if not isinstance(self.mid, int) or self.mid <= 0:
                raise BlockSpecError(f"mb block needs mid > 0 expanded channels, got {self.mid!r}")
            if not self.expand and self.mid != self.cin:
                raise BlockSpecError("an mb block without expansion conv must have mid == cin")
        elif self.kind == "head":
            if self.kernel != 1 or self.stride != 1:
                raise BlockSpecError("a head block is a 1x1 conv with stride 1")
            if not isinstance(self.mid, int) or self.mid <= 0:
                raise BlockSpecError(f"head block needs mid > 0 feature channels, got {self.mid!r}")
        elif self.mid != 0:
            raise BlockSpecError("a conv block has no mid channels (mid must be 0)")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def mb(
        cls,
        kernel: int,
        expansion: int,
        cin: int,
        cout: int,
        stride: int,
        h: int,
        w: int | None = None,
        precision: str = "fp32",
    ) -> BlockSpec:
        """An inverted residual with mid = cin * expansion (expansion 1: no expansion conv)."""
        if expansion < 1:
            raise BlockSpecError(f"expansion must be >= 1, got {expansion}")
        return cls(
            "mb",
            kernel,
            cin,
            cout,
            stride,
            h,
            h if w is None else w,
            mid=cin * expansion,
            expand=expansion != 1,
            precision=precision,
        )

    # ----------------------------------------------------------------- derived values
    @property
    def out_h(self) -> int:
        return 1 if self.kind == "head" else conv_out(self.h, self.kernel, self.stride)

    @property
    def out_w(self) -> int:
        return 1 if self.kind == "head" else conv_out(self.w, self.kernel, self.stride)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.cin, self.h, self.w)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.kind == "head":
            return (1, self.cout)
        return (1, self.cout, self.out_h, self.out_w)

    @property
    def residual(self) -> bool:
        """An identity shortcut is used when shapes allow it (stride 1, cin == cout)."""
        return self.kind == "mb" and self.stride == 1 and self.cin == self.cout

    @property
    def expansion(self) -> float:
        return self.mid / self.cin if self.kind == "mb" else 1.0

    @property
    def key(self) -> str:
        if self.kind == "mb":
            if not self.expand:
                width = "e1"
            elif self.mid % self.cin == 0 and self.mid // self.cin > 1:
                width = f"e{self.mid // self.cin}"
            else:
                width = f"m{self.mid}"
            key = (
                f"mb_k{self.kernel}_{width}_i{self.cin}_o{self.cout}"
                f"_s{self.stride}_h{self.h}_w{self.w}"
            )
        elif self.kind == "conv":
            key = f"conv_k{self.kernel}_i{self.cin}_o{self.cout}_s{self.stride}_h{self.h}_w{self.w}"
        else:
            key = f"head_i{self.cin}_m{self.mid}_o{self.cout}_h{self.h}_w{self.w}"
        return key if self.precision == "fp32" else f"{key}_{self.precision}"

    def __str__(self) -> str:
        return self.key

    def with_precision(self, precision: str) -> BlockSpec:
        return BlockSpec(
            self.kind,
            self.kernel,
            self.cin,
            self.cout,
            self.stride,
            self.h,
            self.w,
            self.mid,
            self.expand,
            precision,
        )

    # ----------------------------------------------------------------- cost figures
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass (batch 1)."""
        ho, wo = self.out_h, self.out_w
        if self.kind == "conv":
            return ho * wo * self.cout * self.cin * self.kernel**2
        if self.kind == "head":
            return self.h * self.w * self.cin * self.mid + self.mid * self.cout
        expand = self.h * self.w * self.cin * self.mid if self.expand else 0
        return expand + ho * wo * self.mid * self.kernel**2 + ho * wo * self.mid * self.cout

    def params(self) -> int:
        """Parameters after BatchNorm folding (weights + biases)."""
        if self.kind == "conv":
            return self.cin * self.cout * self.kernel**2 + self.cout
        if self.kind == "head":
            return self.cin * self.mid + self.mid + self.mid * self.cout + self.cout
        expand = self.cin * self.mid + self.mid if self.expand else 0
        return expand + self.mid * self.kernel**2 + self.mid + self.mid * self.cout + self.cout

    def activation_elems(self) -> int:
        """Elements of every tensor the block reads or writes (input, intermediates, output)."""
        hw_in, hw_out = self.h * self.w, self.out_h * self.out_w
        if self.kind == "conv":
            return self.cin * hw_in + self.cout * hw_out
        if self.kind == "head":
            return self.cin * hw_in + self.mid * hw_in + self.mid + self.cout
        expanded = self.mid * hw_in if self.expand else 0
        return self.cin * hw_in + expanded + self.mid * hw_out + self.cout * hw_out

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockSpec:
        try:
            return cls(**data)
        except TypeError as err:
            raise BlockSpecError(f"not a BlockSpec dict: {err}") from None

    @classmethod
    def from_key(cls, key: str) -> BlockSpec:
        """Parse a key written by `BlockSpec.key`; raises BlockSpecError naming what is wrong."""
        if not isinstance(key, str) or not key:
            raise BlockSpecError(f"empty or non-string block key: {key!r}")
        body, precision = key, "fp32"
        for p in PRECISIONS[1:]:
            if key.endswith("_" + p):
                body, precision = key[: -len(p) - 1], p
        kind = body.split("_", 1)[0]
        pattern = _KEY_RE.get(kind)
        match = pattern.match(body) if pattern else None
        if match is None:
            raise BlockSpecError(
                f"malformed block key {key!r}; expected e.g. 'mb_k3_e6_i32_o32_s1_h28_w28', "
                "'conv_k3_i3_o32_s2_h224_w224' or 'head_i320_m1280_o1000_h7_w7'"
            )
        g: dict[str, Any] = {
            k: (int(v) if v is not None else None) for k, v in match.groupdict().items()
        }
        if kind == "conv":
            return cls("conv", g["k"], g["i"], g["o"], g["s"], g["h"], g["w"], precision=precision)
        if kind == "head":
            return cls(
                "head", 1, g["i"], g["o"], 1, g["h"], g["w"], mid=g["m"], precision=precision
            )
        if g["e"] is not None:
            if g["e"] < 1:
                raise BlockSpecError(f"expansion must be >= 1 in {key!r}")
            return cls.mb(g["k"], g["e"], g["i"], g["o"], g["s"], g["h"], g["w"], precision)
        return cls(
            "mb",
            g["k"],
            g["i"],
            g["o"],
            g["s"],
            g["h"],
            g["w"],
            mid=g["m"],
            expand=True,
            precision=precision,
        )
