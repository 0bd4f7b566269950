"""The LUT store: round trip, provenance, concurrency, and corrupt or foreign files."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codesign.errors import CorruptLUTError, LUTError
from codesign.lut import LatencyTable
from codesign.measurement import Measurement, MeasureProtocol, Provenance


def _prov(**kw) -> Provenance:
    base = dict(
        tvm_version="0.27.0",
        target_key="x86-test-t2",
        target_json="{}",
        pipeline="p/1",
        tuned=False,
        tuning_digest="",
        threads=2,
        protocol=MeasureProtocol.quick(),
    )
    base.update(kw)
    return Provenance(**base)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_round_trip_and_failed_measurements(lut_path: Path) -> None:
    m = Measurement.from_samples([0.001, 0.002, 0.003])
    with LatencyTable(lut_path) as t:
        t.put("x86-test-t2", "mb_k3_e6_i16_o16_s1_h14_w14", "untuned", m, _prov())
        t.put(
            "x86-test-t2",
            "conv_k3_i1_o16_s1_h28_w28",
            "untuned",
            Measurement.failed("boom"),
            _prov(),
        )
    with LatencyTable(lut_path, readonly=True) as t:
        e = t.get("x86-test-t2", "mb_k3_e6_i16_o16_s1_h14_w14", "untuned")
        assert e is not None and e.median_ms == pytest.approx(2.0) and e.measurement.repeats == 3
        assert e.provenance == _prov(created=e.provenance.created, host=e.provenance.host)
        bad = t.get("x86-test-t2", "conv_k3_i1_o16_s1_h28_w28", "untuned")
        assert bad is not None and not bad.ok and bad.measurement.error == "boom"
        assert t.latencies("x86-test-t2", "untuned") == {"mb_k3_e6_i16_o16_s1_h14_w14": 2.0}
        assert t.get("x86-test-t2", "mb_k3_e6_i16_o16_s1_h14_w14", "tuned") is None
        with pytest.raises(LUTError, match="read-only"):
            t.put("x", "y", "untuned", m, _prov())


def test_provenance_digest_ignores_time_and_host() -> None:
    a, b = _prov(created=1.0, host="a"), _prov(created=2.0, host="b")
    assert a.digest == b.digest
    assert _prov(tuning_digest="x").digest != a.digest
    assert _prov(tvm_version="0.28").digest != a.digest


def test_concurrent_writers_do_not_corrupt(lut_path: Path) -> None:
    LatencyTable(lut_path).close()
    script = textwrap.dedent(
        """
        import sys
        from codesign.lut import LatencyTable
        from codesign.measurement import Measurement, MeasureProtocol, Provenance
        who = sys.argv[2]
        prov = Provenance("0.27", "t", "{}", "p", False, "", 2, MeasureProtocol.quick())
        with LatencyTable(sys.argv[1]) as t:
            for i in range(150):
                t.put("t", f"shared_{i}", "untuned", Measurement.from_samples([0.001]), prov)
                t.put("t", f"{who}_{i}", "untuned", Measurement.from_samples([0.002]), prov)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(lut_path), w]) for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with LatencyTable(lut_path) as t:
        keys = {e.key for e in t.entries("t")}
        assert len(keys) == 450
        assert t.con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize(
    ("content", "msg"),
    [
        (b"this is my thesis, not a LUT\n" * 100, "not an SQLite database"),
        (b"SQLite format 3\x00" + b"\x00" * 100, "truncated"),
    ],
)
def test_foreign_or_corrupt_files_are_refused_and_untouched(
    lut_path: Path, content: bytes, msg: str
) -> None:
    lut_path.write_bytes(content)
    before = _sha(lut_path)
    with pytest.raises(CorruptLUTError, match=msg):
        LatencyTable(lut_path)
    assert _sha(lut_path) == before


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()
    before = _sha(other)
    with pytest.raises(CorruptLUTError, match="not a codesign LUT"):
        LatencyTable(other)
    assert _sha(other) == before


def test_damaged_pages_are_detected(lut_path: Path) -> None:
    with LatencyTable(lut_path) as t:
        for i in range(300):
            t.put("x", f"block_{i:04d}", "untuned", Measurement.from_samples([0.001] * 5), _prov())
        t.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(lut_path.read_bytes())
    assert len(data) > 8192
    page = (len(data) // 4096 // 2) * 4096  # a b-tree page in the middle of the file
    data[page : page + 4096] = b"\xff" * 4096
    lut_path.write_bytes(bytes(data))
    before = _sha(lut_path)
    with pytest.raises(CorruptLUTError):
        LatencyTable(lut_path)
    assert _sha(lut_path) == before


def test_newer_schema_is_refused(lut_path: Path) -> None:
    LatencyTable(lut_path).close()
    con = sqlite3.connect(lut_path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(LUTError, match="newer"):
        LatencyTable(lut_path)


def test_directory_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CorruptLUTError, match="directory"):
        LatencyTable(tmp_path)
