"""The worker processes TVM starts while tuning: started without torch, reaped at the end.

MetaSchedule measures candidates in popen workers (`python -m tvm.exec.popen_worker`): its
LocalBuilder starts a fresh pool for every batch, its runners keep one, the farm's RPC runner
another. Each worker imports TVM, and tvm_ffi imports torch whenever it can (~3 s of a ~6 s
start here), although no worker ever uses it. Inside `tuning_workers()`, new processes find a
`torch` package that fails to import first on PYTHONPATH (measured: a 3-task, 2-trial session
of an inverted residual 45 s -> 27 s); when the block exits, however it exits, the TVM popen
workers it started are killed (MetaSchedule's pools otherwise outlive an interrupted parent).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SHIM = 'raise ImportError("torch is not used by TVM worker processes (codesign)")\n'


def no_torch_dir(parent: Path | None = None) -> str:
    """A directory whose `torch` package fails to import, for the PYTHONPATH of processes that
    never use torch (under `parent`, or a temporary one removed when this process exits)."""
    if parent is None:
        return _temporary_no_torch_dir()
    pkg = Path(parent) / "torch"
    if not (pkg / "__init__.py").exists():
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(_SHIM)
    return str(parent)


@functools.cache
def _temporary_no_torch_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="codesign-no-torch-"))
    atexit.register(shutil.rmtree, path, True)
    return no_torch_dir(path)


@contextlib.contextmanager
def without_torch() -> Iterator[None]:
    """Processes started inside the block cannot import torch (PYTHONPATH is restored after)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [no_torch_dir(), old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def reap_workers() -> Iterator[None]:
    """Kill the TVM popen workers started inside the block when it exits, however it exits:
    MetaSchedule's builder/runner pools otherwise outlive an interrupted parent as orphans."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    finally:
        for proc in me.children(recursive=True):
            if proc.pid in before:
                continue
            try:
                if "tvm.exec.popen_worker" in " ".join(proc.cmdline()):
                    proc.kill()
            except psutil.Error:
                pass


@contextlib.contextmanager
def tuning_workers() -> Iterator[None]:
    """Around a tuning session: workers start without torch and do not outlive it."""
    with reap_workers(), without_torch():
        yield
