"""The precision menu of a target: which execution precisions its hardware runs fast.

Derived from the CPU features LLVM reports for the target's mcpu/mattr (not from the host's
name), so the menu follows the target, not the machine codesign runs on:

    x86 + avx512vnni   int8 on `vpdpbusd` (codesign's dot_16x4_vnni), exact for any 8x8 bits
    x86 + avx512bw     int8 on 512-bit `vpmaddubsw`+`vpmaddwd` (TVM's dot_16x4_avx512)
    x86 + avx2         int8 on 256-bit `vpmaddubsw`+`vpmaddwd` (codesign's dot_8x4_avx2)
    x86 + avx512fp16   fp16 (native half arithmetic); F16C alone only converts, so no fp16
    arm + fullfp16     fp16; cuda: fp16 (int8 convs are not offered there: no tensorized rule)

`vpmaddubsw` adds two u8 x s8 products into a *saturating* int16, so it is exact only when
2 * (2^a - 1) * (2^(w-1) - 1) <= 32767, i.e. activation bits + weight bits <= 15. The menu
records that limit (`int8_bits_sum`); VNNI accumulates in int32 and allows 16 (8 x 8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from codesign.targets import Target

FLOAT_BITS = {"fp32": 32, "fp16": 16}


@dataclass(frozen=True, slots=True)
class PrecisionMenu:
    target_key: str
    precisions: tuple[str, ...]  # always starts with "fp32"
    int8_kernel: str = ""  # e.g. "avx2-pmaddubsw"; "" when int8 is not on the menu
    int8_intrin: str = ""  # TVM TensorIntrin the int8 convolutions are tensorized with
    int8_lanes: int = 0  # output channels per intrinsic call (weights packed by this)
    int8_reduce: int = 4  # input channels per intrinsic call
    int8_bits_sum: int = 0  # largest w_bits + a_bits the kernel accumulates exactly
    features: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def has_int8(self) -> bool:
        return "int8" in self.precisions

    @property
    def float_precisions(self) -> tuple[str, ...]:
        """Float precisions on the menu, narrowest first."""
        return tuple(p for p in ("fp16", "fp32") if p in self.precisions)

    def int8_exact(self, w_bits: int, a_bits: int) -> bool:
        """Whether a layer with these bits runs exactly on the int8 kernel."""
        return (
            self.has_int8 and w_bits <= 8 and a_bits <= 8 and w_bits + a_bits <= self.int8_bits_sum
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionMenu:
        d = dict(d)
        for k in ("precisions", "features", "notes"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


_X86_KEYS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx512fp16", "amx-int8")


def precision_menu(target: Target) -> PrecisionMenu:
    """The menu of `target`, from LLVM's feature list for its TVM target."""
    from tvm.target import codegen

    tvm_target = target.tvm_target()
    if target.name == "cuda":
        return PrecisionMenu(
            target.key,
            ("fp32", "fp16"),
            notes=("int8 convolutions have no tensorized schedule rule for cuda here",),
        )
    features = set(codegen.llvm_get_cpu_features(tvm_target))
    if target.name == "arm":
        has_fp16 = "fullfp16" in features
        return PrecisionMenu(
            target.key,
            ("fp32", "fp16") if has_fp16 else ("fp32",),
            features=tuple(sorted(f for f in features if f in ("neon", "fullfp16", "dotprod"))),
            notes=("int8 lowering uses x86 u8 x s8 kernels; not offered on arm",),
        )
    notes = []
    precisions = ["fp32"]
    if "avx512fp16" in features:
        precisions.append("fp16")
    elif "f16c" in features:
        notes.append("fp16 not offered: F16C only converts; half arithmetic would be emulated")
    kernel = intrin = ""
    lanes = bits_sum = 0
    if "avx512vnni" in features:
        from codesign.tvm_backend.intrin import VNNI_DOT_16X4

        kernel, intrin, lanes, bits_sum = "avx512-vnni", VNNI_DOT_16X4, 16, 16
    elif "avx512bw" in features:
        kernel, intrin, lanes, bits_sum = "avx512-pmaddubsw", "dot_16x4_avx512", 16, 15
    elif "avx2" in features:
        from codesign.tvm_backend.intrin import AVX2_DOT_8X4

        kernel, intrin, lanes, bits_sum = "avx2-pmaddubsw", AVX2_DOT_8X4, 8, 15
        notes.append("int8 via 256-bit vpmaddubsw (int16 saturating pairs): w_bits + a_bits <= 15")
    else:
        notes.append("int8 not offered: no AVX2 / AVX-512 integer dot product")
    if kernel:
        precisions.append("int8")
    return PrecisionMenu(
        target.key,
        tuple(precisions),
        kernel,
        intrin,
        lanes,
        4,
        bits_sum,
        tuple(sorted(f for f in features if f in _X86_KEYS)),
        tuple(notes),
    )
