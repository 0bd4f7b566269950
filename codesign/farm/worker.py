"""A measurement worker: a child process of the scheduler that runs one farm job at a time.

    python -m codesign.farm.worker FD     (FD: the child's end of a socketpair)

Protocol (pickled messages over the socket): the parent sends ("job", job_id, RemoteJob,
tracker "host:port", key, WorkerLimits, avoid: tuple of server addresses); the worker answers
("assigned", job_id, server addr) once the tracker hands it a server, then ("done", job_id,
RemoteResult) or ("error", job_id, error class, message). The parent kills the worker's process
tree when a job passes its deadline (a frozen server blocks RPC calls forever); the worker
itself never retries.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    socket: float  # one tracker exchange
    request: float  # waiting for a free server
    session: float  # server-side session limit


def _release(assignment, timeout: float) -> None:  # noqa: ANN001
    """Hand a server back unused: open and drop a session (the server re-registers as free)."""
    from tvm import rpc

    sess = rpc.connect(assignment.host, assignment.port, assignment.matchkey, timeout)
    del sess


def handle(conn, msg: tuple) -> None:  # noqa: ANN001
    from tvm import rpc

    from codesign.farm.tracker import TrackerClient, parse_addr
    from codesign.tvm_backend.runner import measure_session

    _, job_id, job, tracker, key, limits, avoid = msg
    try:
        client = TrackerClient(*parse_addr(tracker), timeout=limits.socket)
        assignment = client.request(key, timeout=limits.request)
        for _ in range(len(avoid)):
            if assignment.addr not in avoid:
                break
            _release(assignment, limits.socket)
            assignment = client.request(key, timeout=limits.request)
        if assignment.addr in avoid:
            raise RuntimeError(f"only quarantined servers of key {key!r} were free")
        conn.send(("assigned", job_id, assignment.addr))
        remote = rpc.connect(
            assignment.host, assignment.port, assignment.matchkey, session_timeout=limits.session
        )
        result = measure_session(remote, job)
        # close the session cleanly *before* reporting: if the parent kills this worker right
        # after, a reset connection would crash the server's session child, and TVM's server
        # then stays up unregistered for good (a zombie)
        del remote
        gc.collect()
        conn.send(("done", job_id, result))
    except Exception as err:  # reported to the parent, which classifies and retries
        conn.send(("error", job_id, type(err).__name__, str(err)[-2000:]))


def main(fd: int) -> None:
    from multiprocessing.connection import Connection

    try:  # die with the parent (a killed LUT build must not leave workers behind)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    sys.modules.setdefault("torch", None)  # pyright: ignore[reportArgumentType]  tvm_ffi imports torch if it can: 2 s we don't need
    conn = Connection(fd)
    import tvm  # noqa: F401

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "job":
            return
        handle(conn, msg)


if __name__ == "__main__":
    main(int(sys.argv[1]))
