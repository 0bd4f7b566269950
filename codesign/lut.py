"""`LatencyTable`: the latency lookup table, one SQLite file.

The file holds, per target: block latencies (`entries`, keyed by target key, block key and
mode: untuned or tuned), the MetaSchedule tuning records the tuned builds used
(`tuning_workloads`, `tuning_records`; see `codesign.tvm_backend.database`), and measured whole
networks (`networks`, used by the latency model).

Safety: WAL journaling, one short IMMEDIATE transaction per write, a busy timeout for concurrent
writers. A file that is not a codesign LUT (foreign SQLite, other format, truncated, damaged)
raises CorruptLUTError before anything is written to it, and is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codesign.blocks import BlockSpec
from codesign.errors import CorruptLUTError, LUTError
from codesign.measurement import Measurement, Provenance

APPLICATION_ID = 0x43445347  # "CDSG"
SCHEMA_VERSION = 1
MODES = ("untuned", "tuned")
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Keys of single layers (a conv or linear kernel with its fused epilogue, measured for any
# user CNN: codesign.compression.amc.own) share the `entries` table with blocks under this prefix.
LAYER_PREFIX = "layer:"
KINDS = ("block", "layer")

# Finished tuning runs per task (added within schema 1: the tuning database creates it in older
# files when it opens them).
TUNING_BUDGETS_TABLE = (
    "CREATE TABLE IF NOT EXISTS tuning_budgets (target TEXT NOT NULL, shash TEXT NOT NULL, "
    "trials INTEGER NOT NULL, PRIMARY KEY (target, shash))"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    target TEXT NOT NULL,
    block TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('untuned', 'tuned')),
    median_ms REAL, mean_ms REAL, std_ms REAL, min_ms REAL, max_ms REAL,
    repeats INTEGER NOT NULL,
    samples TEXT NOT NULL,
    error TEXT,
    tuning_digest TEXT NOT NULL,
    provenance_digest TEXT NOT NULL,
    provenance TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (target, block, mode)
);
CREATE TABLE IF NOT EXISTS tuning_workloads (shash TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tuning_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    shash TEXT NOT NULL,
    run_ms REAL,
    json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tuning_records_by_target ON tuning_records (target, shash);
CREATE TABLE IF NOT EXISTS networks (
    target TEXT NOT NULL,
    arch TEXT NOT NULL,
    mode TEXT NOT NULL,
    median_ms REAL, mean_ms REAL, std_ms REAL, min_ms REAL, max_ms REAL,
    repeats INTEGER NOT NULL,
    samples TEXT NOT NULL,
    error TEXT,
    tuning_digest TEXT NOT NULL,
    provenance_digest TEXT NOT NULL,
    provenance TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (target, arch, mode)
);
"""
_SCHEMA += TUNING_BUDGETS_TABLE + ";\n"


def layer_key(
    op: str,
    input_shape: tuple[int, ...],
    *,
    out: int,
    kernel: int = 1,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    precision: str = "fp32",
    variant: str = "",
) -> str:
    """The LUT key of one layer of a network that has no BlockSpecs (HAQ and AMC on your own
    CNN): the layer alone, float32 in and out, at `precision`, e.g.
    `layer:conv2d:1x16x8x8:o32:k3:s1:p1:g1:int8`, `layer:linear:1x64:o10:fp32`. Block keys
    never start with `layer:`, so both kinds live in one `entries` table. `variant` marks a
    layer measured with more than itself (AMC on your own CNN: its fused epilogue and input
    layout as it runs in the network, e.g. `add_relu-nhwc`), appended as `:variant`."""
    shape = "x".join(str(int(v)) for v in input_shape)
    tail = f":{variant}" if variant else ""
    if op == "linear":
        return f"layer:linear:{shape}:o{out}:{precision}{tail}"
    return f"layer:{op}:{shape}:o{out}:k{kernel}:s{stride}:p{padding}:g{groups}:{precision}{tail}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored measurement of a block (or whole network) on a target."""

    target: str
    key: str  # block key, or architecture string for networks
    mode: str
    measurement: Measurement
    tuning_digest: str
    provenance: Provenance

    @property
    def median_ms(self) -> float:
        return self.measurement.median_ms

    @property
    def ok(self) -> bool:
        return self.measurement.ok

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "target": self.target,
            "key": self.key,
            "mode": self.mode,
            "median_ms": m.median_ms,
            "mean_ms": m.mean_ms,
            "std_ms": m.std_ms,
            "min_ms": m.min_ms,
            "max_ms": m.max_ms,
            "repeats": m.repeats,
            "error": m.error,
            "tuning_digest": self.tuning_digest,
            "provenance": self.provenance.to_dict(),
        }


