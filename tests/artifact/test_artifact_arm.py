"""An ARM artifact built here, checked, measured and run on an emulated arm64 RPC server.

Needs the arm64 chroot of the device farm (qemu-user + Debian arm64 + runtime-only TVM; built by
`codesign.farm.arm_emulator.ensure_rootfs`, at $CODESIGN_ARM_ROOTFS or
~/.cache/codesign/arm64-rootfs), root (chroot) and the aarch64 cross compiler; skipped without
them. The tracker and the chroot server are started here on free ports and stopped by PID.
Emulated timings are not ARM timings: the manifest records them as emulated.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import codesign
from codesign.artifact.remote import request_session
from codesign.errors import FarmError, RemoteError
from codesign.farm.tracker import TrackerClient

pytestmark = pytest.mark.rpc
ROOT = Path(
    os.environ.get("CODESIGN_ARM_ROOTFS", Path.home() / ".cache" / "codesign" / "arm64-rootfs")
)
SITE = "/opt/tvm-site"
KEY = "codesign-test-arm64"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "chroot needs root"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        return "aarch64 cross compiler not installed (make toolchains)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 is not registered with binfmt_misc"
    if not (ROOT / SITE.lstrip("/") / "tvm").is_dir():
        return f"no arm64 chroot with TVM at {ROOT} (build it with the device farm)"
    return None


@pytest.fixture(scope="module")
def arm_tracker():
    why = _missing()
    if why:
        pytest.skip(why)
    tport, sport = _free_port(), _free_port()
    address = f"127.0.0.1:{tport}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
            + ["--port", str(tport), "--port-end", str(tport + 1)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    server = ["chroot", str(ROOT), "env", f"PYTHONPATH={SITE}", "TVM_USE_RUNTIME_LIB=1"]
    server += ["TVM_NUM_THREADS=2", "HOME=/root", "/usr/bin/python3", "-m", "tvm.exec.rpc_server"]
    server += ["--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 1)]
    server += ["--tracker", address, "--key", KEY]
    server += ["--load-library", f"{SITE}/tvm/lib/libtvm_runtime_extra.so"]
    try:
        procs.append(
            subprocess.Popen(
                server,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        deadline = time.time() + 180
        while True:
            try:
                if TrackerClient.at(address, timeout=5).summary().status(KEY).total:
                    break
            except (RemoteError, FarmError):
                pass
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail("the emulated arm64 RPC server did not register within 180 s")
            time.sleep(1)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)


def test_arm_artifact_checked_and_run_on_emulated_arm(
    arm_tracker: str, trained_model_dir: Path, tmp_path: Path
) -> None:
    from codesign.artifact.pack import CompileOptions, compile_artifact
    from codesign.measurement import MeasureProtocol

    out = tmp_path / "arm.tar"
    opts = CompileOptions(
        protocol=MeasureProtocol(repeat=3, min_repeat_ms=20),
        val_limit=40,
        check_inputs=3,
        emulated=True,
        rpc_timeout_s=120,
        progress=False,
    )
    target = f"arm:key={KEY},tracker={arm_tracker},threads=2"
    art = compile_artifact(trained_model_dir, target, out, opts).artifact
    d = art.manifest.data
    assert art.elf.machine == "aarch64"
    assert d["equality"]["ok"] and d["equality"]["checked_on"].startswith(f"rpc key {KEY}")
    assert d["accuracy"]["n"] == 40
    assert abs(d["accuracy"]["top1"] - d["accuracy"]["torch_top1"]) <= 100 * 2 / 40
    assert d["latency"]["median_ms"] > 0 and d["latency"]["emulated"] is True
    # run it again later, as a user would: verified, uploaded, run over RPC
    x = np.load(io.BytesIO(art.files["sample_input.npy"]))
    session = request_session(arm_tracker, KEY, timeout_s=120, session_timeout_s=300)
    with codesign.load(out, session=session) as remote:
        y = remote(x)
    np.testing.assert_allclose(
        y, np.load(io.BytesIO(art.files["sample_output.npy"])), rtol=1e-5, atol=1e-6
    )
