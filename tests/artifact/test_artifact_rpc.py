"""Artifacts on a remote device: a real TVM RPC tracker and x86 server on 127.0.0.1.

The tracker and server are started here on free ports, each in its own process group, and
stopped by PID at the end.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli

import codesign
from codesign.artifact.remote import (
    request_session,
    run_on_session,
)
from codesign.errors import FarmError, RemoteError
from codesign.farm.tracker import TrackerClient
from codesign.measurement import MeasureProtocol
from codesign.targets import host_threads

pytestmark = pytest.mark.rpc
KEY = "codesign-test-x86"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we created: the process and its workers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tracker() -> Iterator[str]:
    tport, sport = free_port(), free_port()
    # the server's pool holds the threads the artifact (x86: every CPU here) is measured with
    env = {**os.environ, "TVM_NUM_THREADS": str(host_threads())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
            + ["--port", str(tport), "--port-end", str(tport + 1)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    ]
    address = f"127.0.0.1:{tport}"
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1"]
                + ["--port", str(sport), "--port-end", str(sport + 1)]
                + ["--tracker", address, "--key", KEY],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        )
        deadline = time.time() + 120
        while True:
            try:
                if TrackerClient.at(address, timeout=5).summary().status(KEY).total:
                    break
            except (RemoteError, FarmError):
                pass
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail("the RPC tracker/server did not come up within 120 s")
            time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)


def _wait_free(address: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if TrackerClient.at(address).summary().status(KEY).free:
            return
        time.sleep(0.3)
    pytest.fail(f"the server of {KEY} did not become free again within {timeout} s")


def test_run_on_rpc_server_equals_local(tracker: str, x86_artifact: Path, tmp_path: Path) -> None:
    with codesign.load(x86_artifact) as local:
        art = local.artifact
        x = np.load(io.BytesIO(art.files["sample_input.npy"]))
        expected = local(x)
    # the predictor on a session
    _wait_free(tracker)
    session = request_session(tracker, KEY, timeout_s=30, session_timeout_s=120)
    with codesign.load(x86_artifact, session=session) as remote:
        np.testing.assert_allclose(remote(x), expected, rtol=1e-5, atol=1e-6)
        assert remote.executor.where == "rpc"
    del session
    # the one function taking a session
    _wait_free(tracker)
    session = request_session(tracker, KEY, timeout_s=30, session_timeout_s=120)
    workdir = art.extract(tmp_path / "files")
    run = run_on_session(
        session, workdir / "model.so", [x, x * 0.5], protocol=MeasureProtocol.quick()
    )
    np.testing.assert_allclose(run.outputs[0], expected, rtol=1e-5, atol=1e-6)
    assert run.outputs[1].shape == expected.shape and run.measurement.ok
    assert run.measurement.median_ms > 0
    del session
    # the command line
    _wait_free(tracker)
    np.save(tmp_path / "x.npy", x)
    out = run_cli(
        *["run", str(x86_artifact), "--input", str(tmp_path / "x.npy"), "--rpc-key", KEY]
        + ["--tracker", tracker, "--repeat", "2", "--min-repeat-ms", "1", "--json"]
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device"] == f"rpc key {KEY} via tracker {tracker}"
    assert report["latency_ms"] > 0
    best = max(range(expected.shape[1]), key=lambda i: expected[0, i])
    assert report["top"][0][0]["class"] == art.manifest.classes[best]


def test_more_threads_than_the_server_pool_are_refused(
    tracker: str, x86_artifact: Path, tmp_path: Path
) -> None:
    """A run labelled with N threads must not run on a server whose TVM pool holds fewer."""
    with codesign.load(x86_artifact) as local:
        workdir = local.artifact.extract(tmp_path / "files")
        x = np.load(io.BytesIO(local.artifact.files["sample_input.npy"]))
    _wait_free(tracker)
    session = request_session(tracker, KEY, timeout_s=30, session_timeout_s=120)
    with pytest.raises(RemoteError, match=f"TVM_NUM_THREADS={host_threads() + 1}"):
        run_on_session(session, workdir / "model.so", [x], threads=host_threads() + 1)
    del session


def test_unknown_key_and_unreachable_tracker_fail_fast(tracker: str) -> None:
    t0 = time.time()
    with pytest.raises(RemoteError, match=f"no RPC server with key 'nope' is registered.*{KEY}"):
        request_session(tracker, "nope", timeout_s=60)
    assert time.time() - t0 < 10
    with pytest.raises(RemoteError, match="cannot reach the RPC tracker"):
        request_session(f"127.0.0.1:{free_port()}", KEY, timeout_s=5)


def test_remote_target_with_wrong_architecture_is_refused(
    tracker: str, trained_model_dir: Path, tmp_path: Path
) -> None:
    """Compiling for `arm` checks on the target's device: this x86 server cannot load aarch64."""
    import shutil

    from codesign.artifact.pack import CompileOptions, compile_artifact

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64 cross compiler not installed (make toolchains)")
    _wait_free(tracker)
    out = tmp_path / "arm.tar"
    opts = CompileOptions(val_limit=0, check_inputs=1, rpc_timeout_s=30, progress=False)
    with pytest.raises(RemoteError, match="could not load model.so"):
        compile_artifact(trained_model_dir, f"arm:key={KEY},tracker={tracker}", out, opts)
    assert not out.exists()


def test_busy_server_request_times_out(tracker: str) -> None:
    """TVM's own request would wait forever for a busy key; ours gives up at the deadline."""
    _wait_free(tracker)
    held = request_session(tracker, KEY, timeout_s=30, session_timeout_s=60)
    t0 = time.time()
    with pytest.raises(RemoteError, match=f"no free RPC server for key '{KEY}'.*within 2 s"):
        request_session(tracker, KEY, timeout_s=2)
    assert 1.5 < time.time() - t0 < 10
    del held