def _check_file(path: Path) -> None:
    """Raise CorruptLUTError if `path` exists and is visibly not an SQLite file."""
    if not path.exists():
        return
    if path.is_dir():
        raise CorruptLUTError(f"{path} is a directory, not a LUT file; pass a file path to --db")
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        raise CorruptLUTError(
            f"{path} is not a codesign LUT (not an SQLite database: foreign or corrupt file). "
            "It was left untouched; move it away or choose another --db path."
        )
    if size < 512 or size % 512:
        raise CorruptLUTError(
            f"{path} is truncated ({size} bytes is not a whole number of SQLite pages). It was "
            "left untouched; restore it from a copy or choose another --db path."
        )


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open and validate a LUT file, creating and initialising it if absent.

    Validation happens before any write: header, application id, integrity, schema version.
    """
    path = Path(path)
    _check_file(path)
    if readonly and not path.exists():
        raise LUTError(f"LUT {path} does not exist; build one with `codesign lut build`")
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
    try:
        con = sqlite3.connect(
            uri, uri=True, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        n_tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and (n_tables or app_id):
            con.close()
            raise CorruptLUTError(
                f"{path} is an SQLite database but not a codesign LUT (application id "
                f"{app_id:#x}). It was left untouched; choose another --db path."
            )
        if readonly and app_id != APPLICATION_ID:
            con.close()
            raise LUTError(
                f"{path} is empty (not initialised yet); build it with `codesign lut build`"
            )
        if app_id == APPLICATION_ID:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                con.close()
                raise CorruptLUTError(
                    f"{path} failed SQLite's integrity check ({check}). It was left untouched; "
                    "restore it from a copy or rebuild it into another --db path."
                )
            if version > SCHEMA_VERSION:
                con.close()
                raise LUTError(
                    f"{path} has schema version {version}, newer than this codesign "
                    f"understands ({SCHEMA_VERSION}); upgrade codesign to read it."
                )
    except sqlite3.DatabaseError as err:
        raise CorruptLUTError(
            f"{path} cannot be read as a codesign LUT ({err}). It was left untouched; "
            "restore it from a copy or choose another --db path."
        ) from None
    con.execute("PRAGMA busy_timeout = 60000")
    if not readonly:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        if app_id != APPLICATION_ID:
            with transaction(con):
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(stmt)
                con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),)
                )
    return con


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """An IMMEDIATE transaction: takes the write lock up front, so concurrent writers queue."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _row_to_entry(row: sqlite3.Row | tuple) -> Entry:
    (target, key, mode, med, mean, std, lo, hi, repeats, samples, error, tdig, _pdig, prov) = row
    nan = float("nan")
    m = Measurement(
        med if med is not None else nan,
        mean if mean is not None else nan,
        std if std is not None else nan,
        lo if lo is not None else nan,
        hi if hi is not None else nan,
        repeats,
        tuple(json.loads(samples)),
        error,
    )
    return Entry(target, key, mode, m, tdig, Provenance.from_dict(json.loads(prov)))


_COLS = (
    "target, {key}, mode, median_ms, mean_ms, std_ms, min_ms, max_ms, repeats, samples, "
    "error, tuning_digest, provenance_digest, provenance"
)


