"""A bounded client of TVM's RPC tracker: every exchange has a socket timeout.

TVM's own `TrackerSession.request()` blocks forever when no server of the key is free (or
exists); this client speaks the same protocol (magic, then length-prefixed JSON messages) with
its own timeouts. `request()` returns where to connect; the caller then opens the session with
`tvm.rpc.connect(host, port, matchkey, session_timeout)`. An abandoned request still counts in
the tracker's `pending` until a server of that key frees up (the tracker then skips it).
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

from codesign.errors import FarmError, NoServerError

TRACKER_MAGIC = 0x2F271
_SUCCESS, _REQUEST, _SUMMARY, _PING = 0, 4, 6, 1
_MAX_MSG = 64 << 20


class TrackerUnavailable(FarmError):
    """The tracker did not answer (down, refused, or too slow)."""


class RequestTimeout(FarmError):
    """No server of the key became free within the request timeout."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    key: str
    host: str
    port: int

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KeyStatus:
    key: str
    total: int  # registered servers
    free: int
    pending: int  # waiting requests (stale ones included)


@dataclass(frozen=True, slots=True)
class Summary:
    servers: tuple[ServerInfo, ...]
    queues: tuple[KeyStatus, ...]

    def status(self, key: str) -> KeyStatus:
        q = next((q for q in self.queues if q.key == key), None)
        total = sum(1 for s in self.servers if s.key == key)
        return KeyStatus(key, total, q.free if q else 0, q.pending if q else 0)

    def servers_of(self, key: str) -> tuple[ServerInfo, ...]:
        return tuple(s for s in self.servers if s.key == key)

    def key_names(self) -> list[str]:
        return sorted({s.key for s in self.servers} | {q.key for q in self.queues})


@dataclass(frozen=True, slots=True)
class Assignment:
    """A server the tracker handed out: connect with `matchkey` to open the session."""

    key: str
    host: str
    port: int
    matchkey: str

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FarmError(f"tracker address {addr!r} must look like HOST:PORT")
    return host, int(port)


class TrackerClient:
    """Short-lived, bounded connections to one tracker."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    @classmethod
    def at(cls, addr: str, timeout: float = 5.0) -> TrackerClient:
        return cls(*parse_addr(addr), timeout=timeout)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def _open(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as err:
            raise TrackerUnavailable(
                f"RPC tracker {self.addr} is unreachable ({err}); start the farm with "
                "`codesign farm up` or check the tracker address"
            ) from None
        try:
            sock.sendall(struct.pack("<i", TRACKER_MAGIC))
            magic = struct.unpack("<i", _recvall(sock, 4))[0]
        except OSError as err:
            sock.close()
            raise TrackerUnavailable(f"RPC tracker {self.addr} did not answer ({err})") from None
        if magic != TRACKER_MAGIC:
            sock.close()
            raise FarmError(f"{self.addr} is not a TVM RPC tracker")
        return sock

    def _call(self, msg: list, timeout: float | None = None) -> object:
        sock = self._open()
        try:
            sock.settimeout(timeout or self.timeout)
            _sendjson(sock, msg)
            return _recvjson(sock)
        finally:
            sock.close()

    def ping(self) -> bool:
        try:
            return self._call([_PING]) == _SUCCESS
        except (FarmError, OSError):
            return False

    def summary(self) -> Summary:
        try:
            value = self._call([_SUMMARY])
        except TimeoutError:
            raise TrackerUnavailable(
                f"RPC tracker {self.addr} accepted but did not answer within {self.timeout:g} s"
            ) from None
        except OSError as err:
            raise TrackerUnavailable(
                f"RPC tracker {self.addr} dropped the connection ({err})"
            ) from None
        if not isinstance(value, list) or value[0] != _SUCCESS:
            raise FarmError(f"unexpected tracker summary {value!r}")
        data = value[1]
        servers = []
        for item in data.get("server_info", []):
            key = str(item.get("key", "")).partition(":")[2]  # 'server:x86' -> 'x86'
            host, port = item.get("addr", [None, 0])
            servers.append(ServerInfo(key, str(host), int(port)))
        queues = tuple(
            KeyStatus(k, 0, int(v.get("free", 0)), int(v.get("pending", 0)))
            for k, v in sorted(data.get("queue_info", {}).items())
        )
        return Summary(tuple(sorted(servers, key=lambda s: (s.key, s.port))), queues)

    def check_key(self, key: str) -> KeyStatus:
        """Fail fast when no server of `key` is registered (TVM would wait forever)."""
        summary = self.summary()
        status = summary.status(key)
        if status.total == 0:
            if key in summary.key_names():  # it had servers: one is restarting or gone
                raise NoServerError(
                    f"no RPC server with key {key!r} is registered on tracker {self.addr} right "
                    "now (its server may be restarting after a failed health check); see "
                    "`codesign farm status`, and retry"
                )
            raise NoServerError(
                f"no RPC server with key {key!r} is registered on tracker {self.addr} "
                f"(keys there: {', '.join(summary.key_names()) or 'none'}); start one with "
                f"`codesign farm up` (or `codesign farm arm-emulator up --key {key}`)"
            )
        return status

    def request(self, key: str, *, timeout: float, priority: int = 1) -> Assignment:
        """Wait at most `timeout` s for a free server of `key`."""
        sock = self._open()
        try:
            sock.settimeout(self.timeout)
            _sendjson(sock, [_REQUEST, key, "", priority])
            sock.settimeout(timeout)
            value = _recvjson(sock)
        except TimeoutError:
            raise RequestTimeout(
                f"no server of key {key!r} became free on tracker {self.addr} within {timeout:g} s"
            ) from None
        except OSError as err:
            raise TrackerUnavailable(f"tracker {self.addr} dropped a request ({err})") from None
        finally:
            sock.close()
        if not isinstance(value, list) or value[0] != _SUCCESS:
            raise FarmError(f"unexpected tracker answer {value!r}")
        host, port, matchkey = value[1]
        return Assignment(key, str(host), int(port), str(matchkey))


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise ConnectionResetError("tracker closed the connection")
        buf += chunk
    return bytes(buf)


def _sendjson(sock: socket.socket, data: object) -> None:
    raw = json.dumps(data).encode()
    sock.sendall(struct.pack("<i", len(raw)) + raw)


def _recvjson(sock: socket.socket) -> object:
    size = struct.unpack("<i", _recvall(sock, 4))[0]
    if not 0 < size <= _MAX_MSG:
        raise ConnectionResetError(f"bad tracker message size {size}")
    return json.loads(_recvall(sock, size).decode())
