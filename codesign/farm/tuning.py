"""MetaSchedule tuning measured on a device farm, with the guards docs/tvm-guide.md §4.7 asks for.

MetaSchedule's RPCRunner hangs when its key has no server (its pool has no timeout), turns every
failure into a record instead of an exception, and leaves popen workers behind. So:

1. the key is checked on the tracker first (NoServerError at once), and emulated keys refused;
2. every runner batch is guarded: the key is re-checked before it is sent, and each result is
   awaited at most `timeouts.job` s, after which the runner's workers are killed by PID and a
   fresh runner takes the next batch;
3. an outer watchdog stops the whole tuning run after `watchdog_s` (remaining batches fail fast
   and MetaSchedule returns);
4. valid records are counted afterwards (TuningError if none), and popen workers that outlived
   the run are killed by PID.
The budget is spent as in local tuning (`seed_then_search`: seed schedules, then MetaSchedule's
search, int8 tasks in their tensorizing design space); only where candidates run differs.
Candidates are built here and exported as shared libraries (cross-compiled for ARM: the
emulated runtime-only server has no compiler to link MetaSchedule's default .tar).
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from codesign.errors import FarmError, TuningError
from codesign.farm.measure import FarmSpec
from codesign.farm.procs import kill_all
from codesign.farm.tracker import TrackerClient
from codesign.targets import Target
from codesign.tvm_backend.tuning import (
    TaskSet,
    TuneReport,
    _quiet_metaschedule,
    fast_build,
    import_intrinsics,
    seed_then_search,
)
from codesign.tvm_backend.workers import without_torch

if TYPE_CHECKING:  # annotations only: it imports TVM
    from codesign.tvm_backend.database import SQLiteDatabase


def export_so(mod: Any, cross_cc: str | None) -> str:
    """MetaSchedule f_export: a shared library, cross-linked when the target has a compiler."""
    import os

    from tvm.support import cc

    # its own directory: MetaSchedule removes the artifact's *parent directory* after running it
    path = os.path.join(tempfile.mkdtemp(prefix="codesign-ms-"), "tvm_tmp_mod.so")
    kwargs = {"fcompile": cc.cross_compiler(cross_cc)} if cross_cc else {}
    mod.export_library(path, **kwargs)
    return path


def _children() -> set[int]:
    """PIDs of this process's MetaSchedule popen workers (direct children only)."""
    out = set()
    for p in psutil.Process().children(recursive=False):
        try:
            if "tvm.exec.popen_worker" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _kill_new(before: set[int]) -> int:
    """Kill (whole trees of) popen workers started since `before` was taken."""
    procs = []
    for pid in _children() - before:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return kill_all(procs, timeout=5.0)


