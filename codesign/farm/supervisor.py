"""The farm supervisor: owns the tracker and the RPC servers, and keeps them serving.

    start_farm(config)   spawn `python -m codesign.farm.supervisor STATE_DIR` (own session) and
                         wait until the tracker answers and every server is registered
    stop_farm(dir)       SIGTERM the supervisor, then SIGKILL every recorded tree by PID
    read_state(dir)      state.json: PIDs + start times, per-server health, restarts

Every `health_interval` the supervisor judges health by *tracker registration* and by what the
server answers, not by a live PID or an open port (docs/tvm-guide.md §2, §4):
  * tracker dead or not answering -> kill its tree, restart it on the same port; if it was down
    longer than the servers' reconnect window, restart every server (they are dead for good);
  * server process gone, never registered within `register`, or unregistered for longer than
    `deregistered` (a zombie after a crashed session) -> kill its tree, restart it;
  * a server the scheduler quarantined (event in events.jsonl) -> kill its tree, restart it;
  * a server that fails a health probe (codesign.farm.probe: a real RPC round trip through the
    tracker, bounded by `timeouts.probe`, every `probe_interval` s per key), or with a process of
    its tree stopped (SIGSTOP) past that -> kill its tree, restart it.
Restarts per server are bounded by `max_restarts`. The config (state_dir/config.json) is
re-read when it changes, so servers can be added to a running farm (the arm64 emulator).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codesign.errors import FarmError
from codesign.farm.config import FarmConfig, ServerGroup
from codesign.farm.probe import Prober
from codesign.farm.procs import (
    Proc,
    append_event,
    no_torch_path,
    read_events,
    read_json,
    spawn,
    write_json,
)
from codesign.farm.tracker import TrackerClient, TrackerUnavailable

DEREGISTERED_GRACE = 10.0  # s a once-registered server may be missing (tracker reconnects: 5 s)


@dataclass
class _Managed:
    name: str
    argv: list[str]
    env: dict[str, str]
    key: str = ""
    port: int = 0
    emulated: bool = False
    popen: subprocess.Popen | None = None
    proc: Proc | None = None
    started: float = 0.0  # time.monotonic(): intervals survive wall-clock steps
    last_seen: float = 0.0  # last time registered on the tracker (monotonic)
    restarts: int = 0
    health: str = "starting"
    failed: bool = False  # gave up after max_restarts
    probe_ms: float | None = None  # the last passed health probe's round trip
    stopped_since: float | None = None  # a process of the tree is stopped (monotonic)
    history: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "port": self.port,
            "emulated": self.emulated,
            "proc": self.proc.to_dict() if self.proc else None,
            "restarts": self.restarts,
            "health": self.health,
            "probe_ms": self.probe_ms,
        }


def _config_path(state_dir: Path) -> Path:
    return state_dir / "config.json"


def write_config(cfg: FarmConfig) -> None:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    write_json(_config_path(cfg.state_dir), cfg.to_dict())


class Supervisor:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.cfg = self._load()
        self.cfg_mtime = _config_path(state_dir).stat().st_mtime
        self.tracker = self._tracker_proc()
        self.servers: dict[str, _Managed] = {}
        self.events_offset = read_events(state_dir)[1]  # act on quarantines from now on
        self.tracker_down_since: float | None = None
        self.stopping = False
        self.prober = Prober(self.cfg.tracker)
        self.last_probe: dict[str, float] = {}  # key -> when its last probe started

    def _load(self) -> FarmConfig:
        d = read_json(_config_path(self.state_dir))
        if d is None:
            raise FarmError(f"no farm config in {self.state_dir}; start with `codesign farm up`")
        return FarmConfig.from_dict(d)

    # ----------------------------------------------------------------- commands
    def _tracker_proc(self) -> _Managed:
        c = self.cfg
        argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", c.tracker_host]
        argv += ["--port", str(c.tracker_port), "--port-end", str(c.tracker_port + 1)]
        return _Managed("tracker", argv, {}, port=c.tracker_port)

    def _server_proc(self, g: ServerGroup, name: str, port: int) -> _Managed:
        c = self.cfg
        env = {"TVM_NUM_THREADS": str(g.server_threads())}
        if g.emulator:
            from codesign.farm.arm_emulator import ArmRootfs, server_command

            argv = server_command(
                ArmRootfs(),
                host=c.bind,
                port=port,
                tracker=c.tracker,
                key=g.key,
                threads=g.server_threads(),
            )
        else:
            argv = [sys.executable, "-m", "codesign.farm.rpc_server", "--host", c.bind]
            argv += ["--port", str(port), "--tracker", c.tracker, "--key", g.key]
            argv += ["--retry-window", str(c.timeouts.server_tracker_retry)]
        return _Managed(name, argv, env, g.key, port, g.emulated)

    # ----------------------------------------------------------------- lifecycle
    def _start(self, m: _Managed, why: str = "") -> None:
        if m.proc is not None:
            m.proc.kill_tree()
        if m.popen is not None:
            m.popen.poll()
        if m.emulated:
            from codesign.farm.arm_emulator import ArmRootfs, mount_proc

            mount_proc(ArmRootfs().root)
        env = dict(m.env)
        if not m.emulated:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [no_torch_path(self.state_dir), os.environ.get("PYTHONPATH")])
            )
        m.popen, m.proc = spawn(m.argv, self.state_dir / "logs" / f"{m.name}.log", env)
        m.started, m.last_seen, m.health = time.monotonic(), 0.0, "starting"
        m.probe_ms = m.stopped_since = None
        if why:
            m.restarts += 1
            append_event(
                self.state_dir, "restart", f"{m.name}: {why}", {"server": m.name, "port": m.port}
            )

    def _restart(self, m: _Managed, why: str) -> None:
        if m.restarts >= self.cfg.retries.max_restarts:
            if not m.failed:
                m.failed, m.health = True, "failed"
                if m.proc:
                    m.proc.kill_tree()
                append_event(
                    self.state_dir,
                    "failure",
                    f"{m.name}: gave up after {m.restarts} restarts "
                    f"({why}); see {self.state_dir / 'logs' / (m.name + '.log')}",
                    {"server": m.name},
                )
            return
        self._start(m, why)

    def _sync_servers(self) -> None:
        wanted = {}
        for g in self.cfg.servers:
            for name, port in g.names():
                wanted[name] = (g, port)
        for name in list(self.servers):
            if name not in wanted:
                m = self.servers.pop(name)
                if m.proc:
                    m.proc.kill_tree()
        for name, (g, port) in wanted.items():
            if name not in self.servers:
                m = self.servers[name] = self._server_proc(g, name, port)
                self._start(m)

    def start(self) -> None:
        self._start(self.tracker)
        self._wait_tracker(30.0)
        self._sync_servers()
        self.write_state()

    def _wait_tracker(self, timeout: float) -> bool:
        client = TrackerClient(self.cfg.tracker_host, self.cfg.tracker_port, 1.0)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if client.ping():
                return True
            time.sleep(0.2)
        return False

    # ----------------------------------------------------------------- health
    def check(self) -> None:
        now = time.monotonic()
        t = self.cfg.timeouts
        self._reload_config()
        client = TrackerClient(self.cfg.tracker_host, self.cfg.tracker_port, t.socket)
        try:
            summary = client.summary()
            if self.tracker_down_since is not None:
                self.tracker_down_since = None
            self.tracker.health, self.tracker.last_seen = "healthy", now
        except (TrackerUnavailable, FarmError) as err:
            if self.tracker_down_since is None:
                self.tracker_down_since = now
                append_event(self.state_dir, "failure", f"tracker: {err}", {"server": "tracker"})
            down = now - self.tracker_down_since
            self.tracker.health = "down"
            if not self.tracker.proc or not self.tracker.proc.alive or down > 2 * t.socket:
                last_ok = self.tracker.last_seen or self.tracker_down_since
                self._restart(self.tracker, f"tracker not answering for {down:.0f} s")
                if self.tracker.failed:  # bounded: give up, and take the servers down too
                    raise SystemExit(1) from None
                ok = self._wait_tracker(30.0)
                outage = time.monotonic() - last_ok
                if ok and outage > t.server_tracker_retry:
                    for m in self.servers.values():
                        self._restart(
                            m,
                            f"tracker was down {outage:.0f} s, over the servers' "
                            f"{t.server_tracker_retry:.0f} s reconnect window",
                        )
            self.write_state()
            return
        registered = {(s.key, s.port) for s in summary.servers}
        for m in self.servers.values():
            if m.failed:
                continue
            if m.popen is not None:
                m.popen.poll()  # reap
            if m.proc and m.proc.alive and self._frozen(m, now):
                continue
            if (m.key, m.port) in registered and m.proc and m.proc.alive:
                m.health, m.last_seen = "healthy", now
                continue
            if not m.proc or not m.proc.alive:
                self._restart(m, "process exited")
            elif m.last_seen == 0.0:
                limit = max(t.register, 120.0) if m.emulated else t.register
                if now - m.started > limit:
                    self._restart(m, f"not registered {limit:.0f} s after start")
            elif now - m.last_seen > DEREGISTERED_GRACE:
                self._restart(m, f"de-registered for {now - m.last_seen:.0f} s (zombie)")
            else:
                m.health = "unregistered"
        self._probe(registered, now)
        events, self.events_offset = read_events(self.state_dir, self.events_offset)
        for ev in events:
            if ev.get("kind") != "quarantine":
                continue
            for m in self.servers.values():
                if ev.get("port") == m.port and not m.failed:
                    self._restart(m, f"quarantined by the scheduler ({ev.get('message', '')})")
        self.write_state()

    def _frozen(self, m: _Managed, now: float) -> bool:
        """A process of the server's tree is stopped (SIGSTOP): it answers nothing, though
        registered. Past a grace (time for a health probe to see it first, when probes run) the
        server is killed and restarted. Probes cannot reach a server frozen inside a session
        (it is not free), this can."""
        import psutil

        stopped = []
        for p in m.proc.tree() if m.proc else []:
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_STOPPED:
                    stopped.append(p.pid)
        if not stopped:
            m.stopped_since = None
            return False
        m.stopped_since = m.stopped_since or now
        t = self.cfg.timeouts
        grace = t.probe + (t.probe_interval + t.probe if t.probe_interval > 0 else 0.0)
        if now - m.stopped_since >= grace:
            self._restart(m, f"frozen: process {stopped} stopped for {now - m.stopped_since:.0f} s")
        else:
            m.health = "frozen"
        return True

    def _probe(self, registered: set[tuple[str, int]], now: float) -> None:
        """Act on finished health probes, and start one per key every `probe_interval` s."""
        t = self.cfg.timeouts
        by_port = {m.port: m for m in self.servers.values()}
        for r in self.prober.collect():
            m = by_port.get(int(r.server.rpartition(":")[2])) if r.server else None
            if m is None or m.failed or m.started > now - r.seconds:
                continue  # inconclusive, not ours, or restarted since the probe began
            if r.ok:
                m.probe_ms = round(r.seconds * 1000, 1)
            else:
                m.probe_ms = None
                self._restart(m, f"failed the RPC health probe: {r.error}")
        if t.probe_interval <= 0:
            return
        for key in sorted({m.key for m in self.servers.values() if (m.key, m.port) in registered}):
            if now - self.last_probe.setdefault(key, now) < t.probe_interval:
                continue
            emulated = any(m.emulated for m in self.servers.values() if m.key == key)
            if self.prober.start(key, max(t.probe, 60.0) if emulated else t.probe):
                self.last_probe[key] = now

    def _reload_config(self) -> None:
        try:
            mtime = _config_path(self.state_dir).stat().st_mtime
        except OSError:
            return
        if mtime != self.cfg_mtime:
            self.cfg_mtime, self.cfg = mtime, self._load()
            self._sync_servers()

    def write_state(self) -> None:
        write_json(
            self.state_dir / "state.json",
            {
                "supervisor": Proc.of(os.getpid()).to_dict(),
                "tracker": {**self.tracker.record(), "addr": self.cfg.tracker},
                "servers": [m.record() for m in self.servers.values()],
                "updated": time.time(),
                "stopping": self.stopping,
            },
        )

    def shutdown(self) -> None:
        self.stopping = True
        for m in [*self.servers.values(), self.tracker]:
            if m.proc:
                m.proc.kill_tree()
            if m.popen:
                m.popen.poll()
            m.health = "stopped"
        self.write_state()
        from codesign.farm.arm_emulator import ArmRootfs, unmount_proc

        if any(m.emulated for m in self.servers.values()):
            unmount_proc(ArmRootfs().root)

    def run(self) -> None:
        def _term(*_: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
        try:
            self.start()
            while True:
                time.sleep(self.cfg.timeouts.health_interval)
                self.check()
        finally:
            self.shutdown()


# --------------------------------------------------------------------- client side
def read_state(state_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(state_dir) / "state.json")


def supervisor_proc(state_dir: Path) -> Proc | None:
    state = read_state(state_dir)
    proc = Proc.from_dict(state.get("supervisor")) if state else None
    return proc if proc and proc.alive else None


def start_farm(cfg: FarmConfig, *, wait: bool = True) -> dict[str, Any]:
    """Start the supervisor for `cfg` (in its own session) and wait until the farm serves."""
    if supervisor_proc(cfg.state_dir):
        raise FarmError(
            f"a farm is already running from {cfg.state_dir}; `codesign farm down` first "
            "(or use another --state-dir)"
        )
    import socket

    with socket.socket() as s:
        try:
            s.bind((cfg.tracker_host, cfg.tracker_port))
        except OSError as err:
            raise FarmError(
                f"tracker port {cfg.tracker}: {err}; another tracker (or program) uses it. "
                "Choose [tracker] port in farm.toml, or stop it (`codesign farm down`)"
            ) from None
    write_config(cfg)
    (cfg.state_dir / "state.json").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "codesign.farm.supervisor", str(cfg.state_dir)]
    spawn(argv, cfg.state_dir / "logs" / "supervisor.log")
    return wait_ready(cfg) if wait else {}


def wait_ready(cfg: FarmConfig, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Wait until every server (of `keys`) is healthy; FarmError past the register timeout."""
    emulated = any(g.emulated for g in cfg.servers if keys is None or g.key in keys)
    limit = cfg.timeouts.register + 30.0 + (120.0 if emulated else 0.0)
    end = time.monotonic() + limit
    state = None
    while time.monotonic() < end:
        state = read_state(cfg.state_dir)
        if state:
            servers = [s for s in state["servers"] if keys is None or s["key"] in keys]
            if (
                state["tracker"]["health"] == "healthy"
                and servers
                and all(s["health"] == "healthy" for s in servers)
            ):
                return state
        if (
            state is None
            and time.monotonic() > end - limit + 20
            and not supervisor_proc(cfg.state_dir)
        ):
            break
        time.sleep(0.25)
    log = cfg.state_dir / "logs"
    raise FarmError(
        f"the farm did not become ready within {limit:.0f} s (state: "
        f"{[(s['name'], s['health']) for s in state['servers']] if state else 'none'}); "
        f"see the logs in {log}"
    )


def stop_farm(state_dir: Path, timeout: float = 20.0) -> int:
    """Stop the supervisor and kill every recorded process tree by PID. Returns trees killed."""
    state_dir = Path(state_dir)
    state = read_state(state_dir)
    if state is None:
        return 0
    sup = Proc.from_dict(state.get("supervisor"))
    if sup and sup.alive:
        try:
            os.kill(sup.pid, signal.SIGCONT)
            os.kill(sup.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + timeout
        while sup.alive and time.monotonic() < end:
            time.sleep(0.1)
    state = read_state(state_dir) or state
    killed = 0
    procs = [Proc.from_dict(state["tracker"].get("proc"))]
    procs += [Proc.from_dict(s.get("proc")) for s in state["servers"]]
    for p in [sup, *procs]:
        if p is not None and p.alive:
            p.kill_tree()
            killed += 1
    return killed


if __name__ == "__main__":
    sys.modules.setdefault("torch", None)  # pyright: ignore[reportArgumentType]  tvm_ffi imports torch if it can (probes): 2 s
    Supervisor(Path(sys.argv[1])).run()
