"""Analytic schedules: every kernel scheduled from the target alone, correct on each ISA."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm_helpers import run_built

from codesign.blocks import BlockSpec
from codesign.modules import build_block, build_network, init_weights, randomize_bn
from codesign.targets import parse_target
from codesign.tvm_backend.build import compile_module, prepare
from codesign.tvm_backend.lower import lower_module
from codesign.tvm_backend.schedules import Loop, analytic_database, tile_decisions


def _host_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@settings(max_examples=200, deadline=None)
@given(
    extents=st.lists(st.integers(1, 600), min_size=2, max_size=7),
    spatial=st.lists(st.booleans(), min_size=7, max_size=7),
    lanes=st.sampled_from([1, 4, 8, 16]),
    tensorized=st.booleans(),
)
def test_tile_decisions_split_every_loop_exactly(extents, spatial, lanes, tensorized) -> None:
    loops = [Loop(e, s) for e, s in zip(extents, spatial, strict=False)]
    tiles = tile_decisions(loops, lanes, 32, tensorized=tensorized)
    for loop, factors in zip(loops, tiles, strict=True):
        assert math.prod(factors) == loop.extent
        assert len(factors) == (4 if loop.spatial else 2)


def test_channel_axis_gets_whole_vectors() -> None:
    # NHWC 1x1 convolution 28x28x192 -> 40 and -> 96 (loops n h w c, rh rw rc)
    def conv(c: int) -> list[Loop]:
        return [Loop(1, True), Loop(28, True), Loop(28, True), Loop(c, True)] + [
            Loop(1, False),
            Loop(1, False),
            Loop(192, False),
        ]

    wide = tile_decisions(conv(96), 16, 32)
    assert wide[3][-1] % 16 == 0 and wide[6] == (1, 192)  # vectors of 16, reduction whole
    narrow = tile_decisions(conv(40), 16, 32)
    assert narrow[3][-1] == 8 and narrow[2][-1] >= 7  # half a vector, many pixels


def test_every_large_kernel_of_a_network_is_scheduled(tiny, x86) -> None:
    from tvm.s_tir import meta_schedule as ms

    net = build_network(tiny, tiny.uniform("k3e6"), seed=0).eval()
    fused = prepare(lower_module(net, (1, *tiny.input_shape)).mod)
    tasks = ms.relax_integration.extract_tasks(fused, x86.tvm_target())
    database = analytic_database(fused, x86)
    scheduled = [t.task_name for t in tasks if database.has_workload(t.dispatched[0])]
    convs = [t.task_name for t in tasks if "conv2d" in t.task_name or "matmul" in t.task_name]
    assert set(convs) <= set(scheduled), set(convs) - set(scheduled)


def test_a_block_compiles_to_the_same_library_every_time(x86, tmp_path: Path) -> None:
    """The analytic schedules are deterministic: before their design spaces were seeded, one
    network compiled to different code in every process (and every call), and ran 91-152 us
    from one process to the next."""
    from codesign.tvm_backend.build import export_library
    from codesign.tvm_backend.lower import lower_block

    low = lower_block(BlockSpec.mb(7, 6, 16, 16, 1, 14), seed=0, target=x86)
    libs = [
        export_library(compile_module(low, x86).executable, x86, tmp_path / f"{i}.so").read_bytes()
        for i in range(2)
    ]
    assert libs[0] == libs[1]


BLOCKS = [
    BlockSpec.mb(3, 6, 16, 16, 1, 14),  # residual
    BlockSpec.mb(7, 3, 16, 24, 2, 14),  # stride 2, 24 channels (not a vector multiple)
    BlockSpec("mb", 5, 24, 24, 1, 7, 7, mid=50),  # pruned width
    BlockSpec("conv", 3, 1, 16, 1, 28, 28),  # stem
    BlockSpec("head", 1, 32, 10, 1, 7, 7, mid=128),  # 1x1 conv, pooling, dense
]
ISAS = {"avx2": "x86:mcpu=haswell", "avx512f": "x86:mcpu=skylake-avx512"}


@pytest.mark.parametrize("isa", sorted(ISAS))
def test_scheduled_blocks_equal_torch_on_each_isa(isa: str) -> None:
    """AVX2 and AVX-512 schedules (different register tiles) compute PyTorch's outputs; a
    host without the ISA still compiles them."""
    target = parse_target(ISAS[isa])
    for spec in BLOCKS:
        module = randomize_bn(init_weights(build_block(spec), seed=3), seed=4).eval()
        built = compile_module(lower_module(module, spec.input_shape), target)
        if isa not in _host_flags():
            continue
        x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run_built(built, x), ref, rtol=1e-4, atol=1e-4, err_msg=spec.key)
