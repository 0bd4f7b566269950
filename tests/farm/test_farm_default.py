"""The default farm serves this machine's artifacts; `codesign run` over RPC picks its threads
and ends in an error within --rpc-timeout when the server is frozen."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from farm_helpers import free_ports, server_proc

from codesign.cli.main import main
from codesign.errors import FarmError
from codesign.farm.config import DEFAULT_KEY, load_config
from codesign.targets import host_threads


def test_default_config_is_one_local_server_with_this_machines_threads(tmp_path: Path) -> None:
    cfg = load_config(None, state_dir=tmp_path)
    (group,) = cfg.servers
    assert (group.key, group.count, group.port, cfg.tracker) == (
        DEFAULT_KEY,
        1,
        9100,
        "127.0.0.1:9190",
    )
    assert group.threads == 0 and group.server_threads() == host_threads()
    toml = tmp_path / "farm.toml"
    toml.write_text("[[servers]]\nkey = 'x'\nthreads = 3\n")
    assert load_config(toml).servers[0].server_threads() == 3
    toml.write_text("[[servers]]\nkey = 'x'\nthreads = -1\n")
    with pytest.raises(FarmError, match="bad server group"):
        load_config(toml)


def _run(capsys, *argv: str) -> tuple[int, str, str, float]:  # noqa: ANN001
    t0 = time.monotonic()
    rc = main(["run", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err, time.monotonic() - t0


@pytest.mark.rpc
def test_run_on_the_default_farm_shape(tmp_path: Path, x86_artifact: Path, capsys) -> None:  # noqa: ANN001
    """A farm as `codesign farm up` makes it (key `local`, threads from this machine) runs the
    default x86 artifact over RPC, with its own threads or fewer (--threads 1); a frozen server
    ends `codesign run --rpc-timeout 3` in an error (exit 2) instead of a hang."""
    from codesign.artifact.verify import verify_artifact
    from codesign.farm.supervisor import start_farm, stop_farm

    base = free_ports(2)
    toml = tmp_path / "farm.toml"
    toml.write_text(
        f"[tracker]\nport = {base}\n[farm]\nstate_dir = '{tmp_path / 'state'}'\n"
        # probes off: the frozen server must still be frozen when `run` reaches it
        "[timeouts]\nhealth_interval = 0.5\nprobe_interval = 0\nprobe = 120\n"
        f"[[servers]]\nkey = '{DEFAULT_KEY}'\nport = {base + 1}\n"
    )
    cfg = load_config(toml)
    shape = verify_artifact(x86_artifact).manifest.input.shape
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal(shape[1:]).astype("float32"))
    remote = [str(x86_artifact), "--input", str(x), "--rpc-key", DEFAULT_KEY]
    remote += ["--tracker", cfg.tracker, "--repeat", "2", "--min-repeat-ms", "5", "--json"]
    start_farm(cfg)
    try:
        rc, out, err, _ = _run(capsys, *remote)
        assert rc == 0, err
        assert json.loads(out)["device"] == f"rpc key {DEFAULT_KEY} via tracker {cfg.tracker}"
        rc, out, err, _ = _run(capsys, *remote, "--threads", "1")
        assert rc == 0, err
        assert json.loads(out)["latency_ms"] > 0

        victim = server_proc(cfg, f"{DEFAULT_KEY}-0")
        worker = victim.tree()[1]  # the popen_worker: listening socket and tracker link
        worker.suspend()
        try:
            rc, out, err, took = _run(capsys, *remote, "--rpc-timeout", "3")
        finally:
            worker.resume()
        # frozen mid-listing: the call times out; or the tracker already counts it busy
        assert rc == 2 and ("did not answer within 3 s" in err or "within 3 s" in err), (rc, err)
        assert "Traceback" not in err and took < 15, took
    finally:
        stop_farm(cfg.state_dir)


def test_one_rpc_timeout_option_bounds_every_farm_phase(capsys) -> None:  # noqa: ANN001
    """`--rpc-timeout` is one option (argtypes.add_rpc_timeout) on run, compile and lut build;
    on the farm it bounds the tracker exchange and the wait for a server, and a job's four
    phases (connect, upload, load, time) together."""
    from codesign.cli.main import build_parser
    from codesign.farm.config import FarmConfig

    parser = build_parser()
    for argv in (
        ["run", "m.tar", "--input", "x.npy"],
        ["compile", "--model", "m", "--target", "x86", "--out", "m.tar"],
        ["lut", "build", "--space", "tiny", "--target", "x86", "--db", "l.sqlite"],
    ):
        assert parser.parse_args([*argv, "--rpc-timeout", "20"]).rpc_timeout == 20.0
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*argv, "--rpc-timeout", "0"])
        assert exc.value.code == 2 and "give a number > 0" in capsys.readouterr().err
    assert parser.parse_args(["lut", "build", "--space", "s", "--target", "x86", "--db", "d"])
    cfg = FarmConfig()
    assert cfg.with_rpc_timeout(None) is cfg
    t = cfg.with_rpc_timeout(20.0).timeouts
    assert (t.request, t.job, t.socket, t.probe) == (20.0, 80.0, 5.0, 5.0)
    assert t.session >= t.job
    assert cfg.with_rpc_timeout(2.0).timeouts.socket == 2.0