class LatencyTable:
    """The LUT. Open with a path; use as a context manager or call `close()`."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.con = connect(self.path, readonly=readonly)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ blocks
    def put(
        self,
        target: str,
        block: BlockSpec | str,
        mode: str,
        measurement: Measurement,
        provenance: Provenance,
        tuning_digest: str = "",
    ) -> None:
        """Insert or replace one block measurement (one transaction)."""
        self._put(
            "entries", "block", target, str(block), mode, measurement, provenance, tuning_digest
        )

    def get(self, target: str, block: BlockSpec | str, mode: str) -> Entry | None:
        return self._get("entries", "block", target, str(block), mode)

    def entries(self, target: str | None = None, mode: str | None = None) -> list[Entry]:
        return self._list("entries", "block", target, mode)

    def latencies(self, target: str, mode: str, *, kind: str = "block") -> dict[str, float]:
        """{key: median ms} of the successful entries of one target and mode: block entries,
        or with kind='layer' the single-layer entries (keys starting with LAYER_PREFIX)."""
        if kind not in KINDS:
            raise LUTError(f"kind must be one of {KINDS}, got {kind!r}")
        rows = self.con.execute(
            "SELECT block, median_ms FROM entries WHERE target = ? AND mode = ? AND error IS NULL "
            f"AND {'' if kind == 'layer' else 'NOT '}block LIKE ?",
            (target, mode, LAYER_PREFIX + "%"),
        ).fetchall()
        return dict(rows)

    # ------------------------------------------------------------------ networks
    def put_network(
        self,
        target: str,
        arch: str,
        mode: str,
        measurement: Measurement,
        provenance: Provenance,
        tuning_digest: str = "",
    ) -> None:
        self._put("networks", "arch", target, arch, mode, measurement, provenance, tuning_digest)

    def get_network(self, target: str, arch: str, mode: str) -> Entry | None:
        return self._get("networks", "arch", target, arch, mode)

    def networks(self, target: str | None = None, mode: str | None = None) -> list[Entry]:
        return self._list("networks", "arch", target, mode)

    # ------------------------------------------------------------------ overview
    def summary(self) -> list[dict[str, Any]]:
        """Per (target, mode): number of blocks and networks, failures, newest time."""
        out = []
        for table in ("entries", "networks"):
            rows = self.con.execute(
                f"SELECT target, mode, count(*), sum(error IS NOT NULL), max(created) "
                f"FROM {table} GROUP BY target, mode ORDER BY target, mode"
            ).fetchall()
            for target, mode, n, failed, newest in rows:
                out.append(
                    {
                        "table": "blocks" if table == "entries" else "networks",
                        "target": target,
                        "mode": mode,
                        "count": n,
                        "failed": failed,
                        "newest": newest,
                    }
                )
        return out

    def count_tuning_records(self, target: str) -> int:
        return self.con.execute(
            "SELECT count(*) FROM tuning_records WHERE target = ?", (target,)
        ).fetchone()[0]

    # ------------------------------------------------------------------ noise floor
    @property
    def noise_floor(self) -> float | None:
        """The host's noise floor when this LUT was measured: the relative repeat spread,
        (p90 - p10) / median, of one whole network measured again and again with the LUT's
        protocol (`codesign.lut_build`); None when not recorded. A latency model whose held-out
        error is within it cannot be told from measurement noise."""
        info = self.noise_floor_info()
        return float(info["value"]) if info else None

    def noise_floor_info(self) -> dict[str, Any] | None:
        """The stored noise floor record: value, target, network, samples_ms, host, created."""
        row = self.con.execute("SELECT value FROM meta WHERE key = 'noise_floor'").fetchone()
        return json.loads(row[0]) if row else None

    def set_noise_floor(self, value: float, **detail: Any) -> None:
        """Record the noise floor (replacing an older one) with what it was measured on."""
        if self.readonly:
            raise LUTError(f"{self.path} was opened read-only")
        if not (math.isfinite(value) and value >= 0):
            raise LUTError(f"a noise floor is a finite relative spread >= 0, got {value!r}")
        record = json.dumps({"value": float(value), "created": time.time(), **detail})
        with transaction(self.con):
            self.con.execute("INSERT OR REPLACE INTO meta VALUES ('noise_floor', ?)", (record,))

    # ------------------------------------------------------------------ internals
    def _put(
        self,
        table: str,
        keycol: str,
        target: str,
        key: str,
        mode: str,
        m: Measurement,
        prov: Provenance,
        tuning_digest: str,
    ) -> None:
        if self.readonly:
            raise LUTError(f"{self.path} was opened read-only")
        if mode not in MODES:
            raise LUTError(f"mode must be one of {MODES}, got {mode!r}")
        row = (
            target,
            key,
            mode,
            _num(m.median_ms),
            _num(m.mean_ms),
            _num(m.std_ms),
            _num(m.min_ms),
            _num(m.max_ms),
            m.repeats,
            json.dumps(list(m.samples_ms)),
            m.error,
            tuning_digest,
            prov.digest,
            json.dumps(prov.to_dict(), sort_keys=True),
            prov.created,
        )
        with transaction(self.con):
            self.con.execute(
                f"INSERT OR REPLACE INTO {table} ({_COLS.format(key=keycol)}, created) "
                f"VALUES ({', '.join('?' * len(row))})",
                row,
            )

    def _get(self, table: str, keycol: str, target: str, key: str, mode: str) -> Entry | None:
        row = self.con.execute(
            f"SELECT {_COLS.format(key=keycol)} FROM {table} "
            f"WHERE target = ? AND {keycol} = ? AND mode = ?",
            (target, key, mode),
        ).fetchone()
        return _row_to_entry(row) if row else None

    def _list(self, table: str, keycol: str, target: str | None, mode: str | None) -> list[Entry]:
        sql = f"SELECT {_COLS.format(key=keycol)} FROM {table} WHERE 1=1"
        args: list[Any] = []
        if target is not None:
            sql += " AND target = ?"
            args.append(target)
        if mode is not None:
            sql += " AND mode = ?"
            args.append(mode)
        rows = self.con.execute(sql + f" ORDER BY target, mode, {keycol}", args).fetchall()
        return [_row_to_entry(r) for r in rows]
