"""A MetaSchedule database stored in the LUT's SQLite file.

Tuning records live next to the latencies they produced, so the artifact is compiled with the
same records the LUT was measured with ("what you measure is what you ship"). Queries are served
by an in-memory MetaSchedule database loaded from the file (C++ structural matching); every
commit is written through to SQLite at once, so an interrupted tuning run keeps its records.
Records are per target key; workloads (TIR PrimFuncs) are shared.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload
from tvm.tirx import FloatImm, IndexMap, IntImm

from codesign.lut import TUNING_BUDGETS_TABLE, connect, transaction

# TVM's own JSON codec (what JSONDatabase uses): records hold FFI values Python's json cannot.
_stringify = tvm.get_global_func("ffi.json.Stringify")
_parse = tvm.get_global_func("ffi.json.Parse")
_record_as_json = tvm.get_global_func("s_tir.meta_schedule.TuningRecordAsJSON")


def _dumps(obj: Any) -> str:
    return str(_stringify(obj, None))


def _plain(obj: Any) -> Any:
    """A record's FFI JSON as plain values. Traces of layout-rewriting schedules (weight
    pre-packing) hold IndexMap objects; the trace reader takes those as their TVM JSON
    graph in a string (what MetaSchedule's JSONDatabase writes), not as objects."""
    if isinstance(obj, IndexMap):
        return tvm.ir.save_json(obj)
    if isinstance(obj, tvm.ir.Array):
        return [_plain(o) for o in obj]
    if isinstance(obj, tvm.ir.Map):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, IntImm | FloatImm):
        return obj.value
    return obj


def _record_json(record: Any) -> str:
    return _dumps(_plain(_record_as_json(record)))


@derived_object
class SQLiteDatabase(PyDatabase):
    """MetaSchedule database over the LUT file's `tuning_*` tables, for one target key."""

    def __init__(self, path: str | Path, target_key: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.target_key = target_key
        self.con = connect(self.path)
        self.mem = ms.database.MemoryDatabase()
        self.workloads: dict[str, Any] = {}
        self.budgets: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        with transaction(self.con):  # absent from LUT files written before it was added
            self.con.execute(TUNING_BUDGETS_TABLE)
        self.budgets = dict(
            self.con.execute(
                "SELECT shash, trials FROM tuning_budgets WHERE target = ?", (self.target_key,)
            ).fetchall()
        )
        for shash, js in self.con.execute("SELECT shash, json FROM tuning_workloads"):
            wl = self.mem.commit_workload(Workload.from_json(_parse(js)).mod)
            self.workloads[shash] = wl
        rows = self.con.execute(
            "SELECT shash, json FROM tuning_records WHERE target = ? ORDER BY id",
            (self.target_key,),
        )
        for shash, js in rows:
            wl = self.workloads.get(shash)
            if wl is not None:
                self.mem.commit_tuning_record(TuningRecord.from_json(_parse(js), wl))

    # --- PyDatabase interface -------------------------------------------------
    def has_workload(self, mod: Any) -> bool:
        return self.mem.has_workload(mod)

    def commit_workload(self, mod: Any) -> Any:
        wl = self.mem.commit_workload(mod)
        js = wl.as_json()
        shash = str(js[0])
        if shash not in self.workloads:
            self.workloads[shash] = wl
            with transaction(self.con):
                self.con.execute(
                    "INSERT OR IGNORE INTO tuning_workloads VALUES (?, ?)", (shash, _dumps(js))
                )
        return wl

    def commit_tuning_record(self, record: Any) -> None:
        self.mem.commit_tuning_record(record)
        shash = str(record.workload.as_json()[0])
        if shash not in self.workloads:
            self.commit_workload(record.workload.mod)
        secs = [float(s) for s in (record.run_secs or [])]
        run_ms = 1e3 * sum(secs) / len(secs) if secs else None
        with transaction(self.con):
            self.con.execute(
                "INSERT INTO tuning_records (target, shash, run_ms, json, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.target_key, shash, run_ms, _record_json(record), time.time()),
            )

    def get_top_k(self, workload: Any, top_k: int) -> list[Any]:
        return self.mem.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list[Any]:
        return self.mem.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self.mem)

    # --- codesign helpers -----------------------------------------------------
    def best_record(self, task_mod: Any) -> Any | None:
        """The best valid record of a task's PrimFunc module, or None."""
        if not self.mem.has_workload(task_mod):
            return None
        top = self.mem.get_top_k(self.mem.commit_workload(task_mod), 1)
        return top[0] if top else None

    def valid_count(self, task_mod: Any) -> int:
        """Number of records with a successful run for this task."""
        if not self.mem.has_workload(task_mod):
            return 0
        wl = self.mem.commit_workload(task_mod)
        return len(self.mem.get_top_k(wl, 1 << 30))

    def trials_done(self, task_mod: Any) -> int:
        """Trials this task has had: its largest finished budget, or its valid records when
        an unfinished run left more."""
        return max(self.budgets.get(self.task_hash(task_mod), 0), self.valid_count(task_mod))

    def run_finished(self, key: str) -> bool:
        """Whether a tuning run named `key` (see `mark_run_finished`) has finished."""
        return f"run:{key}" in self.budgets

    def mark_run_finished(self, key: str, trials: int) -> None:
        """Record that the tuning run named `key` (e.g. one focus split) finished."""
        self.budgets[f"run:{key}"] = trials
        with transaction(self.con):
            self.con.execute(
                "INSERT OR REPLACE INTO tuning_budgets VALUES (?, ?, ?)",
                (self.target_key, f"run:{key}", trials),
            )

    def task_hash(self, task_mod: Any) -> str:
        """The task's workload hash, as the `tuning_*` tables key it."""
        return str(self.commit_workload(task_mod).as_json()[0])

    def needs_tuning(self, task_mod: Any, trials: int) -> bool:
        """Whether a task has neither `trials` valid records nor a finished tuning run of at
        least `trials` (candidates that failed to build leave no record, so a finished task
        can hold fewer valid records than its budget; it is not tuned again for that)."""
        if trials <= 0 or self.valid_count(task_mod) >= trials:
            return False
        return self.budgets.get(self.task_hash(task_mod), 0) < trials

    def mark_tuned(self, task_mods: list[Any], trials: int) -> None:
        """Record that a tuning run of `trials` per task finished for these tasks."""
        rows = []
        for mod in task_mods:
            shash = self.task_hash(mod)
            self.budgets[shash] = max(trials, self.budgets.get(shash, 0))
            rows.append((self.target_key, shash, self.budgets[shash]))
        with transaction(self.con):
            self.con.executemany("INSERT OR REPLACE INTO tuning_budgets VALUES (?, ?, ?)", rows)

    def digest(self, task_mods: list[Any]) -> str:
        """Digest of the best schedules of these tasks: changes when a better one arrives."""
        h = hashlib.sha256()
        for mod in task_mods:
            rec = self.best_record(mod)
            if rec is None:
                h.update(b"none;")
            else:
                h.update(_record_json(rec).encode())  # trace, run times, target, args
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.con.close()


def open_tuning_database(path: str | Path, target_key: str) -> SQLiteDatabase:
    """The MetaSchedule database of `target_key` inside the LUT file at `path`.

    codesign's tensor intrinsics are registered first: records of int8 tasks name them, and
    TVM refuses to load a record whose intrinsic is unknown.
    """
    from codesign.tvm_backend.intrin import register_intrinsics

    register_intrinsics()
    return SQLiteDatabase(path, target_key)
