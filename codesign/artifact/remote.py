"""Running a library on a remote device through a TVM RPC tracker.

`request_session` asks the tracker for a server of a key with a deadline: TVM's own
`TrackerSession.request` has no timeout and blocks forever when no server of the key is free
(TVM_RPC_GUIDE.md §3), so this speaks the tracker protocol itself on a socket with a timeout,
after checking the key is served at all. `run_on_session` is the one function that runs an
artifact's library on a session (upload, load, Relax VM on the remote device, run, time); the
device farm can hand it sessions from its own scheduler.

Outputs are fetched with the VM's stateful API (set_input / invoke_stateful / get_outputs):
over RPC a tuple result comes back as an opaque RPCObjectRef that cannot be indexed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.executor import Executor, parse_device, to_numpy
from codesign.errors import RemoteError
from codesign.measurement import Measurement, MeasureProtocol

_TRACKER_MAGIC = 0x2F271  # tvm.rpc.base.RPC_TRACKER_MAGIC
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6  # tvm.rpc.base.TrackerCode


def parse_tracker(tracker: str) -> tuple[str, int]:
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise RemoteError(f"tracker {tracker!r} must look like HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _send(sock: socket.socket, data: Any) -> None:
    blob = json.dumps(data).encode()
    sock.sendall(struct.pack("<i", len(blob)) + blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the tracker closed the connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (size,) = struct.unpack("<i", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, size).decode())


def _open_tracker(tracker: str, timeout_s: float) -> socket.socket:
    host, port = parse_tracker(tracker)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as err:
        raise RemoteError(
            f"cannot reach the RPC tracker at {tracker} ({err}); start one with "
            "`python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port PORT` or check --tracker"
        ) from None
    try:
        sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        if struct.unpack("<i", _recv_exact(sock, 4))[0] != _TRACKER_MAGIC:
            raise RemoteError(f"{tracker} is not a TVM RPC tracker (bad handshake)")
    except (OSError, ConnectionError) as err:
        sock.close()
        raise RemoteError(f"{tracker} is not answering as a TVM RPC tracker: {err}") from None
    except RemoteError:
        sock.close()
        raise
    return sock


def _summary(sock: socket.socket, tracker: str) -> dict[str, Any]:
    _send(sock, [_SUMMARY])
    reply = _recv(sock)
    if not isinstance(reply, list) or reply[0] != _SUCCESS or not isinstance(reply[1], dict):
        raise RemoteError(f"RPC tracker {tracker} sent an invalid summary: {reply}")
    return reply[1]


def server_counts(summary: dict[str, Any]) -> dict[str, int]:
    """Registered servers per key in a tracker summary."""
    counts: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":", 1)[-1]
        counts[key] = counts.get(key, 0) + 1
    return counts


def tracker_summary(tracker: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """The tracker's summary ({'queue_info': {key: {free, pending}}, 'server_info': [...]})."""
    with _open_tracker(tracker, timeout_s) as sock:
        try:
            return _summary(sock, tracker)
        except (OSError, ValueError) as err:
            raise RemoteError(f"RPC tracker {tracker} failed: {err}") from None


