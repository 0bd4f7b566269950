"""The command line as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import CliResult, run_cli


def run(*args: str) -> CliResult:
    return run_cli(*args)


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("targets", "spaces", "lut"):
        assert cmd in out.stdout
    assert run("lut", "build", "--help").returncode == 0


def test_targets_prints_tvm_json() -> None:
    out = run("targets", "--json")
    assert out.returncode == 0
    targets = {t["name"]: t for t in json.loads(out.stdout)}
    assert set(targets) == {"x86", "cuda", "arm"}
    assert targets["x86"]["tvm"]["kind"] == "llvm" and targets["x86"]["tvm"]["mcpu"]
    assert targets["arm"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    text = run("targets").stdout
    assert '"kind":"llvm"' in text


def test_spaces_lists_registered_spaces() -> None:
    rows = {r["name"]: r for r in json.loads(run("spaces", "--json").stdout)}
    assert rows["proxyless"]["layers"] == 21 and rows["tiny"]["distinct_blocks"] == 39


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (
            ["lut", "build", "--space", "tiny", "--target", "tpu", "--db", "X"],
            "unknown target 'tpu'",
        ),
        (
            ["lut", "build", "--space", "huge", "--target", "x86", "--db", "X"],
            "unknown search space",
        ),
        (["lut", "show", "--db", "does-not-exist.sqlite"], "does not exist"),
        (
            ["compile", "--model", "X", "--target", "x86", "--out", "X", "--focus-trials", "-1"],
            "--focus-trials",
        ),
    ],
)
def test_bad_input_gives_clear_error(args: list[str], msg: str, tmp_path: Path) -> None:
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    out = run(*args)
    assert out.returncode == 2
    assert msg in out.stderr and "Traceback" not in out.stderr


def test_corrupt_db_is_refused_and_kept(tmp_path: Path) -> None:
    db = tmp_path / "lut.sqlite"
    db.write_bytes(b"not a database" * 64)
    out = run("lut", "build", "--space", "tiny", "--target", "x86", "--db", str(db))
    assert out.returncode == 2 and "left untouched" in out.stderr
    assert db.read_bytes() == b"not a database" * 64


def test_build_and_show(tmp_path: Path) -> None:
    db = tmp_path / "lut.sqlite"
    out = run(
        "lut",
        "build",
        "--space",
        "tiny",
        "--target",
        "x86",
        "--db",
        str(db),
        "--limit",
        "2",
        "--repeat",
        "2",
        "--min-repeat-ms",
        "1",
        "--json",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["measured"] == 2 and report["mode"] == "untuned"
    shown = json.loads(run("lut", "show", "--db", str(db), "--json").stdout)
    assert len(shown["entries"]) == 2
    assert all(e["median_ms"] > 0 for e in shown["entries"])
    table = run("lut", "show", "--db", str(db)).stdout
    assert "conv_k3_i1_o16_s2_h28_w28" in table
