"""LUT building with real TVM builds and measurements (tiny budgets)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codesign.errors import LUTError
from codesign.lut import LatencyTable
from codesign.lut_build import build_lut


def test_untuned_build_measures_then_reuses(lut_path: Path, tiny, x86, quick) -> None:
    blocks = tiny.blocks()[:3]
    cpus = os.sched_getaffinity(0)
    r1 = build_lut(tiny, x86, lut_path, protocol=quick, blocks=blocks, progress=False)
    # TVM's thread pool pins the calling thread; measuring must not leave this process (and the
    # PyTorch training that may follow in it) on one core
    assert os.sched_getaffinity(0) == cpus
    assert (r1.measured, r1.reused, r1.failed) == (3, 0, [])
    with LatencyTable(lut_path) as t:
        entries = {e.key: e for e in t.entries(x86.key, "untuned")}
    assert set(entries) == {b.key for b in blocks}
    for e in entries.values():
        m = e.measurement
        assert m.ok and 0 < m.min_ms <= m.median_ms <= m.max_ms < 100
        # the quiet windows (within 8% of the floor) of two measurements, each of >= 4 rounds
        # of `repeat` short windows, until 2 x repeat are quiet (runner.timing)
        assert len(m.samples_ms) == m.repeats >= quick.repeat
        assert e.provenance.target_json == x86.tvm_json and not e.provenance.tuned
        assert e.provenance.threads == x86.threads
    r2 = build_lut(tiny, x86, lut_path, protocol=quick, blocks=blocks, progress=False)
    assert (r2.measured, r2.reused) == (0, 3)
    # a different protocol is a different provenance: re-measured, not trusted
    from codesign.measurement import MeasureProtocol

    r3 = build_lut(
        tiny,
        x86,
        lut_path,
        protocol=MeasureProtocol(repeat=2, min_repeat_ms=1),
        blocks=blocks[:1],
        progress=False,
    )
    assert r3.measured == 1


def test_bigger_blocks_measure_slower(lut_path: Path, tiny, x86, quick) -> None:
    """The LUT reflects real work: a k7 e6 block costs more than a k3 e3 block of the same layer."""
    layer = tiny.layers()[1]
    small, big = layer.block("k3e3"), layer.block("k7e6")
    build_lut(tiny, x86, lut_path, protocol=quick, blocks=[small, big], progress=False)
    with LatencyTable(lut_path) as t:
        lat = t.latencies(x86.key, "untuned")
    assert lat[big.key] > 1.5 * lat[small.key]


@pytest.mark.tuning
@pytest.mark.slow  # ~40 s; test_compile_applies_the_lut_tuning_records tunes a LUT by default
def test_tuned_build_shares_tasks_and_stores_records(lut_path: Path, tiny, x86, quick) -> None:
    layer = tiny.layers()[3]  # 24->24, 7x7: k3e3 and k5e3 share the 1x1 expand/project tasks
    blocks = [layer.block("k3e3"), layer.block("k5e3")]
    r = build_lut(tiny, x86, lut_path, trials=2, protocol=quick, blocks=blocks, progress=False)
    assert r.total_tasks == 6 and r.unique_tasks == 4, r
    assert r.measured == 2 and r.valid_records > 0
    with LatencyTable(lut_path) as t:
        assert t.count_tuning_records(x86.key) >= r.valid_records
        tuned = t.entries(x86.key, "tuned")
        assert len(tuned) == 2 and all(e.provenance.tuned and e.tuning_digest for e in tuned)
    again = build_lut(tiny, x86, lut_path, trials=2, protocol=quick, blocks=blocks, progress=False)
    assert (again.tuned_tasks, again.measured, again.reused) == (0, 0, 2)
    # a second tuning session in the same process, with a foreign unnamed handler on
    # MetaSchedule's logger (as test harnesses add): only the new depthwise task is tuned
    logging.getLogger("tvm.s_tir.meta_schedule").addHandler(logging.NullHandler())
    more = build_lut(
        tiny,
        x86,
        lut_path,
        trials=2,
        protocol=quick,
        blocks=[*blocks, layer.block("k7e3")],
        progress=False,
    )
    assert (more.tuned_tasks, more.measured, more.reused) == (1, 1, 2)


# ~55 s. The default tier checks that a finished tuning run is not tuned again
# (test_tuned_build_shares_tasks_and_stores_records: `again`).
@pytest.mark.slow
@pytest.mark.tuning
def test_finished_tasks_are_not_tuned_again_for_their_failed_candidates(
    tmp_path: Path, tiny, x86, quick
) -> None:
    """A candidate that fails to build leaves no record, so a finished task can hold fewer valid
    records than its budget; the finished run is recorded and a re-run does not tune it again."""
    import sqlite3

    db = tmp_path / "lut.sqlite"
    blocks = [tiny.layers()[3].block("k3e3")]
    first = build_lut(tiny, x86, db, trials=2, protocol=quick, blocks=blocks, progress=False)
    assert first.tuned_tasks > 0
    with sqlite3.connect(db) as con:  # one valid record per task left, as if one had failed
        con.execute(
            "DELETE FROM tuning_records WHERE id NOT IN "
            "(SELECT min(id) FROM tuning_records GROUP BY target, shash)"
        )
    again = build_lut(tiny, x86, db, trials=2, protocol=quick, blocks=blocks, progress=False)
    assert again.tuned_tasks == 0
    with sqlite3.connect(db) as con:  # without the record of the finished run: tuned again
        con.execute("DELETE FROM tuning_budgets")
    third = build_lut(tiny, x86, db, trials=2, protocol=quick, blocks=blocks, progress=False)
    assert third.tuned_tasks > 0


# ~35 s. The default tier covers resuming (test_untuned_build_measures_then_reuses) and a stopped
# build keeping its rows (tests/cli/test_fail_fast.py, SIGINT).
@pytest.mark.slow
def test_killed_build_resumes_without_remeasuring(lut_path: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "codesign.cli.main",
        "lut",
        "build",
        "--space",
        "tiny",
        "--target",
        "x86",
        "--db",
        str(lut_path),
        "--repeat",
        "2",
        "--min-repeat-ms",
        "1",
        "--limit",
        "10",
        "--no-progress",
    ]
    # a process of its own: the test kills it half-way (SIGKILL), as a crash would
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    done_before = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if lut_path.exists():
                try:
                    with LatencyTable(lut_path, readonly=True) as t:
                        done_before = len(t.entries())
                except LUTError:  # the child has not created the tables yet
                    continue
                if done_before >= 4:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert 4 <= done_before < 10, "the build was not interrupted half-way"
    with LatencyTable(lut_path, readonly=True) as t:
        before = {e.key: e.provenance.created for e in t.entries()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"{10 - len(before)} measured, {len(before)} already valid" in out.stdout
    with LatencyTable(lut_path, readonly=True) as t:
        after = {e.key: e.provenance.created for e in t.entries()}
    assert len(after) == 10
    assert all(after[k] == v for k, v in before.items()), "finished rows were re-measured"


@pytest.mark.slow
def test_full_tiny_space_untuned(lut_path: Path, tiny, x86) -> None:
    r = build_lut(tiny, x86, lut_path, progress=False)
    assert r.measured == len(tiny.blocks()) and not r.failed
