"""Farm health by what a server answers: RPC probes, frozen servers replaced, bounded RPC calls.

Real tracker and servers on 127.0.0.1; every wait is bounded and every farm is stopped.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from farm_helpers import farm_config, farm_target, free_ports, server_proc, story, wait_for

from codesign.errors import FarmError
from codesign.farm.deadline import RpcDeadline
from codesign.farm.measure import FarmSpec
from codesign.farm.probe import probe
from codesign.farm.procs import read_events
from codesign.farm.supervisor import read_state, start_farm, stop_farm
from codesign.farm.tracker import TRACKER_MAGIC
from codesign.lut import LatencyTable
from codesign.lut_build import build_lut
from codesign.measurement import MeasureProtocol

pytestmark = pytest.mark.rpc


def test_deadline_cuts_a_call_to_a_silent_server() -> None:
    """A peer that accepts and never answers: a blocking receive ends at the deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        with (
            pytest.raises(FarmError, match=r"reading: the RPC server .* within 0\.5 s"),
            RpcDeadline("127.0.0.1", port, 0.5).bound("reading", FarmError),
        ):
            data = client.recv(4)  # returns b"" once shut down
            raise ConnectionResetError(f"peer closed ({data!r})")
        assert time.monotonic() - t0 < 3
        client.close()
    # a block that finishes in time is untouched
    with RpcDeadline("127.0.0.1", port, 5).bound("nothing"):
        pass


def _tracker(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(2)
    popen = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
        + ["--port", str(port), "--port-end", str(port + 1)],
        stdout=(tmp_path / "tracker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    from codesign.farm.tracker import TrackerClient

    client = TrackerClient("127.0.0.1", port, 1.0)
    wait_for(client.ping, 60, "the tracker to answer", period=0.2)
    return popen, f"127.0.0.1:{port}"


def _register_fake_server(tracker_port: int, key: str, port: int) -> socket.socket:
    """Register host:port as a server of `key` (the tracker protocol's UPDATE_INFO + PUT)."""
    sock = socket.create_connection(("127.0.0.1", tracker_port), timeout=5)
    sock.sendall(struct.pack("<i", TRACKER_MAGIC))
    assert struct.unpack("<i", sock.recv(4))[0] == TRACKER_MAGIC
    for msg in (
        [5, {"key": f"server:{key}", "addr": [None, port]}],
        [3, key, [port, f"{key}:0.5"], None],
    ):
        raw = json.dumps(msg).encode()
        sock.sendall(struct.pack("<i", len(raw)) + raw)
        size = struct.unpack("<i", sock.recv(4))[0]
        assert json.loads(sock.recv(size)) == 0
    return sock


def test_probe_fails_within_its_timeout_on_a_registered_silent_server(tmp_path: Path) -> None:
    """The tracker lists a server that accepts connections and never answers (what a frozen
    server looks like from outside): the probe names it and fails in about its timeout, where
    TVM's own connect would block forever. A key with no server is inconclusive, not a hang."""
    popen, tracker = _tracker(tmp_path)
    try:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(4)
            port = silent.getsockname()[1]
            reg = _register_fake_server(int(tracker.rpartition(":")[2]), "fake", port)
            r = probe(tracker, "fake", timeout=2.0)  # r.seconds: from the request on
            reg.close()
        assert not r.ok and r.server == f"127.0.0.1:{port}", r
        assert "did not answer within 2 s" in r.error, r
        assert 1.9 < r.seconds < 8, r
        none = probe(tracker, "nobody", timeout=1.0)
        assert none.inconclusive and "no free server" in none.error
    finally:
        popen.kill()
        popen.wait(10)


def _rows(lut: Path, target_key: str) -> list:
    with LatencyTable(lut, readonly=True) as t:
        return t.entries(target_key, "untuned")


@pytest.mark.slow  # a farm start and a LUT build: ~40 s idle, minutes on a loaded host
def test_frozen_server_is_probed_replaced_and_the_build_completes(tmp_path: Path, tiny) -> None:
    """Two servers, probes every second. Each server passes a probe (a round trip is recorded);
    then x86-0's serving process (the popen_worker child, which owns the listening socket and
    the tracker link) is SIGSTOPped while idle: the tracker still lists it as free. The
    supervisor kills and replaces it within a bounded time, and a LUT build started right after
    the freeze completes with every row (a job sent to the frozen server is retried)."""
    cfg = farm_config(
        tmp_path / "state", servers=2, job=8.0, probe=3.0, probe_interval=1.0, quarantine=300.0
    )
    start_farm(cfg)
    try:
        wait_for(
            lambda: all(s["probe_ms"] for s in read_state(cfg.state_dir)["servers"]),
            60,
            "both servers to pass a health probe",
            explain=lambda: story(cfg.state_dir),
        )
        victim = server_proc(cfg, "x86-0")
        worker = victim.tree()[1]  # rpc_server -> popen_worker
        worker.suspend()
        frozen_at = time.time()
        x86 = farm_target()
        blocks = tiny.blocks()[:3]
        report = build_lut(
            tiny,
            x86,
            tmp_path / "lut.sqlite",
            protocol=MeasureProtocol(repeat=2, number=1, min_repeat_ms=20),
            blocks=blocks,
            progress=False,
            farm=FarmSpec(cfg.tracker, "x86", cfg),
        )
        rows = _rows(tmp_path / "lut.sqlite", x86.key)
        assert sorted(e.key for e in rows) == sorted(b.key for b in blocks), report
        assert all(e.ok for e in rows) and not report.failed
        wait_for(
            lambda: not victim.alive and server_proc(cfg, "x86-0") != victim,
            60,
            "the frozen server to be killed and replaced",
            explain=lambda: story(cfg.state_dir),
        )
        wait_for(
            lambda: read_state(cfg.state_dir)["servers"][0]["health"] == "healthy",
            60,
            "the replacement to register",
            explain=lambda: story(cfg.state_dir),
        )
        restarts = [
            e
            for e in read_events(cfg.state_dir)[0]
            if e["kind"] == "restart" and e.get("server") == "x86-0" and e["time"] > frozen_at
        ]
        assert restarts, story(cfg.state_dir)
        why, replaced_in = restarts[0]["message"], restarts[0]["time"] - frozen_at
        assert any(w in why for w in ("health probe", "frozen", "quarantined")), why
        assert replaced_in < 45, (replaced_in, why)  # probe: interval + timeout + a check
        print(f"frozen server replaced in {replaced_in:.1f} s: {why}")
    finally:
        stop_farm(cfg.state_dir)
