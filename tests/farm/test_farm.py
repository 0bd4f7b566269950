"""The device farm: config, bounded tracker client, supervisor, CLI (real tracker + servers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from farm_helpers import (
    farm_target,
    free_ports,
    healthy,
    module_farm,
    server_proc,
    story,
    wait_for,
)

from codesign.errors import FarmError, NoServerError
from codesign.farm.config import load_config
from codesign.farm.procs import Proc, read_events, spawn
from codesign.farm.scheduler import classify, key_is_emulated
from codesign.farm.supervisor import read_state
from codesign.farm.tracker import RequestTimeout, TrackerClient, TrackerUnavailable

TOML = """
[tracker]
port = 9290
[farm]
state_dir = "{state}"
[timeouts]
job = 15
[retries]
attempts = 4
[[servers]]
key = "x86"
count = 2
port = 9300
[[servers]]
key = "arm64"
port = 9370
emulator = "arm64"
"""


@pytest.fixture(scope="module")
def x86():
    """The target farm jobs measure with: as many threads as each server runs."""
    return farm_target()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server of key x86 and one of key x86b, shared by this module's RPC tests."""
    yield from module_farm(tmp_path_factory, 1, extra_keys=("x86b",))


@pytest.fixture
def cfg(shared):
    wait_for(lambda: healthy(shared), 60, "the shared farm to be healthy")
    return shared


