"""The one timing loop: TVM's `time_evaluator` on a Relax VM, local or over RPC, for every
compiled module (LUT blocks, networks, artifacts, quantized networks).

The loop runs in the TVM runtime of the device (only the samples cross an RPC connection).
The protocol converges on a noisy shared host (docs: benchmarks/measure_stability.py):

1. an untimed warm-up window of WARMUP_MS: the first runs after other work in the process
   stall (PyTorch's OpenMP threads still spinning beside TVM's pinned workers, TVM's own pool
   waking, cold caches and clocks); seen here: 4-16 ms runs of a 0.1 ms block right after
   PyTorch training, none 0.2 s later;
2. rounds of `protocol.repeat` short windows (`min_repeat_ms / SPLIT` each) instead of few long
   ones: a load spike spoils one short window, not a long one, and the median ignores it;
3. on this machine, a round during which this process's threads waited for a CPU (Linux
   schedstat run delay) more than CONTENDED of the round's wall time is set aside: TVM's
   workers are pinned, so a parallel loop whose thread shares its core with another process
   waits a whole scheduler slice (seen here: 30-90 ms runs of a 0.2 ms block beside a test
   suite), and a median of such windows is steady but wrong;
4. the result is the median of the quiet windows (`codesign.measurement.quiet_samples`: within
   8% of the 10th percentile). The guest also runs whole phases of 10 ms to seconds 1.3-2x
   slower that no counter shows (same with one thread; no steal time, no run delay; the
   figures are with QUIET_BAND in codesign/measurement.py). Rounds span at least MIN_ROUNDS x
   repeat windows (~0.4 s at the default protocol) so that a slow phase rarely covers a whole
   measurement;
5. rounds continue (MIN_ROUNDS..MAX_ROUNDS) until 2 x repeat windows are quiet. A measurement
   with no clean round says so (`converged=False`: never steady); `run_steady` then measures
   again and keeps the best.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codesign.measurement import Measurement, MeasureProtocol, quiet_samples
from codesign.tvm_backend.runner.base import Runner

FLUSH = "cache_flush_cpu_non_first_arg"

# Samples spreading more than this (std / mean), and too few to pin the median within it, mean
# something else took the CPU mid-run: a steady measurement of one network repeats within ~1%
# on an idle 2-core machine.
STEADY_CV = 0.05
WARMUP_MS = 30
SPLIT = 5
MIN_ROUNDS, MAX_ROUNDS = 4, 8
CONTENDED = 0.05  # run delay of all threads / wall time of a round


def run_delay_s() -> float:
    """Seconds the threads of this process have spent runnable but waiting for a CPU (the
    second field of /proc/<pid>/task/<tid>/schedstat); 0 where the kernel does not say."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def _is_local(dev: Any) -> bool:
    """A device of this process, not one reached over RPC (TVM masks RPC device types)."""
    try:
        return int(dev.dlpack_device_type()) < 128
    except Exception:
        return False


