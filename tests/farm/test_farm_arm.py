"""End to end on an emulated arm64 board: cross-compiled code runs under qemu and is correct.

Slow: the first run builds the arm64 chroot (debootstrap + aarch64 TVM wheels, ~4-7 min; cached
in ~/.cache/codesign/arm64-rootfs, or $CODESIGN_ARM_ROOTFS, afterwards). Needs root and
`apt-get install qemu-user-static debootstrap binfmt-support gcc-aarch64-linux-gnu`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from farm_helpers import farm_config, free_ports

from codesign.farm.arm_emulator import ArmRootfs, ensure_rootfs, missing_tools
from codesign.farm.config import ServerGroup

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rpc,
    pytest.mark.skipif(
        bool(missing_tools()) or os.geteuid() != 0 or not shutil.which("aarch64-linux-gnu-gcc"),
        reason="needs root, qemu-user-static, debootstrap and gcc-aarch64-linux-gnu",
    ),
]


@pytest.fixture(scope="module")
def arm_farm(tmp_path_factory):
    from codesign.farm.supervisor import start_farm, stop_farm

    ensure_rootfs(ArmRootfs())
    state = tmp_path_factory.mktemp("armfarm")
    cfg = farm_config(state, servers=1, job=600.0, session=600.0, register=120.0)
    port = free_ports(1)
    cfg = cfg.with_servers((ServerGroup("arm64", 1, port, threads=1, emulator="arm64"),))
    start_farm(cfg)
    yield cfg
    stop_farm(cfg.state_dir)


def test_cross_compiled_network_matches_x86(arm_farm) -> None:
    import torch
    import tvm
    from tvm import relax

    from codesign import get_space, parse_target
    from codesign.measurement import MeasureProtocol
    from codesign.modules import build_network
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_module
    from codesign.tvm_backend.runner import RPCRunner

    space = get_space("tiny")
    arch = space.decode("k3e6-k5e3_k7e6-skip_k3e3-k3e3")
    net = build_network(space, arch, seed=0).eval()
    shape = (1, *space.input_shape)
    low = lower_module(net, shape, label="tiny-net")
    arm = parse_target(f"arm:key=arm64,tracker={arm_farm.tracker},threads=1")
    x86 = parse_target("x86")
    x = np.random.default_rng(3).standard_normal(shape).astype("float32")

    runner = RPCRunner(arm.tracker, "arm64", config=arm_farm)
    assert runner.emulated
    res = runner.run_checked(
        compile_module(low, arm), MeasureProtocol(repeat=2, min_repeat_ms=5), input_array=x
    )
    assert res.measurement.ok, res.measurement.error
    assert res.measurement.median_ms > 0
    ref = relax.VirtualMachine(compile_module(low, x86).executable, tvm.cpu())
    x86_out = ref["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(res.output, x86_out, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(res.output, net(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_lut_build_cli_on_emulated_arm(arm_farm, tmp_path: Path) -> None:
    """`codesign lut build --target arm:key=...,tracker=...` against a running farm: rows are
    marked emulated; tuning on the emulator is refused with a clear error."""
    db = tmp_path / "arm.sqlite"
    target = f"arm:key=arm64,tracker={arm_farm.tracker},threads=1"
    env = {"CODESIGN_FARM_DIR": str(arm_farm.state_dir)}
    cmd = ["lut", "build", "--space", "tiny"]
    cmd += ["--target", target, "--db", str(db), "--limit", "2", "--repeat", "2"]
    cmd += ["--min-repeat-ms", "5", "--no-progress"]
    out = run_cli(*cmd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 measured" in out.stdout
    show = run_cli("lut", "show", "--db", str(db), "--json")
    entries = json.loads(show.stdout)["entries"]
    assert len(entries) == 2
    for e in entries:
        assert e["error"] is None and e["median_ms"] > 0
        assert e["provenance"]["emulated"] is True
        assert "(emulated)" in e["provenance"]["host"]
        assert e["provenance"]["target_json"].find("aarch64") >= 0
    tuned = run_cli(*cmd, "--trials", "2", env=env)
    assert tuned.returncode == 2 and "emulated" in tuned.stderr
