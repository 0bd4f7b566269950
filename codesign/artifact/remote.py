"""Running a library on a remote device through a TVM RPC tracker.

`request_session` asks the tracker for a server of a key with a deadline: TVM's own
`TrackerSession.request` has no timeout and blocks forever when no server of the key is free
(docs/tvm-guide.md §2), so this speaks the tracker protocol itself on a socket with a timeout,
after checking the key is served at all. `run_on_session` is the one function that runs an
artifact's library on a session (upload, load, Relax VM on the remote device, run, time); the
device farm can hand it sessions from its own scheduler.

Outputs are fetched with the VM's stateful API (set_input / invoke_stateful / get_outputs):
over RPC a tuple result comes back as an opaque RPCObjectRef that cannot be indexed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.executor import Executor, parse_device, to_numpy
from codesign.errors import FarmError, NoServerError, RemoteError
from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.runner import size_thread_pool, time_vm


def _tracker(tracker: str, timeout_s: float) -> Any:
    from codesign.farm.tracker import TrackerClient, parse_addr

    try:
        parse_addr(tracker)
    except FarmError as err:
        raise RemoteError(f"{err} (e.g. 127.0.0.1:9190)") from None
    return TrackerClient.at(tracker, timeout=min(timeout_s, 10.0))


def request_server(
    tracker: str, key: str, *, timeout_s: float = 60.0, priority: int = 1
) -> tuple[str, int, str]:
    """(host, port, matchkey) of a free server for `key`, or RemoteError within `timeout_s`.

    Speaks the tracker protocol with deadlines (codesign.farm.tracker): TVM's own request
    blocks forever when the key has no free server. A key with no server fails at once.
    """
    from codesign.farm.tracker import RequestTimeout, TrackerUnavailable

    client = _tracker(tracker, timeout_s)
    try:
        client.check_key(key)
        got = client.request(key, timeout=timeout_s, priority=priority)
    except TrackerUnavailable as err:
        raise RemoteError(f"cannot reach the RPC tracker at {tracker}: {err}") from None
    except NoServerError as err:
        raise RemoteError(str(err)) from None
    except RequestTimeout:
        raise RemoteError(
            f"no free RPC server for key {key!r} at {tracker} within {timeout_s:g} s "
            "(all busy or unresponsive); retry later or raise the timeout"
        ) from None
    except FarmError as err:
        raise RemoteError(f"RPC tracker {tracker} failed: {err}") from None
    return got.host, got.port, got.matchkey


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
    `timeout_s` also bounds opening the session and, through the session's `rpc_deadline`
    (a codesign.farm.deadline.RpcDeadline), every later call of a RemoteExecutor on it (upload,
    load, run, timing, download): a frozen server ends in a RemoteError, never a hang.
    """
    from tvm import rpc

    from codesign.farm.deadline import RpcDeadline

    url, port, matchkey = request_server(tracker, key, timeout_s=timeout_s, priority=priority)
    deadline = RpcDeadline(url, port, timeout_s)
    try:
        with deadline.bound(f"opening a session on {url}:{port} (key {key!r})"):
            session = rpc.connect(url, port, matchkey, session_timeout=session_timeout_s)
    except RemoteError:
        raise
    except Exception as err:
        raise RemoteError(f"cannot open a session on {url}:{port} (key {key!r}): {err}") from None
    session.rpc_deadline = deadline
    return session


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
        library = Path(library)
        kind, index = parse_device(device)
        self.deadline = getattr(session, "rpc_deadline", None)  # set by request_session
        with self._bound(f"uploading and loading {library.name}"):
            self._load(session, library, kind, index, threads)
        self.cpu = kind == "cpu"
        self.session = session
        self.where = where
        self.emulated = emulated

    def _bound(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self.deadline.bound(what) if self.deadline else contextlib.nullcontext()

    def _load(
        self, session: Any, library: Path, kind: str, index: int, threads: int | None
    ) -> None:
        from tvm import relax

        try:
            session.upload(str(library))
            rlib = session.load_module(library.name)
            self.dev = session.cuda(index) if kind == "cuda" else session.cpu(index)
            self.vm = relax.VirtualMachine(rlib, self.dev)
        except Exception as err:
            raise RemoteError(
                f"the RPC server could not load {library.name}: {err} (an architecture mismatch "
                "shows up as 'cannot open shared object file')"
            ) from None
        if threads and kind == "cpu":
            size_thread_pool(session.get_function, threads, "the RPC server", error=RemoteError)

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        assert self.vm is not None, "the remote session is closed"
        with self._bound(f"running on {self.where}"):
            try:
                self.vm.set_input("main", tvm.runtime.tensor(x, self.dev))
                self.vm.invoke_stateful("main")
                return to_numpy(self.vm.get_outputs("main"))
            except Exception as err:
                raise RemoteError(f"running on {self.where} failed: {err}") from None

    def time(self, x: np.ndarray, protocol: MeasureProtocol) -> Measurement:
        import tvm

        with self._bound(f"timing on {self.where}"):
            try:
                args = [tvm.runtime.tensor(x, self.dev)]
                return time_vm(self.vm, self.dev, args, protocol, cpu=self.cpu, stateful=True)
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
