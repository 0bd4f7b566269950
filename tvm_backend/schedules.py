"""Analytic schedules: every CPU kernel scheduled from the target alone, with no measurement.

TVM 0.27 has no CPU counterpart of its GPU default schedules (DLight): a kernel that nobody
tuned compiles as a naive loop nest, 26x slower than ONNX Runtime on MobileNetV2-224. ONNX
Runtime and OpenVINO need no search either: they block analytically, keep a register tile of
accumulators and vectorise the channel axis. This module does the same inside MetaSchedule's own
design spaces (the sketches, schedule rules and postprocessors that tuning explores), choosing
every sampled decision from the target instead of at random:

    register tile   the innermost spatial axis (NHWC: output channels) in one or two vectors,
                    the axes before it (output pixels) as rows, about half the vector
                    registers as accumulators (`seeds.register_tiles` for convolutions)
    reduction       kept whole inside the register tile (64 at a time when longer than 512)
    outer loops     all outer factors in the outermost loop, which the postprocessor fuses and
                    parallelises over the target's threads
    unrolling       64 (MetaSchedule's choices are 0, 16, 64, 512); compute locations: the
                    sketch's own
    int8 convs      the tensorizing space tuning uses (`intrin.int8_space`: VNNI or AVX2 dot
                    products), the register tile counted in the intrinsic's output vectors

Each schedule becomes an ordinary MetaSchedule record (`analytic_database`) that the compile
recipe applies to every task the tuning database has no record for, so tuning only ever replaces
an analytic schedule with one that measured faster. A task none of whose sketches passes the
postprocessors keeps TVM's default lowering (slow, still correct).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from codesign.targets import Target

UNROLL_CHOICES = [0, 16, 64, 512]  # MetaSchedule's CPU unroll steps (a SampleCategorical)
UNROLL_64 = 2  # the index of 64 in them
REDUCTION_WHOLE = 512  # reductions up to this length stay whole inside the register tile
SPATIAL_LEVELS = 4  # MetaSchedule's CPU multi-level tiling: SSRSRS
# Kernels with less work than this (multiply-adds, or elements moved) run on one thread: waking
# the pool costs more than it saves (tiny-space kernels of 20-100k MACs ran 2-5x slower
# parallel than serial on a 2-vCPU Xeon).
PARALLEL_MIN_WORK = 1 << 17
PARALLEL_KEY = "meta_schedule.parallel"
# The run time an analytic record carries (MemoryDatabase serves only records with one); it is
# never compared with measured records: analytic ones live in a database of their own.
NOT_MEASURED_S = 1.0
# The random state of the design spaces (`design_context`): any fixed value makes the analytic
# schedules, and so every compiled module, the same in every process.
DESIGN_SEED = 1


@dataclass(frozen=True, slots=True)
class Loop:
    """One loop a tiling splits: its extent and whether it is spatial (else a reduction)."""

    extent: int
    spatial: bool


def divisors(n: int, most: int) -> list[int]:
    """The divisors of `n` up to `most`, ascending."""
    return [d for d in range(1, min(n, most) + 1) if n % d == 0]


def tile_decisions(
    loops: list[Loop], lanes: int, registers: int, *, tensorized: bool = False
) -> list[tuple[int, ...]]:
    """The split factors of every loop of a multi-level tiling, outermost level first.

    `tensorized`: the loops are those around a dot-product intrinsic (int8), whose channel loop
    counts output vectors; its register tile keeps the channel vectors one level out (the
    innermost loop is vectorised, and the intrinsic's vectors cannot be widened again)."""
    from codesign.tvm_backend.seeds import ConvLoops, register_tiles

    spatial = [i for i, lp in enumerate(loops) if lp.spatial]
    inner = dict.fromkeys(range(len(loops)), 1)
    reduction = [lp.extent for lp in loops if not lp.spatial]
    if len(spatial) == 4 and len(reduction) == 3:  # an NHWC convolution: n h w c, rh rw rc
        conv = ConvLoops(*(loops[i].extent for i in spatial), *reduction)
        tiles = register_tiles(conv, lanes, registers)
        if tiles:
            inner[spatial[1]], inner[spatial[2]], inner[spatial[3]] = tiles[0]
    if spatial and inner[spatial[-1]] == 1:
        last = spatial[-1]
        ext = loops[last].extent
        if ext % lanes == 0:
            inner[last] = 2 * lanes if ext % (2 * lanes) == 0 else lanes
        else:  # 40 or 24 channels: a power-of-two part of a vector, many rows (measured:
            # 28x28x192->40 ran 108 us with 8 channels x 14 pixels, 2.2 ms with 20 x 7)
            inner[last] = math.gcd(ext, lanes)
        if len(spatial) > 1:
            rows = max(1, (registers // 2) // max(1, inner[last] // lanes))
            prev = spatial[-2]
            inner[prev] = max(divisors(loops[prev].extent, min(rows, 14)))
    out: list[tuple[int, ...]] = []
    for i, lp in enumerate(loops):
        if tensorized and spatial and i == spatial[-1]:
            out.append((lp.extent // inner[i], 1, inner[i], 1))
        elif lp.spatial:
            out.append((lp.extent // inner[i], 1, 1, inner[i]))
        else:
            r = lp.extent if lp.extent <= REDUCTION_WHOLE else max(divisors(lp.extent, 64))
            out.append((lp.extent // r, r))
    return out


def _tiled_loops(sketch: Any, task_mod: Any) -> list[Loop]:
    """The loops that `sketch`'s SamplePerfectTile instructions split, in order."""
    from tvm import s_tir

    loops: list[Loop] = []
    sch = s_tir.Schedule(task_mod)

    def record(inst: Any, inputs: list[Any], attrs: list[Any], decision: Any) -> Any:
        if inst.kind.name == "SamplePerfectTile":
            levels = int(attrs[0])
            loops.append(Loop(int(sch.get(inputs[0]).extent), levels == SPATIAL_LEVELS))
        return decision

    sketch.trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=record)
    return loops


def analytic_schedule(
    task_mod: Any, target: Target, ctx: Any = None, sketches: list[Any] | None = None
) -> Any | None:
    """The analytic schedule of one tuning task (a `tvm.s_tir.Schedule`), or None when no
    sketch of the task's design space passes the postprocessors. `ctx` and `sketches` (its
    design space) may be passed by a caller that already generated them."""

    from codesign.tvm_backend.seeds import vector_shape

    ctx = ctx or design_context(task_mod, target)
    lanes, registers = vector_shape(target)
    if sketches is None:
        sketches = list(ctx.generate_design_space())
    # Multi-level tiling's second sketch accumulates the register tile in a local cache and
    # writes it back once (ReuseType "must"); the first accumulates in the output buffer, which
    # measured 5-10x slower with the same tiles. Prefer the second, fall back in order.
    order = sketches[1:2] + sketches[:1] + sketches[2:]
    for sketch in order:
        loops = _tiled_loops(sketch, task_mod)
        if loops and not any(lp.spatial for lp in loops):
            continue  # a reduction split across threads (rfactor): slower than the plain loop
        serial = _work(task_mod, loops) < PARALLEL_MIN_WORK
        if not loops and serial and _is_float32(task_mod):
            return None  # small data movement (pooling, transposes): the plain loops are fine
        # (not so for small int8 / fp16 conversions: quantizing a 16x32x32 input took 58 us
        # as plain loops, 10 us vectorised)
        # a tensorized (int8) sketch's channel loop counts the intrinsic's output vectors (16
        # int32 lanes for VNNI), so its register tile is sized in vectors
        tensorized = _tensorized(sketch)
        tiles = tile_decisions(loops, 1 if tensorized else lanes, registers, tensorized=tensorized)
        sch = _apply(sketch, task_mod, tiles, ctx, serial)
        if sch is not None and (_is_float32(task_mod) or _builds(sch, target)):
            return sch
    return None


def _apply(sketch: Any, task_mod: Any, tiles: list[tuple[int, ...]], ctx: Any, serial: bool) -> Any:
    """`sketch` with the tile factors `tiles` (in sample order), 64-step unrolling and the
    sketch's other decisions, postprocessed; None when a postprocessor rejects it."""
    from tvm import s_tir

    pending = iter(tiles)

    def choose(inst: Any, _inputs: list[Any], attrs: list[Any], decision: Any) -> Any:
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            return list(next(pending))
        if kind == "SampleCategorical" and [int(c) for c in attrs[0]] == UNROLL_CHOICES:
            return UNROLL_64
        return decision

    sch = s_tir.Schedule(task_mod)
    try:
        sketch.trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=choose)
        if serial:
            _serial(sch)
        sch.enter_postproc()
        if all(p.apply(sch) for p in ctx.space_generator.postprocs):
            return sch
    except Exception:  # noqa: BLE001 - a sketch these decisions do not fit: the caller moves on
        return None
    return None


def _tensorized(sketch: Any) -> bool:
    """Whether `sketch` computes its block with a tensor intrinsic (an int8 dot product)."""
    return any(
        i.kind.name == "Annotate" and str(i.attrs[0]) == "meta_schedule.auto_tensorize"
        for i in sketch.trace.insts
    )


def _is_float32(task_mod: Any) -> bool:
    from tvm.s_tir import meta_schedule as ms

    return all(a.dtype == "float32" for a in ms.arg_info.ArgInfo.from_prim_func(task_mod["main"]))


def _builds(sch: Any, target: Target) -> bool:
    """Whether LLVM code generation takes the schedule. Checked for int8 and fp16 kernels only:
    TVM's vectoriser rejects some of their widened accumulators at build time (`Cannot
    broadcast lanes=16 to 32`), after every postprocessor accepted them."""
    from codesign.tvm_backend.tuning import fast_build

    try:
        fast_build(sch.mod, target.tvm_target(), None)
    except Exception:  # noqa: BLE001 - any build error: the caller moves on
        return False
    return True


def design_context(task_mod: Any, target: Target) -> Any:
    """MetaSchedule's tuning context of a task for `target` (design space and postprocessors):
    the default space, or for an int8 convolution the tensorizing one tuning uses (`intrin`).

    Seeded: the sketches carry sampled decisions besides the tiles this module chooses (compute
    locations among them), and an unseeded context drew them anew in every process, so one
    network compiled to different code each time (EMR guest: the k7e6 `tiny` network ran
    91-152 us across fresh processes, its 1x1 kernels differing in size by up to 2.3x)."""
    from tvm.s_tir import meta_schedule as ms

    from codesign.tvm_backend.fast_import import import_intrinsics
    from codesign.tvm_backend.intrin import design_space

    import_intrinsics()
    return ms.TuneContext(
        mod=task_mod,
        target=target.tvm_target(),
        space_generator=design_space(task_mod, target),
        task_name="analytic",
        rand_state=DESIGN_SEED,
        num_threads=1,
    )


def _work(task_mod: Any, loops: list[Loop]) -> int:
    """Multiply-adds of a tiled kernel (its loops' product), else the elements it touches."""
    if loops:
        return math.prod(lp.extent for lp in loops)
    from tvm.s_tir import meta_schedule as ms

    args = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
    return sum(math.prod(int(d) for d in arg.shape) for arg in args)


def _serial(sch: Any) -> None:
    """Drop the parallel annotation that MetaSchedule's rule puts on the root block."""
    root = sch.get_sblock("root")
    if PARALLEL_KEY in sch.get(root).annotations:
        sch.unannotate(root, PARALLEL_KEY)


def schedule_kernels(fused: Any, target: Target, database: Any | None = None) -> Any:
    """`fused` with every kernel scheduled for a CPU `target`: the best record of `database`
    (tuned) where it has one, the analytic schedule elsewhere."""
    from tvm import relax

    tvm_target = target.tvm_target()
    if database is not None:
        with tvm_target, database:
            fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    with tvm_target, analytic_database(fused, target):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)


def analytic_database(fused: Any, target: Target) -> Any:
    """An in-memory MetaSchedule database holding the analytic schedule of every kernel of
    `fused` that is not scheduled yet."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord

    tvm_target = target.tvm_target()
    database = ms.database.MemoryDatabase()
    for task in ms.relax_integration.extract_tasks(fused, tvm_target):
        mod = task.dispatched[0]
        if mod["main"].attrs and mod["main"].attrs.get("tirx.is_scheduled", False):
            continue
        sch = analytic_schedule(mod, target)
        if sch is None:
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        workload = database.commit_workload(mod)
        database.commit_tuning_record(
            TuningRecord(sch.trace, workload, [NOT_MEASURED_S], tvm_target, args)
        )
    return database
