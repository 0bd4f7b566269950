"""Farm configuration: `farm.toml` -> FarmConfig (frozen; every limit of the farm is here).

[tracker]
host = "127.0.0.1"          # where the tracker listens (and where clients reach it)
port = 9190

[farm]
bind = "127.0.0.1"          # address the RPC servers listen on; 0.0.0.0 only on a trusted LAN
state_dir = "~/.cache/codesign/farm"   # PIDs, logs, events of `codesign farm up`

[timeouts]                  # seconds
socket = 5                  # one tracker protocol exchange (connect, summary)
request = 30                # waiting for a free server of a key
job = 120                   # one measurement job, from dispatch to result (then killed)
session = 90                # server-side session limit (the server kills longer sessions)
health_interval = 2         # supervisor check period
register = 60               # a started server must register within this
tracker_wait = 120          # the scheduler waits this long for a lost tracker
server_tracker_retry = 60   # a server's reconnect window after a tracker loss (TVM: 60)
quarantine = 60             # a quarantined server gets no jobs for this long
probe = 5                   # one health probe: request, connect, a remote call, close
probe_interval = 5          # between probes of a key (0: no probes); see codesign.farm.probe

[retries]
attempts = 3                # tries per job, each on another server if possible
quarantine_after = 2        # consecutive failures before a server is quarantined
max_restarts = 20           # restarts per server over the supervisor's life

[[servers]]                 # one table per group of identical servers
key = "local"
count = 1
port = 9100                 # first port; server i listens on port + i
threads = 0                 # TVM_NUM_THREADS of each server; 0: this machine's CPUs
emulator = ""               # "arm64": run in the emulated arm64 chroot (emulated timings)

Without a file (`codesign farm up`), the farm is the tracker on 127.0.0.1:9190 and one server
of key `local` on port 9100 with this machine's CPUs as threads: it runs the artifacts compiled
for this machine (`codesign run model.tar --rpc-key local --tracker 127.0.0.1:9190`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from codesign.errors import FarmError

DEFAULT_STATE_DIR = Path(
    os.environ.get("CODESIGN_FARM_DIR", Path.home() / ".cache" / "codesign" / "farm")
)
EMULATORS = ("", "arm64")
DEFAULT_KEY = "local"  # the built-in farm's one server: this machine's CPU


@dataclass(frozen=True, slots=True)
class Timeouts:
    socket: float = 5.0
    request: float = 30.0
    job: float = 120.0
    session: float = 90.0
    health_interval: float = 2.0
    register: float = 60.0
    tracker_wait: float = 120.0
    server_tracker_retry: float = 60.0
    quarantine: float = 60.0
    probe: float = 5.0
    probe_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 3
    quarantine_after: int = 2
    max_restarts: int = 20


@dataclass(frozen=True, slots=True)
class ServerGroup:
    key: str
    count: int = 1
    port: int = 9100
    threads: int = 0  # 0: this machine's CPUs (resolved when the server starts)
    emulator: str = ""

    @property
    def emulated(self) -> bool:
        return bool(self.emulator)

    def server_threads(self) -> int:
        """TVM_NUM_THREADS of each server: `threads`, or this machine's CPUs when 0."""
        from codesign.targets import host_threads

        return self.threads or host_threads()

    def names(self) -> list[tuple[str, int]]:
        """(server name, port) of each server of the group."""
        return [(f"{self.key}-{i}", self.port + i) for i in range(self.count)]


