"""Seed schedules: register-tiled convolution candidates, measured before the evolutionary search.

MetaSchedule samples tile sizes at random; at the budgets a CPU run affords (32-300 trials per
task) its cost model has little to learn from, and most measured candidates tile the loops in
ways LLVM cannot keep in registers. A convolution kernel is fast when its innermost tile is a
*register tile*: a few output pixels x one or two vectors of output channels, accumulated over
the whole reduction, with the vector loop over channels (NHWC).

This module enumerates such tilings over MetaSchedule's own design spaces (the same sketches,
schedule rules and postprocessors; only the sampled decisions are chosen), measures them with the
tuning runner and commits them to the tuning database as ordinary records. The evolutionary
search that follows starts from the database's best records, so seeds also steer it.

    register tile    rows (h3 x w3 output pixels) x c3 output channels, c3 a multiple of the
                     vector width; accumulators rows x c3/lanes, about half the vector registers
    reduction        whole input-channel loop inside (or 64 at a time); 3x3 windows inside
    outer loops      channel blocks outside or inside the pixel blocks, either epilogue fusion
                     sketch, unroll 16/64/512, padding at the root or where the sketch put it

Measured on one 28x28 240->40 1x1 convolution (Zen 3, 2 threads): the best of 60 seeds ran
0.096 ms, the best of 128 evolutionary trials 0.211 ms. Every CPU task's first seed is its
analytic schedule (`schedules.analytic_schedule`, what an untuned build runs); float32
`conv2d_nhwc` and `group_conv2d_nhwc` tasks get the register-tiled variants after it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codesign.targets import Target
from codesign.tvm_backend.schedules import analytic_schedule, design_context, divisors

CONV_BLOCKS = ("conv2d_nhwc", "group_conv2d_nhwc")
UNROLL_CHOICES = (2, 1, 3)  # indices into MetaSchedule's [0, 16, 64, 512]: 64 first
SEEDS_MAX = 64  # per task: more rarely finds better tiles than the search does from them


@dataclass(frozen=True, slots=True)
class ConvLoops:
    """Extents of a convolution block's loops: output n, h, w, c and reduction rh, rw, rc."""

    n: int
    h: int
    w: int
    c: int
    rh: int
    rw: int
    rc: int


@dataclass(frozen=True, slots=True)
class Tiling:
    """One candidate: the decisions of a sketch's seven tile samples and its other samples."""

    h: tuple[int, int, int, int]
    w: tuple[int, int, int, int]
    c: tuple[int, int, int, int]
    rh: tuple[int, int]
    rw: tuple[int, int]
    rc: tuple[int, int]
    unroll: int  # SampleCategorical decision
    sketch: int  # index into the design spaces
    pad_at: int | None  # SampleComputeLocation decision for the padding; None: the sketch's

    def decisions(self, n: int) -> list[Any]:
        return [(1, 1, 1, n), self.h, self.w, self.c, self.rh, self.rw, self.rc, self.unroll]


def conv_loops(task_mod: Any) -> ConvLoops | None:
    """The loops of a float32 NHWC convolution task, or None for any other task."""
    from tvm import s_tir

    sch = s_tir.Schedule(task_mod)
    for name in CONV_BLOCKS:
        try:
            block = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - TVM raises its own error types for a missing block
            continue
        if any(str(r.source.dtype) != "float32" for r in sch.get(block).writes):
            return None
        loops = sch.get_loops(block)
        if len(loops) != 7:
            return None
        return ConvLoops(*(int(sch.get(loop).extent) for loop in loops))
    return None


def vector_shape(target: Target) -> tuple[int, int]:
    """(float32 lanes per vector register, vector registers) of the target's CPU."""
    from tvm.target import codegen

    features = set(codegen.llvm_get_cpu_features(target.tvm_target()))
    if "avx512f" in features:
        return 16, 32
    if "avx" in features or "avx2" in features:
        return 8, 16
    if target.name == "arm" or "neon" in features:
        return 4, 32
    return 4, 16


