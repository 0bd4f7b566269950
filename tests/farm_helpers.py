"""Helpers for the farm tests: free loopback ports, fast farm configs, process-tree probes."""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

from codesign.farm.config import FarmConfig, Retries, ServerGroup, Timeouts
from codesign.farm.procs import Proc, read_events
from codesign.farm.supervisor import read_state

# Test farms share this machine's cores: each server runs one TVM thread, and jobs measure
# with the target whose threads match (a pool smaller than a target's threads is refused).
SERVER_THREADS = 1


def farm_target():
    from codesign.targets import parse_target

    return parse_target(f"x86:threads={SERVER_THREADS}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> int:
    """A base port such that base .. base+n-1 are free on 127.0.0.1 now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range found")


FAST = Timeouts(
    socket=3.0,
    request=20.0,
    job=20.0,
    session=30.0,
    health_interval=0.5,
    register=40.0,
    tracker_wait=90.0,
    server_tracker_retry=4.0,
    quarantine=300.0,
    # no health probes (a probe's session would look like a job's to the fault injectors), and
    # a stopped server is left to the scheduler's deadline: tests that want them set these
    probe=30.0,
    probe_interval=0.0,
)


def farm_config(
    state_dir: Path, servers: int = 2, key: str = "x86", **changes: float
) -> FarmConfig:
    base = free_ports(servers + 1)
    timeouts = dataclasses.replace(FAST, **changes)
    return FarmConfig(
        tracker_port=base,
        state_dir=state_dir,
        servers=(ServerGroup(key, servers, base + 1, threads=SERVER_THREADS),),
        timeouts=timeouts,
        retries=Retries(attempts=3, quarantine_after=2, max_restarts=10),
    )


def server_proc(cfg: FarmConfig, name: str) -> Proc:
    state = read_state(cfg.state_dir)
    rec = next(s for s in state["servers"] if s["name"] == name)
    return Proc.from_dict(rec["proc"])


def server_addr(cfg: FarmConfig, name: str) -> str:
    state = read_state(cfg.state_dir)
    rec = next(s for s in state["servers"] if s["name"] == name)
    return f"127.0.0.1:{rec['port']}"


def in_session(proc: Proc) -> bool:
    """An RPC server is serving a session when it has a per-session child (3 processes)."""
    return len(proc.tree()) >= 3


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    period: float = 0.05,
    explain: Callable[[], str] | None = None,
) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(period)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}" + (f"\n{explain()}" if explain else "")
    )


def story(state_dir: Path, last: int = 12) -> str:
    """The farm's last events and recorded processes, for assertion messages."""
    events = read_events(state_dir)[0][-last:]
    lines = [f"  {e['time']:.1f} {e['kind']}: {e['message']}" for e in events]
    st = read_state(state_dir) or {}
    for s in st.get("servers", []):
        proc = Proc.from_dict(s.get("proc"))
        tree = [p.pid for p in proc.tree()] if proc else []
        lines.append(f"  {s['name']}: {s['health']}, restarts {s['restarts']}, tree {tree}")
    return "farm events and servers:\n" + "\n".join(lines)


def healthy(cfg: FarmConfig) -> bool:
    st = read_state(cfg.state_dir)
    return (
        bool(st)
        and st["tracker"]["health"] == "healthy"
        and all(s["health"] == "healthy" for s in st["servers"])
    )


def module_farm(  # noqa: ANN201
    tmp_path_factory,  # noqa: ANN001
    servers: int,
    extra_keys: tuple[str, ...] = (),
    **changes: float,
):
    """A farm shared by the tests of one module (starting one costs ~10 s); always stopped.
    `servers` servers of key x86, plus one server for each of `extra_keys`."""
    from codesign.farm.supervisor import start_farm, stop_farm

    cfg = farm_config(tmp_path_factory.mktemp("farm"), servers=servers, **changes)
    for key in extra_keys:
        cfg = cfg.with_group(ServerGroup(key, 1, free_ports(1), threads=SERVER_THREADS))
    start_farm(cfg)
    try:
        yield cfg
    finally:
        stop_farm(cfg.state_dir)