def request_server(
    tracker: str, key: str, *, timeout_s: float = 60.0, priority: int = 1
) -> tuple[str, int, str]:
    """(host, port, matchkey) of a free server for `key`, or RemoteError within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with _open_tracker(tracker, timeout_s) as sock:
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            counts = server_counts(_summary(sock, tracker))
            if not counts.get(key):
                raise RemoteError(
                    f"no RPC server is registered under key {key!r} at {tracker} (registered: "
                    f"{', '.join(sorted(counts)) or 'none'}); start one or pick another --rpc-key"
                )
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            _send(sock, [_REQUEST, key, "", priority])
            reply = _recv(sock)
        except TimeoutError:
            raise RemoteError(
                f"no free RPC server for key {key!r} at {tracker} within {timeout_s:g} s "
                "(all busy or unresponsive); retry later or raise the timeout"
            ) from None
        except (OSError, ValueError, IndexError, AttributeError) as err:
            raise RemoteError(f"RPC tracker {tracker} failed: {err}") from None
    if not isinstance(reply, list) or reply[0] != _SUCCESS:
        raise RemoteError(f"RPC tracker {tracker} refused the request for {key!r}: {reply}")
    url, port_, matchkey = reply[1]
    return str(url), int(port_), str(matchkey)


def request_session(
    tracker: str,
    key: str,
    *,
    timeout_s: float = 60.0,
    session_timeout_s: float = 600.0,
    priority: int = 1,
) -> Any:
    """An RPC session on a server of `key`, obtained within `timeout_s` (else RemoteError).

    The server ends the session after `session_timeout_s`, so a runaway job cannot hold it.
    """
    from tvm import rpc

    url, port, matchkey = request_server(tracker, key, timeout_s=timeout_s, priority=priority)
    try:
        return rpc.connect(url, port, matchkey, session_timeout=session_timeout_s)
    except Exception as err:
        raise RemoteError(f"cannot open a session on {url}:{port} (key {key!r}): {err}") from None


class RemoteExecutor(Executor):
    """A library uploaded to an RPC session and run by a Relax VM on the remote device."""

    def __init__(
        self,
        session: Any,
        library: str | Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        emulated: bool | None = None,
        where: str = "rpc",
    ) -> None:
        from tvm import relax

        library = Path(library)
        kind, index = parse_device(device)
        try:
            session.upload(str(library))
            rlib = session.load_module(library.name)
            self.dev = session.cuda(index) if kind == "cuda" else session.cpu(index)
            if threads and kind == "cpu":
                # servers without it keep their own thread pool
                with contextlib.suppress(Exception):
                    session.get_function("runtime.config_threadpool")(1, int(threads))
            self.vm = relax.VirtualMachine(rlib, self.dev)
        except Exception as err:
            raise RemoteError(
                f"the RPC server could not load {library.name}: {err} (an architecture mismatch "
                "shows up as 'cannot open shared object file')"
            ) from None
        self.session = session
        self.where = where
        self.emulated = emulated

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        try:
            self.vm.set_input("main", tvm.runtime.tensor(x, self.dev))
            self.vm.invoke_stateful("main")
            return to_numpy(self.vm.get_outputs("main"))
        except Exception as err:
            raise RemoteError(f"running on {self.where} failed: {err}") from None

    def time(self, x: np.ndarray, protocol: MeasureProtocol) -> Measurement:
        import tvm

        try:
            self.vm.set_input("main", tvm.runtime.tensor(x, self.dev))
            evaluator = self.vm.time_evaluator(
                "invoke_stateful",
                self.dev,
                number=protocol.number,
                repeat=protocol.repeat,
                min_repeat_ms=protocol.min_repeat_ms,
            )
            return Measurement.from_samples(list(evaluator("main").results))
        except Exception as err:  # device-side failure: report, do not raise
            return Measurement.failed(f"{type(err).__name__}: {err}")

    def close(self) -> None:
        # The session ends when nothing refers to it: remote devices hold it too (_rpc_sess),
        # and the Relax VM's Python wrapper sits in a reference cycle, so collect it now.
        self.vm = self.dev = self.session = None
        gc.collect()


@dataclass(frozen=True)
class RemoteRun:
    outputs: tuple[np.ndarray, ...]
    measurement: Measurement | None


def run_on_session(
    session: Any,
    library: str | Path,
    inputs: Sequence[np.ndarray],
    *,
    protocol: MeasureProtocol | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> RemoteRun:
    """Upload `library` to `session`, run it on each input, and time it if `protocol` is given."""
    ex = RemoteExecutor(session, library, device=device, threads=threads)
    try:
        outputs = tuple(ex.run(x) for x in inputs)
        m = ex.time(inputs[0], protocol) if protocol is not None and inputs else None
        return RemoteRun(outputs, m)
    finally:
        ex.close()
