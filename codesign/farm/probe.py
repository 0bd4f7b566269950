"""Health probes: a real RPC round trip to a server, bounded in time.

A server can be registered on the tracker and still serve nothing: frozen (SIGSTOP), stuck in
a driver, its accept loop dead. `probe(tracker, key)` asks the tracker for a free server of the
key (at a priority below every job's, so a probe never delays real work), opens a session with
the match key the tracker hands out, makes one trivial remote call (does device cpu(0) exist)
and closes the session, all within `timeout` seconds (`RpcDeadline` cuts a blocked call). The
tracker hands out free servers first-in first-out and a server re-registers at the back after a
session, so repeated probes of a key visit each of its free servers in turn.

`Prober` keeps at most one probe per key in flight, each in a daemon thread, for the supervisor's
health loop: it starts probes and collects their results without ever blocking on one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from codesign.errors import FarmError
from codesign.farm.deadline import RpcDeadline
from codesign.farm.tracker import RequestTimeout, TrackerClient

PROBE_PRIORITY = 0  # jobs ask with priority 1: the tracker serves them first


@dataclass(frozen=True, slots=True)
class ProbeResult:
    key: str
    server: str  # HOST:PORT the tracker handed out; "" when none was free in time
    ok: bool
    seconds: float  # the round trip: request, connect, call, close
    error: str = ""

    @property
    def inconclusive(self) -> bool:
        """No server was probed (none free, or the tracker did not answer)."""
        return not self.ok and not self.server


def probe(tracker: str, key: str, *, timeout: float = 5.0) -> ProbeResult:
    """One bounded RPC round trip to a free server of `key` on `tracker` (HOST:PORT)."""
    import gc

    from tvm import rpc

    t0 = time.monotonic()
    try:
        got = TrackerClient.at(tracker, timeout).request(
            key, timeout=timeout, priority=PROBE_PRIORITY
        )
    except RequestTimeout:
        return ProbeResult(key, "", False, time.monotonic() - t0, "no free server")
    except FarmError as err:
        return ProbeResult(key, "", False, time.monotonic() - t0, str(err))
    deadline = RpcDeadline(got.host, got.port, timeout)
    try:
        with deadline.bound(f"health probe of {key} server {got.addr}", FarmError):
            sess = rpc.connect(got.host, got.port, got.matchkey, session_timeout=timeout * 2)
            if not sess.cpu(0).exist:
                raise FarmError(f"server {got.addr} has no cpu(0) device")
            del sess
            gc.collect()  # ends the session now: the server re-registers as free
    except Exception as err:  # any failure of the round trip is the server's
        msg = str(err).strip().splitlines()
        return ProbeResult(
            key, got.addr, False, time.monotonic() - t0, (msg[-1] if msg else repr(err))[:300]
        )
    return ProbeResult(key, got.addr, True, time.monotonic() - t0)


class Prober:
    """At most one probe per key in flight (daemon threads); `collect()` never blocks."""

    def __init__(self, tracker: str) -> None:
        self.tracker = tracker
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # key -> start (monotonic)
        self._done: list[ProbeResult] = []

    def in_flight(self, key: str) -> float | None:
        """Seconds the probe of `key` has run, or None when none runs."""
        with self._lock:
            start = self._running.get(key)
        return None if start is None else time.monotonic() - start

    def start(self, key: str, timeout: float) -> bool:
        """Start a probe of `key` unless one is in flight; True if started."""
        with self._lock:
            if key in self._running:
                return False
            self._running[key] = time.monotonic()

        def work() -> None:
            try:
                result = probe(self.tracker, key, timeout=timeout)
            except Exception as err:  # tvm failed to import, ...: report, never kill the loop
                result = ProbeResult(key, "", False, 0.0, f"{type(err).__name__}: {err}")
            with self._lock:
                self._running.pop(key, None)
                self._done.append(result)

        threading.Thread(target=work, name=f"probe-{key}", daemon=True).start()
        return True

    def collect(self) -> list[ProbeResult]:
        with self._lock:
            done, self._done = self._done, []
        return done
