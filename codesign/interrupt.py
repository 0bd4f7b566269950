"""Ctrl-C, `kill -INT PID` and SIGTERM stop a command within seconds, whatever it is running.

Python runs a signal handler only between bytecodes of the main thread, and the
KeyboardInterrupt it raises can be swallowed on the way out: TVM's FFI turns an exception raised
inside a callback into a TVMError, which a compile step reports as a BuildError and a timing
step as a failed measurement (the build then went on to the next block). So the handler also
records the request: loops call `check()` between units of work (a block measured is committed
before the check, so nothing measured is lost), and the CLI maps any error raised after a
request to the interrupted exit (130). Should the process still be running `grace` seconds
later (stuck inside a C call, or a swallowed interrupt in a loop that never checks), a watchdog
kills its child processes and exits with 130; committed rows are in SQLite, which survives that.
A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_CODE = 130
GRACE_S = float(os.environ.get("CODESIGN_INTERRUPT_GRACE_S", "4"))

_requested: int | None = None  # the signal number, once one arrived
_lock = threading.Lock()


def requested() -> bool:
    """Whether a stop was asked for (by a signal) since `handling()` began."""
    return _requested is not None


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for (call between units of work)."""
    if _requested is not None:
        raise KeyboardInterrupt


def _kill_children() -> None:
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - best effort on the way out
        return
    for child in children:
        with contextlib.suppress(Exception):
            child.kill()


def _hard_exit(why: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"\ncodesign: {why}; stopping now. Measured rows are saved.\n")
        sys.stderr.flush()
    _kill_children()
    os._exit(EXIT_CODE)


def _watchdog(grace: float) -> None:
    done = threading.Event()
    done.wait(grace)
    _hard_exit(f"interrupted; still running {grace:g} s after the signal")


def _handler(signum: int, frame: Any) -> None:
    global _requested
    with _lock:
        first = _requested is None
        _requested = signum
    if not first:
        _hard_exit("interrupted twice")
    if GRACE_S > 0:
        threading.Thread(target=_watchdog, args=(GRACE_S,), daemon=True).start()
    raise KeyboardInterrupt


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are recorded (see module docstring); the
    previous handlers come back afterwards. Outside the main thread this does nothing."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