@dataclass(frozen=True, slots=True)
class FarmConfig:
    tracker_host: str = "127.0.0.1"
    tracker_port: int = 9190
    bind: str = "127.0.0.1"
    state_dir: Path = DEFAULT_STATE_DIR
    servers: tuple[ServerGroup, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: Retries = field(default_factory=Retries)

    def __post_init__(self) -> None:
        ports = [p for g in self.servers for _, p in g.names()] + [self.tracker_port]
        if len(set(ports)) != len(ports):
            raise FarmError(
                f"farm config: ports overlap ({sorted(ports)}); give each group its own"
            )
        keys = [g.key for g in self.servers]
        if len(set(keys)) != len(keys):
            raise FarmError(f"farm config: key listed twice in [[servers]] ({keys})")
        for g in self.servers:
            if g.count < 1 or g.threads < 0 or not 0 < g.port < 65536:
                raise FarmError(f"farm config: bad server group {g}")
            if g.emulator not in EMULATORS:
                raise FarmError(
                    f"farm config: emulator must be one of {EMULATORS}, got {g.emulator!r}"
                )
        if self.retries.attempts < 1 or self.retries.quarantine_after < 1:
            raise FarmError("farm config: retries.attempts and quarantine_after must be >= 1")

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    def group(self, key: str) -> ServerGroup | None:
        return next((g for g in self.servers if g.key == key), None)

    def with_group(self, group: ServerGroup) -> FarmConfig:
        """This config with `group` added (or replacing the group of the same key)."""
        others = tuple(g for g in self.servers if g.key != group.key)
        return self.with_servers((*others, group))

    def with_rpc_timeout(self, seconds: float | None) -> FarmConfig:
        """This config with every RPC phase of a farm job bounded by `seconds` (`--rpc-timeout`):
        a tracker exchange and the wait for a free server, then the job (connect, upload, load,
        time: 4 phases) gets 4x, and the server-side session at least that. None: unchanged."""
        if seconds is None:
            return self
        if not seconds > 0:
            raise FarmError(f"the RPC timeout must be > 0 seconds, got {seconds}")
        t = self.timeouts
        job = 4 * seconds
        timeouts = replace(
            t,
            socket=min(t.socket, seconds),
            request=seconds,
            job=job,
            session=max(t.session, job + 10),
            probe=min(t.probe, seconds),
        )
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["timeouts"] = timeouts
        return FarmConfig(**d)

    def with_servers(self, servers: tuple[ServerGroup, ...]) -> FarmConfig:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["servers"] = servers
        return FarmConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_dir"] = str(self.state_dir)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FarmConfig:
        d = dict(d)
        return cls(
            tracker_host=d["tracker_host"],
            tracker_port=int(d["tracker_port"]),
            bind=d["bind"],
            state_dir=Path(d["state_dir"]),
            servers=tuple(ServerGroup(**g) for g in d["servers"]),
            timeouts=Timeouts(**d["timeouts"]),
            retries=Retries(**d["retries"]),
        )


def _table(data: dict[str, Any], name: str, cls: type) -> Any:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise FarmError(f"farm config: [{name}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise FarmError(
            f"farm config: unknown option(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}"
        )
    try:
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in section.items()})
    except (TypeError, ValueError) as err:
        raise FarmError(f"farm config: bad value in [{name}]: {err}") from None


def load_config(
    path: str | Path | None = None, *, state_dir: str | Path | None = None
) -> FarmConfig:
    """Read `farm.toml` (None: defaults, one server of key `local` on port 9100 with this
    machine's CPUs as threads)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FarmError(f"farm config {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise FarmError(f"farm config {path} is not valid TOML: {err}") from None
    unknown = set(data) - {"tracker", "farm", "timeouts", "retries", "servers"}
    if unknown:
        raise FarmError(f"farm config: unknown section(s) {sorted(unknown)}")
    tracker = data.get("tracker", {})
    farm = data.get("farm", {})
    groups = []
    for g in data.get("servers", [{"key": DEFAULT_KEY}]):
        known = {f.name for f in fields(ServerGroup)}
        if not isinstance(g, dict) or "key" not in g or set(g) - known:
            raise FarmError(f"farm config: each [[servers]] needs key= and only {sorted(known)}")
        groups.append(ServerGroup(**g))
    sd = state_dir or farm.get("state_dir") or DEFAULT_STATE_DIR
    return FarmConfig(
        tracker_host=str(tracker.get("host", "127.0.0.1")),
        tracker_port=int(tracker.get("port", 9190)),
        bind=str(farm.get("bind", "127.0.0.1")),
        state_dir=Path(sd).expanduser(),
        servers=tuple(groups),
        timeouts=_table(data, "timeouts", Timeouts),
        retries=_table(data, "retries", Retries),
    )
