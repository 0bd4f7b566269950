"""QuantPolicy: string and JSON round trips, clear errors, exact size, the target's menu."""

from __future__ import annotations

import dataclasses

import pytest

from codesign.blocks import BlockSpec
from codesign.compression.quant.layers import quant_layers
from codesign.compression.quant.policy import LayerBits, PolicyError, QuantPolicy
from codesign.tvm_backend.precision import PrecisionMenu, precision_menu

BLOCKS = (
    BlockSpec("conv", 3, 1, 8, 2, 16, 16),
    BlockSpec.mb(3, 2, 8, 8, 1, 8),  # expand, depthwise, project; residual
    BlockSpec("head", 1, 8, 10, 1, 8, 8, mid=16),
)
AVX2 = PrecisionMenu(
    "x86-test", ("fp32", "int8"), "avx2-pmaddubsw", "codesign_dot_8x4_avx2", 8, 4, 15
)
VNNI = PrecisionMenu(
    "x86-vnni", ("fp32", "fp16", "int8"), "avx512-vnni", "codesign_dot_16x4_vnni", 16, 4, 16
)


def test_layers_of_blocks():
    layers = quant_layers(BLOCKS)
    assert [ly.role for ly in layers] == [
        "conv", "expand", "depthwise", "project", "mix", "classifier",
    ]  # fmt: skip
    assert [ly.block for ly in layers] == [0, 1, 1, 1, 2, 2]
    assert layers[2].depthwise and layers[5].linear
    assert layers[0].weights == 8 * 1 * 9 and layers[2].weights == 16 * 9


def test_string_and_json_round_trip():
    text = "int8:w7a8_fp32:w4a32-w32a32-w3a32_int8:w6a8-w2a5"
    p = QuantPolicy.decode(text)
    assert p.encode() == text == str(p)
    assert p.precisions == ("int8", "fp32", "int8")
    assert p.layers[1] == LayerBits(4, 32)
    assert QuantPolicy.from_json(p.to_json()) == p
    assert QuantPolicy.from_dict(p.to_dict()) == p
    assert hash(p) == hash(QuantPolicy.decode(text))
    assert p.check(BLOCKS) is p
    assert [b.key.rsplit("_", 1)[-1] for b in p.apply(BLOCKS)] == ["int8", "w8", "int8"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("int4:w4a4", "precision"),
        ("int8:w7a8_fp32", "precision"),
        ("int8:w7x8", "bad token"),
        ("int8:w9a8", "weight bits"),
        ("int8:w7a32", "int8 needs"),
        ("fp32:w4a8", "a32"),
        ("fp32:w16a32", "2..8 or 32"),
    ],
)
def test_bad_strings_say_what_is_wrong(text, words):
    with pytest.raises(PolicyError, match=words):
        QuantPolicy.decode(text)


def test_bad_json_and_structure():
    with pytest.raises(PolicyError, match="invalid"):
        QuantPolicy.from_json("{not json")
    with pytest.raises(PolicyError, match="not a quantisation policy"):
        QuantPolicy.from_json('{"policy": "int8:w7a8"}')
    with pytest.raises(PolicyError, match="the network has 3 blocks"):
        QuantPolicy.decode("int8:w7a8_int8:w7a8").check(BLOCKS)


def test_derive_follows_the_menu():
    # on AVX2 (vpmaddubsw saturates at 15 bits), w8a8 cannot run int8: float block, 8-bit weights
    p = QuantPolicy.uniform(BLOCKS, 8, 8, AVX2)
    assert p.precisions == ("fp32",) * 3 and {lb.token for lb in p.layers} == {"w8a32"}
    p = QuantPolicy.uniform(BLOCKS, 7, 8, AVX2)
    assert p.precisions == ("int8",) * 3
    assert QuantPolicy.uniform(BLOCKS, 8, 8, VNNI).precisions == ("int8",) * 3
    assert QuantPolicy.uniform(BLOCKS, 32, 16, VNNI).precisions == ("fp32",) * 3
    mixed = QuantPolicy.derive(BLOCKS, [(6, 8), (4, 32), (5, 8), (5, 8), (3, 8), (8, 8)], AVX2)
    assert mixed.encode() == "int8:w6a8_fp32:w4a32-w5a32-w5a32_fp32:w3a32-w8a32"
    with pytest.raises(PolicyError, match="not exact"):
        QuantPolicy.decode("int8:w8a8_int8:w7a8-w7a8-w7a8_int8:w7a8-w7a8").check_menu(AVX2)
    with pytest.raises(PolicyError, match="not on the precision menu"):
        QuantPolicy.decode("fp16:w16a16_int8:w7a8-w7a8-w7a8_int8:w7a8-w7a8").check_menu(AVX2)
    # fp16 on the menu: float blocks whose bits fit 16 run in fp16, unless the mask says fp32
    spr = dataclasses.replace(VNNI, precisions=("fp32", "fp16", "int8"))
    assert QuantPolicy.uniform(BLOCKS, 16, 16, spr).precisions == ("fp16",) * 3
    masked = QuantPolicy.derive(BLOCKS, [(16, 16)] * 6, spr, None, [True, False, True])
    assert masked.encode() == "fp16:w16a16_fp32:w32a32-w32a32-w32a32_fp16:w16a16-w16a16"
    low = QuantPolicy.derive(BLOCKS, [(4, 16)] * 6, spr, [False] * 3, [False, True, True])
    assert low.encode() == "fp32:w4a32_fp16:w4a16-w4a16-w4a16_fp16:w4a16-w4a16"
    with pytest.raises(PolicyError, match="fp16 mask of 2"):
        QuantPolicy.derive(BLOCKS, [(16, 16)] * 6, spr, None, [True, False])


def test_size_is_exact():
    layers = quant_layers(BLOCKS)
    fp = QuantPolicy.uniform(BLOCKS, 32, 32, AVX2)
    n_w = sum(ly.weights for ly in layers)
    n_b = sum(ly.cout for ly in layers)
    assert fp.size_bits(layers) == 32 * (n_w + n_b)
    q = QuantPolicy.uniform(BLOCKS, 4, 8, AVX2)
    # 4-bit weights + fp32 bias + fp32 per-channel scale + (scale, zero point) per activation
    assert q.size_bits(layers) == 4 * n_w + 64 * n_b + 64 * len(layers)
    assert q.size_mb(BLOCKS) == q.size_bits(layers) / 8 / 2**20
    assert q.size_mb(BLOCKS) < fp.size_mb(BLOCKS)


def test_menu_of_this_cpu_and_of_named_cpus():
    from codesign.targets import parse_target

    avx512 = precision_menu(parse_target("x86:mcpu=skylake-avx512"))
    assert avx512.int8_kernel == "avx512-pmaddubsw" and avx512.int8_bits_sum == 15
    vnni = precision_menu(parse_target("x86:mcpu=cascadelake"))
    assert vnni.int8_intrin == "codesign_dot_16x4_vnni" and vnni.int8_exact(8, 8)
    zen2 = precision_menu(parse_target("x86:mcpu=znver2"))
    assert zen2.precisions == ("fp32", "int8") and zen2.int8_lanes == 8
    assert not zen2.int8_exact(8, 8) and zen2.int8_exact(7, 8)
    assert any("F16C" in n for n in zen2.notes)  # fp16 is not offered: conversion only
    assert PrecisionMenu.from_dict(zen2.to_dict()) == zen2
