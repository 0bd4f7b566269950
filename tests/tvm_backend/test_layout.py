"""NHWC layout: lowered modules run their convolutions in NHWC/OHWI with the epilogue fused,
blocks take and return NHWC between blocks without transpose kernels, and outputs still equal
PyTorch's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tvm_helpers import run_built

from codesign.blocks import BlockSpec
from codesign.modules import build_block, init_weights, randomize_bn
from codesign.tvm_backend.build import compile_module, prepare
from codesign.tvm_backend.layout import NCHW_TO_NHWC
from codesign.tvm_backend.lower import block_interface, lower_block, lower_module
from codesign.tvm_backend.tuning import extract_tasks

TRANSPOSE_ONLY = re.compile(r"^(fused_)?(transpose\d*_?)+$")


@pytest.mark.parametrize(
    "spec",
    [
        BlockSpec.mb(3, 6, 16, 16, 1, 14),  # residual
        BlockSpec.mb(5, 3, 16, 24, 2, 14),  # stride 2
        BlockSpec("conv", 3, 1, 16, 1, 28, 28),  # stem: NCHW image in, NHWC out
        BlockSpec("head", 1, 32, 10, 1, 7, 7, mid=128),  # NHWC in, class scores out
    ],
    ids=lambda s: s.key,
)
@pytest.mark.parametrize("params_as_input", [False, True], ids=["embedded", "params-input"])
def test_block_runs_nhwc_between_blocks(spec: BlockSpec, params_as_input: bool, x86) -> None:
    module = randomize_bn(init_weights(build_block(spec), seed=3), seed=4).eval()
    io = block_interface(spec)
    low = lower_module(module, spec.input_shape, params_as_input=params_as_input, **io)
    text = low.mod.script()
    assert 'data_layout="NCHW"' not in text and "R.clip" not in text
    names = [t.name for t in extract_tasks({"b": prepare(low.mod)}, x86).tasks]
    image = 0 if io["nhwc_in"] else 1  # the stem transposes the NCHW image, as networks do
    assert sum(bool(TRANSPOSE_ONLY.match(n)) for n in names) == image, names
    assert sum("conv2d" in n or "mean" in n or "matmul" in n for n in names) == len(names) - image

    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    if io["nhwc_in"]:
        x = x.transpose(NCHW_TO_NHWC).copy()
    if io["nhwc_out"]:
        ref = ref.transpose(NCHW_TO_NHWC)
    assert low.input_shape == x.shape
    np.testing.assert_allclose(run_built(compile_module(low, x86), x), ref, rtol=1e-4, atol=1e-4)


def test_int8_block_interface_has_no_transposes(x86) -> None:
    """An int8 block converts to NHWC itself; inside the NHWC interface its own transposes
    cancel against the interface's."""
    spec = BlockSpec.mb(3, 6, 16, 16, 1, 14).with_precision("int8")
    low = lower_block(spec, target=x86)
    assert low.input_shape == (1, 14, 14, 16)
    names = [t.name for t in extract_tasks({"b": prepare(low.mod)}, x86).tasks]
    assert not any("transpose" in n for n in names), names


def test_network_converts_once_at_the_input(tiny, x86) -> None:
    """A whole network keeps its NCHW input and transposes it once."""
    import random

    from codesign.modules import build_network

    net = build_network(tiny, tiny.sample(random.Random(3)), seed=1).eval()
    low = lower_module(net, (1, *tiny.input_shape))
    assert low.input_shape == (1, *tiny.input_shape)
    names = [t.name for t in extract_tasks({"n": prepare(low.mod)}, x86).tasks]
    assert sum("transpose" in n for n in names) == 1, names


def test_conversion_leaves_its_input_module_alone(monkeypatch) -> None:
    import codesign.tvm_backend.layout as layout

    spec = BlockSpec.mb(3, 6, 16, 16, 1, 14)
    module = init_weights(build_block(spec), seed=0).eval()
    with monkeypatch.context() as m:  # the NCHW module the importer produces
        m.setattr(layout, "to_nhwc", lambda mod: mod)
        nchw = lower_module(module, spec.input_shape).mod
    before = nchw.script()
    assert 'data_layout="NCHW"' in before
    out = layout.to_nhwc(layout.nhwc_interface(nchw, nhwc_in=True, nhwc_out=True))
    assert nchw.script() == before
    assert 'data_layout="NCHW"' not in out.script()