def random_input(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def time_vm(
    vm: Any,
    dev: Any,
    args: Sequence[Any],
    protocol: MeasureProtocol,
    *,
    cpu: bool = True,
    stateful: bool = False,
) -> Measurement:
    """Time `main` of a Relax VM on `dev` (local or remote) with `args` (device tensors).

    `stateful` times through the VM's stateful API (set_input / invoke_stateful): over RPC a
    tuple output is an opaque object the plain call cannot return. The CPU cache flush (on
    `cpu` devices when the protocol asks) needs the plain call. Raises on device errors.
    """
    window_ms = protocol.min_repeat_ms // SPLIT if protocol.min_repeat_ms >= SPLIT else 0
    if stateful:
        vm.set_input("main", *args)
        name, call_args, flush = "invoke_stateful", ("main",), ""
    else:
        name, call_args = "main", tuple(args)
        flush = FLUSH if protocol.cache_flush and cpu else ""

    def evaluator(repeat: int, min_ms: int) -> Any:
        return vm.time_evaluator(
            name, dev, number=protocol.number, repeat=repeat, min_repeat_ms=min_ms,
            f_preproc=flush,
        )  # fmt: skip

    evaluator(1, WARMUP_MS)(*call_args)
    windows = evaluator(protocol.repeat, window_ms)
    watch = _is_local(dev)
    clean: list[float] = []
    spoiled: list[float] = []
    rounds = 0
    for _ in range(MAX_ROUNDS):
        waited, t0 = run_delay_s() if watch else 0.0, time.perf_counter()
        got = list(windows(*call_args).results)
        wall = time.perf_counter() - t0
        if watch and run_delay_s() - waited > CONTENDED * wall:
            spoiled += got
            if not clean and len(spoiled) >= MIN_ROUNDS * protocol.repeat:
                break  # lasting load: say so now, the caller may retry later
            continue
        clean += got
        rounds += 1
        if rounds >= MIN_ROUNDS and len(quiet_samples(clean)) >= 2 * protocol.repeat:
            break
    if clean:
        return Measurement.from_samples(quiet_samples(clean))
    return Measurement.from_samples(spoiled, converged=False)


def run_steady(
    runner: Runner,
    built: Any,
    protocol: MeasureProtocol,
    *,
    max_cv: float = STEADY_CV,
    tries: int = 3,
) -> Measurement:
    """`runner.run`, repeated (at most `tries` runs in all) while unsteady (see
    `Measurement.steady`); returns the run whose median is pinned down best. A failure is
    returned at once."""
    best: Measurement | None = None
    for _ in range(max(1, tries)):
        m = runner.run(built, protocol)
        if not m.ok:
            return m
        if best is None or (m.median_error, m.cv) < (best.median_error, best.cv):
            best = m
        if m.steady(max_cv):
            break
    assert best is not None
    return best


def measure_in_passes(
    runner: Runner, builts: Sequence[Any], protocol: MeasureProtocol
) -> list[Measurement]:
    """Each of `builts` (modules to compare: a network and its pruned or quantized twin)
    measured `protocol.passes` times, alternating, each one's runs pooled: a slow phase of the
    host (seconds) then hits both alike instead of one of them. A failed run is ignored unless
    all of a module's runs failed."""
    runs: list[list[Measurement]] = [[] for _ in builts]
    for _ in range(protocol.passes):
        for mine, built in zip(runs, builts, strict=True):
            mine.append(runner.run(built, protocol))
    return [Measurement.pool(mine) for mine in runs]


SLOW_RUN = 1.2  # a run this much slower than its module's best: a slow phase of the host
MISS = 0.05  # the chance that all runs of a module fall in slow phases, at most (if passes last)
MOST_PASSES = 2  # x protocol.passes: the most a batch is measured in


def slow_share(runs_of: Sequence[Sequence[Measurement]]) -> float:
    """The chance that a run falls in a slow phase of the host, from a batch's runs: a run is
    slow when SLOW_RUN x its module's best run. A module whose runs all fell in slow phases
    looks like one whose runs were all fast, so the chance is fitted (maximum likelihood) to
    the modules that saw both: their count of slow runs among k is binomial, truncated at 0
    and k. No such module: 0 (a quiet host, or one slow throughout, which is steady too)."""
    counts = []
    for runs in runs_of:
        ms = [m.median_ms for m in runs if m.ok]
        j = sum(x > SLOW_RUN * min(ms) for x in ms) if ms else 0
        if 0 < j < len(ms):
            counts.append((j, len(ms)))
    if not counts:
        return 0.0
    grid = np.linspace(0.01, 0.99, 99)
    j, k = (np.array(v, float)[:, None] for v in zip(*counts, strict=True))
    ll = j * np.log(grid) + (k - j) * np.log1p(-grid) - np.log1p(-(grid**k) - (1 - grid) ** k)
    return float(grid[int(np.argmax(ll.sum(axis=0)))])


def passes_for(share: float, passes: int) -> int:
    """Passes for a batch whose runs fell in slow phases this often: enough that all runs of a
    module do with a chance of at most MISS (share ** k), from `passes` to MOST_PASSES x that."""
    most = MOST_PASSES * passes
    if share <= 0.0:
        return passes
    if share >= 1.0:
        return most
    return min(most, max(passes, math.ceil(math.log(MISS) / math.log(share))))


class LaterPasses:
    """Modules measured once, measured `protocol.passes - 1` times more in passes over all of
    them, their windows pooled (`Measurement.pool`): a slow phase of the host lasts seconds
    (seen on the EMR guest: 3.5 s at 1.4x) to minutes, longer than one measurement but rarely
    than a pass over a batch, so the runs of a module rarely all fall in one. Bounded: at most
    `keep` compiled modules wait; then their passes run, over those `keep` (a larger batch is
    measured in chunks; finishing the oldest module alone instead gave it three back-to-back
    runs: the first 22 of 70 networks scattered twice as much as the others).

    How many passes is the batch's own say: after `protocol.passes`, the share of its runs that
    fell in slow phases (`slow_share`) sets the count at which a module's runs all fall in them
    with a chance of 5% at most (`passes_for`, at most 2x the protocol's: in a noisy hour 2%
    and 3x took the main job to 16 minutes). A run is fast (1.0-1.1x its module's best) or
    slow (1.3-1.7x); a third of the runs were slow in a quiet hour of the EMR guest, where
    pools of 2 passes already agreed within 3.7%, and 60% in a noisy one, where pools of 3
    disagreed by 23.7% and pools of 6 agreed within 3.7% (benchmarks/measure_stability.py
    --passes 6). A module none of whose runs got a quiet CPU (`converged=False`: another
    process held it) is measured in up to `protocol.passes` extra passes, until one does. Each
    run stores the pool so far, so an interrupted pass loses nothing measured."""

    def __init__(self, runner: Runner, protocol: MeasureProtocol, *, keep: int = 48) -> None:
        self.runner, self.protocol, self.keep = runner, protocol, keep
        self.more = protocol.passes - 1
        self.passes = protocol.passes  # of the last chunk, once its slow share is known
        self.slow_share: float | None = None  # of the last chunk's runs
        self._pending: list[tuple[Any, list[Measurement], Callable[[Measurement], None]]] = []

    def __len__(self) -> int:
        """Runs still to do (as far as known: a noisy batch adds passes)."""
        return sum(max(0, self.passes - len(runs)) for _, runs, _ in self._pending)

    def add(self, built: Any, first: Measurement, store: Callable[[Measurement], None]) -> None:
        """Measure `built` again in the later passes; `store` gets each pool."""
        if first.ok and self.more > 0:
            self._pending.append((built, [first], store))
        if len(self._pending) >= self.keep:
            self.run()

    def run(self, on_done: Callable[[], None] | None = None) -> None:
        """The later passes over every waiting module (the first runs are stored already);
        `on_done` after each run."""
        from codesign import interrupt

        self.passes, decided = self.protocol.passes, False
        while self._pending:
            for item in list(self._pending):
                interrupt.check()
                self._again(item)
                if on_done is not None:
                    on_done()
            if not decided and all(len(r) >= self.protocol.passes for _, r, _ in self._pending):
                self.slow_share = slow_share([r for _, r, _ in self._pending])
                self.passes, decided = passes_for(self.slow_share, self.protocol.passes), True
            self._pending = [it for it in self._pending if not self._done(it[1])]

    def _done(self, runs: list[Measurement]) -> bool:
        if len(runs) < self.passes:
            return False
        extra = len(runs) - self.passes
        return extra >= self.protocol.passes or any(m.ok and m.converged for m in runs)

    def _again(self, item: tuple[Any, list[Measurement], Callable[[Measurement], None]]) -> None:
        built, runs, store = item
        runs.append(self.runner.run(built, self.protocol))
        store(Measurement.pool(runs))