def _guarded_runner(make_inner: Callable[[], Any], farm: FarmSpec, stop: threading.Event) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    cfg = farm.resolved()
    client = TrackerClient.at(farm.tracker, cfg.timeouts.socket)

    @derived_object
    class _Failed(PyRunnerFuture):
        def __init__(self, msg: str) -> None:
            super().__init__()
            self.msg = msg

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return RunnerResult(None, error_msg=self.msg)

    @derived_object
    class _Deadline(PyRunnerFuture):
        def __init__(self, inner: Any, deadline: float, on_timeout: Callable[[], None]) -> None:
            super().__init__()
            self.inner, self.deadline, self.on_timeout = inner, deadline, on_timeout

        def done(self) -> bool:
            return self.inner.done() or time.time() > self.deadline or stop.is_set()

        def result(self) -> Any:
            while not self.inner.done():
                if time.time() > self.deadline or stop.is_set():
                    self.on_timeout()
                    return RunnerResult(None, error_msg="farm: measurement deadline passed")
                time.sleep(0.05)
            return self.inner.result()

    @derived_object
    class _Guarded(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.inner: Any = None
            self.before = _children()

        def _reset(self) -> None:  # kill the stuck pool's workers; the next batch gets a new one
            _kill_new(self.before)
            self.inner = None

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            if stop.is_set():
                return [_Failed("farm: tuning watchdog expired") for _ in runner_inputs]
            try:
                client.check_key(farm.key)
            except FarmError as err:
                return [_Failed(f"farm: {err}") for _ in runner_inputs]
            if self.inner is None:
                self.before = _children()
                self.inner = make_inner()
            deadline = time.time() + cfg.timeouts.job * max(1, len(runner_inputs))
            return [_Deadline(f, deadline, self._reset) for f in self.inner.run(runner_inputs)]

    return _Guarded()


def tune_on_farm(
    taskset: TaskSet,
    target: Target,
    database: SQLiteDatabase,
    farm: FarmSpec,
    *,
    trials_per_task: int,
    seed: int = 0,
    on_trials: Callable[[int], None] | None = None,
    watchdog_s: float | None = None,
) -> TuneReport:
    """Tune the tasks lacking `trials_per_task` valid records, measuring on `farm`'s servers."""
    from tvm.s_tir import meta_schedule as ms

    start = time.time()
    todo = [t for t in taskset.tasks if database.needs_tuning(t.mod, trials_per_task)]
    if not todo or trials_per_task <= 0:
        return TuneReport(taskset.unique, 0, 0, 0, time.time() - start)
    farm.refuse_tuning()
    cfg = farm.resolved()
    status = TrackerClient.at(farm.tracker, cfg.timeouts.socket).check_key(farm.key)
    host, _, port = farm.tracker.rpartition(":")
    _quiet_metaschedule()
    import_intrinsics()

    def make_inner() -> Any:
        return ms.runner.RPCRunner(
            ms.runner.RPCConfig(
                tracker_host=host,
                tracker_port=int(port),
                tracker_key=farm.key,
                session_priority=1,
                session_timeout_sec=int(cfg.timeouts.session),
            ),
            ms.runner.EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False
            ),
            max_workers=max(1, status.total),
        )

    stop = threading.Event()
    runner = _guarded_runner(make_inner, farm, stop)
    limit = watchdog_s or (cfg.timeouts.job * trials_per_task * len(todo) + 600.0)
    watchdog = threading.Timer(limit, stop.set)
    watchdog.daemon = True
    before_children = _children()
    before = sum(database.valid_count(t.mod) for t in todo)
    watchdog.start()
    try:
        with tempfile.TemporaryDirectory(prefix="codesign-tune-") as wd, without_torch():
            builder = ms.builder.LocalBuilder(  # checks its functions in workers: start them here
                f_build=fast_build, f_export=functools.partial(export_so, cross_cc=target.cross_cc)
            )
            seed_then_search(
                todo,
                target,
                database,
                trials_per_task,
                work_dir=wd,
                seed=seed,
                builder=builder,
                runner=runner,
                on_trials=on_trials,
            )
    except TuningError as err:
        raise TuningError(f"on the farm ({farm.key}@{farm.tracker}): {err}") from err
    except Exception as err:
        raise TuningError(
            f"MetaSchedule tuning on {farm.key}@{farm.tracker} failed: {err}"
        ) from err
    finally:
        watchdog.cancel()
        _kill_new(before_children)  # RPCRunner's popen workers outlive the run otherwise
    after = sum(database.valid_count(t.mod) for t in todo)
    if after == before:
        why = "the watchdog stopped it" if stop.is_set() else "every candidate failed"
        raise TuningError(
            f"tuning {len(todo)} task(s) on {farm.key}@{farm.tracker} produced no valid record "
            f"({why}); check `codesign farm status` and the servers' logs"
        )
    if not stop.is_set():
        database.mark_tuned([t.mod for t in todo], trials_per_task)
    return TuneReport(
        taskset.unique, len(todo), trials_per_task * len(todo), after - before, time.time() - start
    )
