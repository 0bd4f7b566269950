from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codesign.blocks import BlockSpec
from codesign.errors import BlockSpecError

odd = st.sampled_from([1, 3, 5, 7])
pos = st.integers(1, 512)
hw = st.integers(1, 224)
stride = st.sampled_from([1, 2])
prec = st.sampled_from(["fp32", "fp16", "int8"])


@st.composite
def specs(draw) -> BlockSpec:
    kind = draw(st.sampled_from(["mb", "conv", "head"]))
    cin, cout, h, w = draw(pos), draw(pos), draw(hw), draw(hw)
    if kind == "conv":
        return BlockSpec("conv", draw(odd), cin, cout, draw(stride), h, w, precision=draw(prec))
    if kind == "head":
        return BlockSpec("head", 1, cin, cout, 1, h, w, mid=draw(pos), precision=draw(prec))
    expand = draw(st.booleans())
    mid = draw(pos) if expand else cin
    return BlockSpec(
        "mb", draw(odd), cin, cout, draw(stride), h, w, mid=mid, expand=expand, precision=draw(prec)
    )


@given(specs())
def test_key_round_trip(spec: BlockSpec) -> None:
    assert BlockSpec.from_key(spec.key) == spec
    assert BlockSpec.from_dict(spec.to_dict()) == spec
    assert hash(BlockSpec.from_key(spec.key)) == hash(spec)


def test_readable_keys() -> None:
    assert BlockSpec.mb(5, 6, 32, 32, 1, 28).key == "mb_k5_e6_i32_o32_s1_h28_w28"
    assert BlockSpec.mb(3, 1, 32, 16, 1, 112).key == "mb_k3_e1_i32_o16_s1_h112_w112"
    pruned = BlockSpec("mb", 3, 32, 32, 1, 28, 28, mid=150)
    assert pruned.key == "mb_k3_m150_i32_o32_s1_h28_w28"
    # mid == cin but the expansion conv is present (pruned): distinct from expansion 1
    assert BlockSpec("mb", 3, 32, 32, 1, 28, 28, mid=32).key == "mb_k3_m32_i32_o32_s1_h28_w28"
    assert BlockSpec.mb(3, 6, 16, 24, 2, 56).with_precision("int8").key.endswith("_int8")


def test_shapes_and_residual() -> None:
    b = BlockSpec.mb(7, 3, 24, 24, 1, 56)
    assert b.residual and b.output_shape == (1, 24, 56, 56)
    b = BlockSpec.mb(5, 6, 24, 40, 2, 56)
    assert not b.residual and b.output_shape == (1, 40, 28, 28)
    assert BlockSpec("conv", 3, 3, 32, 2, 225, 225).output_shape == (1, 32, 113, 113)
    assert BlockSpec("head", 1, 320, 1000, 1, 7, 7, mid=1280).output_shape == (1, 1000)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "mb_k3_e6_i32",
        "mb_k4_e6_i32_o32_s1_h28_w28",
        "mb_k3_e6_i32_o32_s3_h28_w28",
        "mb_k3_e0_i32_o32_s1_h28_w28",
        "xx_k3",
        "conv_k3_i3_o32_s2_h224_w224_int4",
        "head_i320_m0_o1000_h7_w7",
    ],
)
def test_malformed_keys_raise(bad: str) -> None:
    with pytest.raises(BlockSpecError):
        BlockSpec.from_key(bad)


def test_invalid_fields_raise() -> None:
    with pytest.raises(BlockSpecError, match="kind"):
        BlockSpec("dw", 3, 1, 1, 1, 1, 1)
    with pytest.raises(BlockSpecError, match="mid == cin"):
        BlockSpec("mb", 3, 16, 16, 1, 8, 8, mid=32, expand=False)
    with pytest.raises(BlockSpecError, match="positive"):
        BlockSpec("conv", 3, 0, 16, 1, 8, 8)
