"""Seed schedules: register tiles that fit the target's vector registers, measured once, and
compiled networks that compute what PyTorch computes with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tvm_helpers import run_built

from codesign.tvm_backend.seeds import ConvLoops, register_tiles, seed_budget, tilings


def _accumulators(t, lanes: int) -> int:
    return t.h[3] * t.w[3] * t.c[3] // lanes


def test_small_dense_windows_get_fewer_accumulators_on_avx512() -> None:
    def acc(loops: ConvLoops, lanes: int = 16, registers: int = 32) -> int:
        h3, w3, c3 = register_tiles(loops, lanes, registers)[0]
        return h3 * w3 * c3 // lanes

    assert acc(ConvLoops(1, 16, 16, 64, 3, 3, 64)) == 8  # ResNet-18 at 64 px, layer1
    assert acc(ConvLoops(1, 4, 4, 256, 3, 3, 256)) == 8
    assert acc(ConvLoops(1, 56, 56, 64, 3, 3, 64)) == 16  # a wide output keeps half
    assert acc(ConvLoops(1, 16, 16, 384, 1, 1, 64)) == 16  # 1x1: no window
    assert acc(ConvLoops(1, 16, 16, 192, 3, 3, 1)) == 16  # depthwise: no channel reduction
    assert acc(ConvLoops(1, 7, 7, 512, 3, 3, 512)) >= 12  # no 8-accumulator tile fits 7 columns
    assert acc(ConvLoops(1, 16, 16, 64, 3, 3, 64), 8, 16) == 8  # AVX2: half of 16, as before


@pytest.mark.parametrize(
    ("loops", "lanes", "registers"),
    [
        (ConvLoops(1, 28, 28, 40, 1, 1, 240), 8, 16),  # 1x1, AVX2
        (ConvLoops(1, 7, 7, 1152, 1, 1, 192), 16, 32),  # 1x1, AVX-512
        (ConvLoops(1, 56, 56, 192, 3, 3, 1), 8, 16),  # depthwise 3x3
    ],
)
def test_tilings_are_register_tiles_that_cover_the_loops(loops, lanes, registers) -> None:
    found = tilings(loops, 3, lanes, registers, 24, seed=0)
    assert 0 < len(found) <= 24 and len(set(found)) == len(found)
    for t in found:
        assert t.c[3] % lanes == 0  # whole vectors of output channels
        assert 2 <= _accumulators(t, lanes) <= registers - 4  # room for weights and input
        for tile, extent in ((t.h, loops.h), (t.w, loops.w), (t.c, loops.c)):
            assert math.prod(tile) == extent
        assert math.prod(t.rh) == loops.rh and math.prod(t.rw) == loops.rw
        assert math.prod(t.rc) == loops.rc
        assert 0 <= t.sketch < 3 and t.unroll in (1, 2, 3)
    # best guess first: as close to half the registers accumulating as the shapes allow
    gaps = [abs(_accumulators(t, lanes) - registers // 2) for t in found]
    assert gaps[0] == min(gaps) <= 2
    assert tilings(loops, 3, lanes, registers, 24, seed=0) == found  # seeded
    assert tilings(loops, 3, lanes, registers, 24, seed=1) != found


def test_no_tiling_where_channels_do_not_fill_a_vector() -> None:
    assert tilings(ConvLoops(1, 28, 28, 40, 1, 1, 240), 3, 16, 32, 8, seed=0) == []
    assert seed_budget(1) == 0 and seed_budget(32) == 16 and seed_budget(4096) == 64


def test_only_float_convolutions_are_seeded(block_tasks, x86) -> None:
    import tvm
    from tvm.script import tirx as T

    from codesign.tvm_backend.seeds import conv_loops, seed_schedules

    ts, _ = block_tasks
    loops = [conv_loops(t.mod) for t in ts.tasks]
    assert {(lp.rh, lp.rc) for lp in loops} == {(1, 16), (3, 1), (1, 96)}  # expand, dw, project
    assert all(lp.h == lp.w == 14 for lp in loops)

    @T.prim_func(s_tir=True)
    def add(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")) -> None:
        for i in range(64):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    other = tvm.IRModule({"main": add})
    assert conv_loops(other) is None and seed_schedules(other, x86, 4) == []


def test_seeds_are_measured_once_and_compute_what_pytorch_computes(
    block_tasks, mb_block, x86
) -> None:
    import torch
    from tvm.s_tir import meta_schedule as ms

    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.layout import NCHW_TO_NHWC
    from codesign.tvm_backend.ms_runner import fastest_of_repeats
    from codesign.tvm_backend.seeds import measure_seeds
    from codesign.tvm_backend.tuning import fast_build, import_intrinsics

    ts, db = block_tasks
    import_intrinsics()
    mods = [t.mod for t in ts.tasks]

    def broken_build(mod, target, params):  # noqa: ANN001, ANN202
        raise RuntimeError("no compiler here")

    def seed(f_build=fast_build) -> dict[int, int]:  # noqa: ANN001
        builder = ms.builder.LocalBuilder(f_build=f_build)
        return measure_seeds(
            mods, x86, db, per_task=3, builder=builder, runner=fastest_of_repeats()
        )

    # seeds that all failed (a broken build, a farm server gone) are not marked: tried again
    assert seed(broken_build) == {0: 3, 1: 3, 2: 3}
    assert all(db.valid_count(m) == 0 for m in mods)
    assert not any(db.run_finished(f"seeds:{db.task_hash(m)}") for m in mods)
    assert seed() == {0: 3, 1: 3, 2: 3}
    assert all(1 <= db.valid_count(m) <= 3 for m in mods)
    assert seed() == {}  # recorded per task: not measured again
    spec, module, lowered = mb_block
    built = compile_module(lowered, x86, db)  # every kernel from a seed record
    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy().transpose(NCHW_TO_NHWC)
    got = run_built(built, x.transpose(NCHW_TO_NHWC).copy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~25 s; test_seeds_are_measured_once_and_compute_what_pytorch_computes seeds by default
def test_tuning_spends_half_its_budget_on_seeds(block_tasks, x86) -> None:
    from codesign.tvm_backend.tuning import tune

    ts, db = block_tasks
    report = tune(ts, x86, db, trials_per_task=4)
    assert report.tuned_tasks == 3 and report.trials == 12
    for task in ts.tasks:
        assert db.run_finished(f"seeds:{db.task_hash(task.mod)}")
        assert 2 <= db.valid_count(task.mod) <= 4  # 2 seeds + 2 search trials (minus failures)
