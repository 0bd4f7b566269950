"""Deadlines on TVM RPC calls: a frozen server ends in an error, never a hang.

TVM's RPC client has no timeout: a call to a server that stopped answering (SIGSTOP, a hung
driver, a dead network path) blocks forever inside C++ (docs/tvm-guide.md §2). The blocked call
releases the GIL, so a timer thread can end it: on expiry `RpcDeadline.bound` shuts down this
process's TCP connections to the server (shutdown() acts on the socket, not on one descriptor),
the blocked receive returns, TVM raises, and the block re-raises that as `error` naming what
timed out. The session is unusable afterwards (the server side is killed or ends it itself).

    deadline = RpcDeadline("127.0.0.1", 9100, 20.0)
    with deadline.bound("uploading model.so"):
        session.upload("model.so")
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from codesign.errors import CodesignError, RemoteError


def shutdown_connections(host: str, port: int) -> int:
    """Shut down every TCP connection of this process to host:port; returns how many."""
    import psutil

    try:
        ips = {socket.gethostbyname(host)} | {host}
    except OSError:
        ips = {host}
    n = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == port and conn.raddr.ip in ips and conn.fd >= 0:
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(conn.fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    n += 1
                finally:
                    sock.close()
    return n


@dataclass(frozen=True, slots=True)
class RpcDeadline:
    """Every RPC phase (connect, upload, load, run, download) on the server at host:port must
    finish within `seconds`."""

    host: str
    port: int
    seconds: float

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @contextlib.contextmanager
    def bound(self, what: str, error: type[CodesignError] = RemoteError) -> Iterator[None]:
        """Run the block with this deadline; `error` if it expires (the call is cut off)."""
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            shutdown_connections(self.host, self.port)

        timer = threading.Timer(self.seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception:
            if fired.is_set():
                raise error(self._message(what)) from None
            raise
        finally:
            timer.cancel()
        if fired.is_set():  # expired just as the block finished: the session is cut anyway
            raise error(self._message(what))

    def _message(self, what: str) -> str:
        return (
            f"{what}: the RPC server {self.addr} did not answer within {self.seconds:g} s "
            "(frozen, overloaded or unreachable); check it with `codesign farm status`, or raise "
            "--rpc-timeout for a slow device"
        )
