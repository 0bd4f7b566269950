"""The TVM runtime thread pool a runner measures with: sized to the target's threads, checked,
and without leaving the calling thread pinned to one core."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from codesign.errors import CodesignError, TargetError


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


def set_threads(threads: int) -> None:
    """Resize the TVM runtime thread pool of this process, keeping the calling thread's CPU mask:
    `config_threadpool` pins the caller to one core, and every thread it starts later (ONNX
    Runtime's and PyTorch's pools among them) would inherit that single core."""
    import tvm

    with affinity_kept():
        size_thread_pool(tvm.get_global_func, threads, "this process")


def size_thread_pool(
    get_function: Callable[[str], Any],
    threads: int,
    where: str,
    error: type[CodesignError] = TargetError,
) -> None:
    """Ask the TVM pool that `get_function` reaches (`tvm.get_global_func`, or an RPC session's
    `get_function`) for `threads` threads, and check it got them (`check_thread_pool`)."""
    with contextlib.suppress(Exception):  # a runtime without it keeps its pool: checked below
        get_function("runtime.config_threadpool")(1, int(threads))
    check_thread_pool(get_function("runtime.NumThreads")(), threads, where, error)


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