def test_config_file_and_bad_configs(tmp_path: Path) -> None:
    path = tmp_path / "farm.toml"
    path.write_text(TOML.format(state=tmp_path / "st"))
    cfg = load_config(path)
    assert cfg.tracker == "127.0.0.1:9290" and cfg.state_dir == tmp_path / "st"
    assert cfg.timeouts.job == 15.0 and cfg.timeouts.request == 30.0 and cfg.retries.attempts == 4
    assert [n for g in cfg.servers for n in g.names()] == [
        ("x86-0", 9300),
        ("x86-1", 9301),
        ("arm64-0", 9370),
    ]
    assert key_is_emulated(cfg, "127.0.0.1:9290", "arm64")
    assert not key_is_emulated(cfg, "127.0.0.1:9290", "x86")
    assert load_config(None).servers[0].key == "local"  # the default farm: this machine
    for bad, msg in [
        ("[timeouts]\njobs = 3\n", "unknown option"),
        ("[[servers]]\nkey='a'\nport=9100\ncount=2\n[[servers]]\nkey='b'\nport=9101\n", "overlap"),
        ("[[servers]]\nkey='a'\nemulator='riscv'\n", "emulator"),
        ("[tracker\n", "not valid TOML"),
        ("[farms]\n", "unknown section"),
    ]:
        path.write_text(bad)
        with pytest.raises(FarmError, match=msg):
            load_config(path)
    with pytest.raises(FarmError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_error_classification() -> None:
    assert classify("InternalError", "Check failed: code == kReturn: code=kShutdown") == "retry"
    assert classify("RPCSessionTimeoutError", "Your 4.0s session has expired") == "retry"
    assert classify("InternalError", "SockChannel::Recv Error:Connection reset by peer") == "retry"
    assert classify("TrackerUnavailable", "refused") == "tracker"
    assert classify("RequestTimeout", "no server") == "retry"
    assert classify("TVMError", "Failed to load dynamic shared library x.so") == "fatal"


def test_tracker_down_is_a_clear_error_fast() -> None:
    port = free_ports(1)
    t0 = time.time()
    with pytest.raises(TrackerUnavailable, match="codesign farm up"):
        TrackerClient("127.0.0.1", port, timeout=2.0).summary()
    assert time.time() - t0 < 3.0


@pytest.mark.rpc
def test_unknown_key_fails_fast_and_requests_are_bounded(cfg) -> None:
    from tvm import rpc  # before any request: a match key is only valid for a few seconds

    client = TrackerClient("127.0.0.1", cfg.tracker_port, timeout=cfg.timeouts.socket)
    t0 = time.time()
    with pytest.raises(NoServerError, match="no RPC server with key 'nope'.*keys there: x86"):
        client.check_key("nope")
    # a key nobody serves: TVM's own request would block forever; ours gives up on time
    with pytest.raises(RequestTimeout, match="within 1.5 s"):
        client.request("nope", timeout=1.5)
    assert time.time() - t0 < cfg.timeouts.socket + 2.5
    # the scheduler and LUT building refuse before compiling anything
    from codesign.farm.measure import FarmSpec, Item, measure_many
    from codesign.measurement import MeasureProtocol

    def never() -> None:
        raise AssertionError("compiled although the key has no server")

    t0 = time.time()
    with pytest.raises(NoServerError):
        measure_many(
            [Item("x", never)], MeasureProtocol.quick(), FarmSpec(cfg.tracker, "nope", cfg), print
        )
    assert time.time() - t0 < cfg.timeouts.socket
    a = client.request("x86", timeout=5.0)
    assert a.port == cfg.servers[0].port and a.key == "x86"
    sess = rpc.connect(a.host, a.port, a.matchkey)  # hand the server back at once
    del sess


@pytest.mark.skipif(
    sys.platform != "linux", reason="simulates the step through psutil's Linux code"
)
def test_process_identity_survives_a_wall_clock_step(tmp_path: Path, monkeypatch) -> None:
    """psutil's create_time moves with the wall clock (boot time + start); a recorded farm
    process must stay itself across a step (a VM resumed from a pause, NTP), or the supervisor
    takes live servers for dead and restarts them onto their own busy ports."""
    import psutil
    from psutil import _pslinux

    popen, proc = spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    try:
        before = psutil.Process(proc.pid).create_time()
        real = _pslinux.boot_time
        monkeypatch.setattr(_pslinux, "boot_time", lambda: real() + 3.0)  # the clock jumps 3 s
        assert psutil.Process(proc.pid).create_time() - before == pytest.approx(3.0, abs=0.02)
        assert proc.alive and Proc.from_dict(proc.to_dict()) == proc
        assert [p.pid for p in proc.tree()] == [proc.pid]
        assert not Proc(proc.pid, proc.started - 1.0).alive  # a recycled PID is someone else
        assert Proc.from_dict({"pid": proc.pid, "create_time": before}) is None  # old state file
    finally:
        assert proc.kill_tree() == 1
        popen.wait(10)
    assert not proc.alive


@pytest.mark.rpc
def test_cli_up_status_down_and_supervised_restart(tmp_path: Path) -> None:
    """`codesign farm up/status/down` from separate processes; a killed server is restarted."""
    base = free_ports(3)
    state = tmp_path / "st"
    (tmp_path / "farm.toml").write_text(
        f"[tracker]\nport = {base}\n[farm]\nstate_dir = '{state}'\n"
        "[timeouts]\nhealth_interval = 0.5\nprobe_interval = 0\n"
        f"[[servers]]\nkey = 'x86'\ncount = 2\nport = {base + 1}\n"
    )
    # subprocesses on purpose: up, status and down must work from separate processes
    cli = [sys.executable, "-m", "codesign.cli.main", "farm"]
    conf = ["--config", str(tmp_path / "farm.toml")]
    try:
        up = subprocess.run([*cli, "up", *conf], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        assert "x86-0" in up.stdout and "healthy" in up.stdout
        out = subprocess.run(
            [*cli, "status", *conf, "--json"], capture_output=True, text=True, timeout=60
        )
        st = json.loads(out.stdout)
        assert st["tracker_ok"] and st["supervisor_running"]
        assert st["keys"] == [{"key": "x86", "total": 2, "free": 2, "pending": 0}]
        again = subprocess.run([*cli, "up", *conf], capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "already running" in again.stderr

        cfg = load_config(tmp_path / "farm.toml")
        victim = server_proc(cfg, "x86-1")
        assert len(victim.tree()) == 2, story(state)  # rpc_server -> popen_worker
        victim.kill_tree()
        wait_for(
            lambda: (
                server_proc(cfg, "x86-1") != victim
                and read_state(state)["servers"][1]["health"] == "healthy"
            ),
            60,
            "the supervisor to restart the killed server",
        )
        events = [e["message"] for e in read_events(state)[0] if e["kind"] == "restart"]
        assert any("x86-1: process exited" in m for m in events)
        out = subprocess.run([*cli, "status", *conf], capture_output=True, text=True, timeout=60)
        assert "x86-1" in out.stdout and "process exited" in out.stdout
        recorded = [Proc.from_dict(s["proc"]) for s in read_state(state)["servers"]]
        recorded.append(Proc.from_dict(read_state(state)["tracker"]["proc"]))
    finally:
        down = subprocess.run([*cli, "down", *conf], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not any(p.alive for p in recorded), "a farm process survived `farm down`"


@pytest.mark.rpc
def test_zombie_server_after_session_crash_is_restarted(cfg) -> None:
    """Killing only the per-session child leaves TVM's server alive but de-registered for good
    (a zombie); health is judged by registration, so the supervisor restarts it."""
    from tvm import rpc

    client = TrackerClient("127.0.0.1", cfg.tracker_port)
    restarts = read_state(cfg.state_dir)["servers"][0]["restarts"]
    a = client.request("x86", timeout=10)
    sess = rpc.connect(a.host, a.port, a.matchkey, session_timeout=30)
    proc = server_proc(cfg, "x86-0")
    wait_for(
        lambda: len(proc.tree()) >= 3, 10, "the session child", explain=lambda: story(cfg.state_dir)
    )
    os.kill(proc.tree()[-1].pid, signal.SIGKILL)
    del sess
    wait_for(
        lambda: (
            read_state(cfg.state_dir)["servers"][0]["restarts"] > restarts
            and read_state(cfg.state_dir)["servers"][0]["health"] == "healthy"
        ),
        60,
        "the zombie server to be restarted",
    )
    assert any("zombie" in e["message"] for e in read_events(cfg.state_dir)[0])
    assert client.summary().status("x86").total == 1


@pytest.mark.rpc
def test_rpc_runner_matches_local_runner(cfg, tiny) -> None:
    """Same library, same input: the output over RPC equals the local one, and the server's
    time_evaluator is of the same order as the local one (a loose bound: the machine is shared
    and noisy; benchmarks/farm.py measures the agreement in interleaved rounds)."""
    import tvm
    from tvm import relax

    from codesign.measurement import MeasureProtocol
    from codesign.targets import parse_target
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import LocalRunner, RPCRunner

    block = tiny.layers()[1].block("k5e6")
    built = compile_module(lower_block(block), parse_target("x86:threads=1"))
    x = np.random.default_rng(0).standard_normal(built.input_shape).astype("float32")
    runner = RPCRunner(cfg.tracker, "x86", config=cfg)
    assert not runner.emulated
    proto = MeasureProtocol(repeat=5, min_repeat_ms=50)
    res = runner.run_checked(built, proto, input_array=x)
    assert res.measurement.ok, res.measurement.error
    assert runner.last_server == f"127.0.0.1:{cfg.servers[0].port}"
    local_out = relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(res.output, local_out.numpy(), rtol=1e-5, atol=1e-6)
    local = LocalRunner().run(built, proto)
    ratio = res.measurement.median_ms / local.median_ms
    assert 1 / 3 < ratio < 3, (res.measurement.median_ms, local.median_ms)


@pytest.mark.rpc
def test_tuning_guards_fail_fast(tmp_path: Path, cfg, tiny, x86) -> None:
    """Farm tuning checks the key before MetaSchedule starts (its RPCRunner would hang) and
    refuses emulated devices."""
    from codesign.errors import TuningError
    from codesign.farm.measure import FarmSpec
    from codesign.lut_build import build_lut
    from codesign.measurement import MeasureProtocol

    lut = tmp_path / "lut.sqlite"
    block = [tiny.layers()[3].block("k3e3")]
    kw = {"trials": 2, "protocol": MeasureProtocol.quick(), "blocks": block, "progress": False}
    t0 = time.time()
    with pytest.raises(NoServerError, match="'nope'"):
        build_lut(tiny, x86, lut, farm=FarmSpec(cfg.tracker, "nope", cfg), **kw)
    assert time.time() - t0 < 60
    with pytest.raises(TuningError, match="emulated"):
        build_lut(tiny, x86, lut, farm=FarmSpec(cfg.tracker, "x86", cfg, emulated=True), **kw)
    from codesign.lut import LatencyTable

    with LatencyTable(lut) as t:
        assert t.count_tuning_records(x86.key) == 0 and not t.entries()


@pytest.mark.slow
@pytest.mark.rpc
def test_tuning_through_the_farm(tmp_path: Path, farm_factory, tiny, x86) -> None:
    """MetaSchedule's RPCRunner on the farm, guarded: real trials are measured on the servers
    and stored; no popen worker outlives the run (~90 s)."""
    import psutil
    from farm_helpers import farm_config

    from codesign.farm.measure import FarmSpec
    from codesign.lut import LatencyTable
    from codesign.lut_build import build_lut
    from codesign.measurement import MeasureProtocol

    cfg = farm_factory(farm_config(tmp_path / "farm", servers=2))
    lut = tmp_path / "lut.sqlite"
    block = [tiny.layers()[3].block("k3e3")]
    r = build_lut(
        tiny,
        x86,
        lut,
        trials=2,
        protocol=MeasureProtocol.quick(),
        blocks=block,
        progress=False,
        farm=FarmSpec(cfg.tracker, "x86", cfg),
    )
    assert r.valid_records > 0 and r.measured == 1 and not r.failed, r
    with LatencyTable(lut) as t:
        assert t.count_tuning_records(x86.key) >= r.valid_records
        (entry,) = t.entries(x86.key, "tuned")
    assert entry.provenance.tuned and entry.tuning_digest
    strays = [
        p
        for p in psutil.Process().children(recursive=False)
        if "popen_worker" in " ".join(p.cmdline())
    ]
    assert not strays, "MetaSchedule popen workers outlived the tuning run"


@pytest.mark.rpc
@pytest.mark.slow  # ~35 s; tuning through the farm (with test_tuning_through_the_farm): `make test-all`
def test_farm_tuning_spends_its_budget_as_local_tuning_does(
    tmp_path: Path, farm_factory, block_tasks, x86
) -> None:
    """Seed schedules first, then MetaSchedule's search, every candidate measured on the farm's
    server (the farm used to skip the seeds); no popen worker outlives the run."""
    import psutil
    from farm_helpers import farm_config

    from codesign.farm.measure import FarmSpec
    from codesign.farm.tuning import tune_on_farm

    cfg = farm_factory(farm_config(tmp_path / "farm", servers=1))
    ts, db = block_tasks
    report = tune_on_farm(ts, x86, db, FarmSpec(cfg.tracker, "x86", cfg), trials_per_task=2)
    assert report.tuned_tasks == 3 and report.trials == 6
    for task in ts.tasks:
        assert db.run_finished(f"seeds:{db.task_hash(task.mod)}")
        assert 1 <= db.valid_count(task.mod) <= 2  # 1 seed + 1 search trial (minus failures)
    assert (
        tune_on_farm(ts, x86, db, FarmSpec(cfg.tracker, "x86", cfg), trials_per_task=2).trials == 0
    )
    strays = [
        p
        for p in psutil.Process().children(recursive=False)
        if "popen_worker" in " ".join(p.cmdline())
    ]
    assert not strays, "MetaSchedule popen workers outlived the tuning run"


@pytest.mark.rpc
def test_scheduler_spreads_jobs_over_keys(tmp_path: Path, cfg, tiny, x86) -> None:
    """Jobs of two keys (two targets) run side by side, each on its own key's servers; every
    job is reported exactly once."""
    from codesign.farm.scheduler import FarmScheduler, Job
    from codesign.measurement import MeasureProtocol
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import prepare_job

    built = compile_module(lower_block(tiny.layers()[0].block("k3e3")), x86)
    payload = prepare_job(built, MeasureProtocol.quick(), tmp_path)
    jobs = [Job(f"{k}-{i}", k, cfg.tracker, payload) for i in range(3) for k in ("x86", "x86b")]
    results = []
    report = FarmScheduler(cfg).run(jobs, results.append)
    assert sorted(r.job.id for r in results) == sorted(j.id for j in jobs)
    assert all(r.measurement.ok for r in results), [r.measurement.error for r in results]
    ports = {g.key: g.port for g in cfg.servers}
    for r in results:
        assert r.server == f"127.0.0.1:{ports[r.job.key]}"
    assert report.succeeded == 6 and report.retries == 0