# A dense convolution with a kernel window over a small output (at most this many columns)
# aims at SMALL_OUTPUT_ACC accumulators where a tile has exactly that many. Measured on the
# Zen 4 guest (AVX-512, 2 threads), 3x3 convolutions with 48-512 input channels: at 12, 8, 4 and
# 16 output columns (ResNet-18 at 64 px; a 16-wide stride-2 one) 16-accumulator tiles ran 85-150
# GFLOP/s, every 8-accumulator tile 205-224 (e.g. 64->64 at 16x16: 0.203 ms with (1, 8, 32),
# 0.090 with (1, 4, 32)); at 14 columns both 220; at 28-56 16 accumulators ran 204-227 and
# (1, 4, 32) 114 at 28. AVX2 already aims at 8 (16 registers; 195 GF/s on the same host);
# NEON (32 registers) is unmeasured and left alone, as are 1x1 and depthwise convolutions.
SMALL_OUTPUT_W = 16
SMALL_OUTPUT_ACC = 8
SMALL_OUTPUT_MIN_RC = 16  # dense: a reduction over input channels (a stem's 3 is not one)


def register_tiles(loops: ConvLoops, lanes: int, registers: int) -> list[tuple[int, int, int]]:
    """(h3, w3, c3) register tiles, best guess first: about half the registers as accumulators
    (the rest hold weights and the broadcast input), wide rows before tall ones; 8 for a
    dense window over a small output on AVX-512 (`SMALL_OUTPUT_W`)."""
    goal = registers // 2
    small = (lanes == 16 and loops.w <= SMALL_OUTPUT_W and loops.rh * loops.rw > 1
             and loops.rc >= SMALL_OUTPUT_MIN_RC and goal > SMALL_OUTPUT_ACC)  # fmt: skip
    tiles = _ranked_tiles(loops, lanes, registers, goal)
    if small and any(h3 * w3 * c3 // lanes == SMALL_OUTPUT_ACC for h3, w3, c3 in tiles):
        tiles = _ranked_tiles(loops, lanes, registers, SMALL_OUTPUT_ACC)
    return tiles


def _ranked_tiles(
    loops: ConvLoops, lanes: int, registers: int, goal: int
) -> list[tuple[int, int, int]]:
    most = registers - 4
    tiles = []
    for c3 in (lanes, 2 * lanes, 4 * lanes):
        if loops.c % c3:
            continue
        for h3 in divisors(loops.h, 4):
            for w3 in divisors(loops.w, 8):
                acc = h3 * w3 * c3 // lanes
                if 2 <= acc <= most:
                    tiles.append((abs(acc - goal) + (h3 > w3) + 0.5 * (c3 > 2 * lanes), h3, w3, c3))
    return [(h3, w3, c3) for _, h3, w3, c3 in sorted(tiles)]


def tilings(
    loops: ConvLoops, sketches: int, lanes: int, registers: int, count: int, seed: int
) -> list[Tiling]:
    """Up to `count` distinct tilings: the register tiles in order of preference, round-robin,
    each with seeded choices of the outer loops, the reduction split, sketch and unrolling."""
    rng = random.Random(seed)
    tiles = register_tiles(loops, lanes, registers)
    if not tiles or sketches == 0:
        return []
    rc_inner = sorted({loops.rc, max(divisors(loops.rc, 64))}, reverse=True)
    window = [((1, loops.rh), (1, loops.rw)), ((loops.rh, 1), (loops.rw, 1))]
    out: list[Tiling] = []
    seen: set[Tiling] = set()
    for attempt in range(count * 8):
        if len(out) >= count:
            break
        h3, w3, c3 = tiles[attempt % len(tiles)]
        blocks = loops.c // c3
        c1 = rng.choice(sorted({1, blocks}))
        w1 = rng.choice(sorted({1, loops.w // w3}))
        rc1 = rng.choice(rc_inner)
        rh, rw = window[0] if attempt < len(tiles) else rng.choice(window)
        t = Tiling(
            h=(loops.h // h3, 1, 1, h3),
            w=(loops.w // w3 // w1, w1, 1, w3),
            c=(blocks // c1, c1, 1, c3),
            rh=rh,
            rw=rw,
            rc=(loops.rc // rc1, rc1),
            unroll=UNROLL_CHOICES[0] if attempt < len(tiles) else rng.choice(UNROLL_CHOICES),
            sketch=rng.randrange(sketches) if sketches > 1 else 0,
            pad_at=rng.choice((None, -1)),
        )
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _samples(trace: Any) -> list[Any]:
    return [i for i in trace.insts if i.kind.name in ("SamplePerfectTile", "SampleCategorical")]


def apply_tiling(task_mod: Any, sketch: Any, tiling: Tiling, loops: ConvLoops, ctx: Any) -> Any:
    """A schedule of `task_mod`: `sketch`'s trace with `tiling`'s decisions, postprocessed as
    MetaSchedule postprocesses its candidates (None when a postprocessor rejects it)."""
    from tvm import s_tir

    trace = sketch.trace
    decisions = tiling.decisions(loops.n)
    if len(_samples(trace)) < len(decisions):
        return None
    for i, decision in enumerate(decisions):
        trace = trace.with_decision(_samples(trace)[i], decision, remove_postproc=True)
    if tiling.pad_at is not None:
        where = [i for i in trace.insts if i.kind.name == "SampleComputeLocation"]
        if where:
            trace = trace.with_decision(where[0], tiling.pad_at, remove_postproc=True)
    sch = s_tir.Schedule(task_mod)
    try:
        trace.apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        if not all(p.apply(sch) for p in ctx.space_generator.postprocs):
            return None
    except Exception:  # noqa: BLE001 - an invalid combination is skipped, as MetaSchedule does
        return None
    return sch


def seed_budget(trials: int) -> int:
    """Seeds per convolution task out of a budget of `trials`: half of it, at most SEEDS_MAX
    (the search spends the rest, starting from the best seeds)."""
    return min(SEEDS_MAX, trials // 2)


def seed_schedules(
    task_mod: Any,
    target: Target,
    count: int,
    seed: int = 0,
    ctx: Any = None,
    sketches: list[Any] | None = None,
) -> list[Any]:
    """Up to `count` register-tiled schedules of a convolution task ([] for other tasks).
    `ctx` and `sketches` (its design space) may be passed by a caller that already has them."""
    if target.name == "cuda" or count <= 0:
        return []
    loops = conv_loops(task_mod)
    if loops is None:
        return []
    ctx = ctx or design_context(task_mod, target)
    if sketches is None:
        sketches = list(ctx.generate_design_space())
    lanes, registers = vector_shape(target)
    out = []
    for tiling in tilings(loops, len(sketches), lanes, registers, 2 * count, seed):
        sch = apply_tiling(task_mod, sketches[tiling.sketch], tiling, loops, ctx)
        if sch is not None:
            out.append(sch)
        if len(out) >= count:
            break
    return out


def measure_seeds(
    task_mods: list[Any],
    target: Target,
    database: Any,
    *,
    per_task: int,
    builder: Any,
    runner: Any,
    seed: int = 0,
    batch: int = 32,
    on_trials: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Build, time and commit up to `per_task` seed schedules of every convolution task that
    has not been seeded yet (the run is recorded per task, so seeds are measured once).
    Returns the candidates measured, by index into `task_mods` (seeded tasks only)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    tvm_target = target.tvm_target()
    todo: list[tuple[int, Any]] = []  # (task index, schedule)
    seeded: dict[int, int] = {}
    for i, mod in enumerate(task_mods):
        if per_task <= 0 or database.run_finished(_seeds_key(database, mod)):
            continue
        schedules = _seeds_of(mod, target, per_task, seed + i)
        if schedules:
            todo += [(i, sch) for sch in schedules]
            seeded[i] = len(schedules)
    valid: dict[int, int] = {}
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for _, sch in chunk])
        inputs, kept = [], []
        for (i, sch), res in zip(chunk, built, strict=True):
            if res.error_msg is None:
                args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
                inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu", args))
                kept.append((i, sch, args))
        for (i, sch, args), future in zip(kept, runner.run(inputs), strict=True):
            res = future.result()
            if res.error_msg is None and res.run_secs:
                workload = database.commit_workload(task_mods[i])
                database.commit_tuning_record(
                    TuningRecord(sch.trace, workload, res.run_secs, tvm_target, args)
                )
                valid[i] = valid.get(i, 0) + 1
        for res in built:
            if res.artifact_path:
                remove_build_dir(res.artifact_path)
        if on_trials is not None:
            on_trials(len(chunk))
    for i in valid:  # a task whose seeds all failed (a farm server lost, say) is seeded again
        database.mark_run_finished(_seeds_key(database, task_mods[i]), per_task)
    return seeded


def _seeds_of(task_mod: Any, target: Target, count: int, seed: int) -> list[Any]:
    """The task's analytic schedule (what an untuned build runs) first, then up to `count - 1`
    register-tiled seeds, all from one design space: the search then starts from the analytic
    schedule, and a tuned build keeps it unless something measured faster."""
    if target.name == "cuda":
        return []
    ctx = design_context(task_mod, target)
    sketches = list(ctx.generate_design_space())
    analytic = analytic_schedule(task_mod, target, ctx, sketches)
    tiled = seed_schedules(task_mod, target, count - 1, seed, ctx, sketches)
    return ([analytic] if analytic is not None else []) + tiled


def _seeds_key(database: Any, task_mod: Any) -> str:
    return f"seeds:{database.task_hash(task_mod)}"
