"""Runners time a compiled module on a device: `run(built, protocol) -> Measurement`.

`LocalRunner` times on this machine with TVM's `time_evaluator` (the timing loop runs in the
TVM runtime, not in Python). Remote runners (RPC) implement the same interface. A failed run
returns a Measurement with `error` set instead of raising.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from codesign.errors import CodesignError, TargetError
from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.build import Built

_FLUSH = "cache_flush_cpu_non_first_arg"


class Runner(abc.ABC):
    """Times compiled modules on one device."""

    @abc.abstractmethod
    def run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        """Measure `built`; never raises for device-side failures (see Measurement.error)."""

    @property
    def emulated(self) -> bool:
        """True when the device is an emulator: its timings must not drive tuning."""
        return False


def random_input(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@contextlib.contextmanager
def affinity_kept() -> Iterator[None]:
    """Restore this thread's CPU mask after TVM runs: the runtime's thread pool pins the calling
    thread to one core, which would leave later work in the process (PyTorch training, the
    host-thread count of `parse_target`) on that single core."""
    try:
        saved = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - non-Linux
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, saved)


# Samples spreading more than this (std / mean) mean something else took the CPU mid-run: a
# steady measurement of one network repeats within ~1% on an idle 2-core machine.
STEADY_CV = 0.05


def run_steady(
    runner: Runner,
    built: Built,
    protocol: MeasureProtocol,
    *,
    max_cv: float = STEADY_CV,
    tries: int = 3,
) -> Measurement:
    """`runner.run`, repeated (at most `tries` runs in all) while the samples are unsteady;
    returns the steadiest run. A failure is returned at once."""
    best: Measurement | None = None
    for _ in range(max(1, tries)):
        m = runner.run(built, protocol)
        if not m.ok:
            return m
        if best is None or m.cv < best.cv:
            best = m
        if m.steady(max_cv):
            break
    assert best is not None
    return best


def set_threads(threads: int) -> None:
    """Resize the TVM runtime thread pool of this process, keeping the calling thread's CPU mask:
    `config_threadpool` pins the caller to one core, and every thread it starts later (ONNX
    Runtime's and PyTorch's pools among them) would inherit that single core."""
    import tvm

    with affinity_kept():
        size_thread_pool(tvm.get_global_func, threads, "this process")


def size_thread_pool(get_function: Callable[[str], Any], threads: int, where: str) -> None:
    """Ask the TVM pool that `get_function` reaches (`tvm.get_global_func`, or an RPC session's
    `get_function`) for `threads` threads, and check it got them (`check_thread_pool`)."""
    get_function("runtime.config_threadpool")(1, int(threads))
    check_thread_pool(get_function("runtime.NumThreads")(), threads, where)


def check_thread_pool(
    actual: int, threads: int, where: str, error: type[CodesignError] = TargetError
) -> None:
    """Refuse to run with fewer TVM threads than asked: the pool is sized once, from
    TVM_NUM_THREADS, and `config_threadpool` silently caps a request at that size, so a
    measurement labelled with `threads` would have run on fewer."""
    if int(actual) != int(threads):
        raise error(
            f"TVM's thread pool in {where} has {actual} thread(s) but {threads} were asked for; "
            f"TVM sizes it once, when it first runs, from TVM_NUM_THREADS: start {where} with "
            f"TVM_NUM_THREADS={threads}, or ask for threads={actual}"
        )


class LocalRunner(Runner):
    """Runs on this machine's CPU (or GPU for cuda targets) with `threads` runtime threads."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        with affinity_kept():
            return self._run(built, protocol)

    def _run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        import tvm
        from tvm import relax

        if built.target.device == "cpu":
            set_threads(built.target.threads)  # a misconfigured pool raises: nothing to record
        try:
            dev = tvm.cuda(0) if built.target.device == "cuda" else tvm.cpu(0)
            if built.target.device == "cuda" and not dev.exist:
                return Measurement.failed("no CUDA device on this machine")
            vm = relax.VirtualMachine(built.executable, dev)
            args = [
                tvm.runtime.tensor(
                    random_input(built.input_shape, built.input_dtype, self.seed), dev
                )
            ]
            args += [tvm.runtime.tensor(p, dev) for p in built.params]
            evaluator = vm.time_evaluator(
                "main",
                dev,
                number=protocol.number,
                repeat=protocol.repeat,
                min_repeat_ms=protocol.min_repeat_ms,
                f_preproc=_FLUSH if protocol.cache_flush and built.target.device == "cpu" else "",
            )
            result: Any = evaluator(*args)
            return Measurement.from_samples(list(result.results))
        except Exception as err:  # device-side failure: report, do not raise
            return Measurement.failed(f"{type(err).__name__}: {err}")
