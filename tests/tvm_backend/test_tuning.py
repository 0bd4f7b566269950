"""Tuning budgets and workers: focus trials go where a module spends its time, a re-run resumes, workers start without torch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.tuning


def _cost_ms(db, task, calls: int) -> float:
    secs = [float(s) for s in db.best_record(task.mod).run_secs]
    return calls * 1e3 * sum(secs) / len(secs)


@pytest.mark.slow  # ~60 s of tuning: the one focus-trials test runs in `make test-all`
def test_focus_trials_follow_the_estimated_time_and_resume(block_tasks, x86) -> None:
    from codesign.tvm_backend.focus import focus_budgets, tune_focused
    from codesign.tvm_backend.tuning import TaskSet, tune

    ts, db = block_tasks
    assert ts.unique == 3 and ts.calls_of("b") == [1, 1, 1]
    tune(ts, x86, db, trials_per_task=2)
    pairs = zip(ts.per_module["b"], ts.calls_of("b"), strict=True)
    cost = {i: _cost_ms(db, ts.tasks[i], c) for i, c in pairs}
    plan = focus_budgets(ts, db, "b", 12, base=2, quantum=2)
    assert [i for i, _ in plan] == sorted(cost, key=lambda i: -cost[i])[: len(plan)]
    shares = [b - 2 for _, b in plan]
    assert shares == sorted(shares, reverse=True) and all(s % 2 == 0 and s >= 2 for s in shares)
    assert abs(sum(shares) - 12) <= 2 * len(cost)
    top = max(cost, key=cost.get)
    assert shares[0] >= round(12 * cost[top] / sum(cost.values()) / 2) * 2

    report = tune_focused(ts, x86, db, "b", extra=12, base=2, quantum=2)
    assert report.tuned_tasks == len(plan) and report.valid_records > 0
    for i, budget in plan:
        assert db.trials_done(ts.tasks[i].mod) >= budget
    # A single task always gets the whole focus budget: a second run has nothing left to do.
    one = TaskSet([ts.tasks[top]], {"b": [0]}, 1, {"b": [1]})
    first = tune_focused(one, x86, db, "b", extra=4, base=db.trials_done(ts.tasks[top].mod))
    assert first.trials == 0  # a share below one quantum (32) is no focus at all
    done = db.trials_done(ts.tasks[top].mod)
    again = [tune_focused(one, x86, db, "b", extra=4, base=done, quantum=2) for _ in range(2)]
    assert again[0].tuned_tasks == 1 and again[0].trials == 4
    assert again[1].tuned_tasks == 0 and again[1].trials == 0
    assert db.trials_done(ts.tasks[top].mod) == done + 4


def test_tuning_runner_reports_the_fastest_of_its_repeats(x86) -> None:
    """Candidates are timed in several windows and ranked by the fastest (load only adds
    time); a candidate that fails keeps its error."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    from codesign.tvm_backend.ms_runner import fastest_of_repeats
    from codesign.tvm_backend.tuning import fast_build

    @T.prim_func(s_tir=True)
    def add(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")) -> None:
        for i in range(4096):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    target = x86.tvm_target()
    (built,) = ms.builder.LocalBuilder(f_build=fast_build).build(
        [ms.builder.BuilderInput(tvm.IRModule({"main": add}), target)]
    )
    assert built.error_msg is None
    args = [ms.arg_info.TensorInfo("float32", [4096])] * 2
    good = ms.runner.RunnerInput(built.artifact_path, "cpu", args)
    bad = ms.runner.RunnerInput(built.artifact_path + ".missing", "cpu", args)
    ok, failed = (f.result() for f in fastest_of_repeats(repeats=3, window_ms=5).run([good, bad]))
    assert ok.error_msg is None and len(ok.run_secs) == 1 and 0 < float(ok.run_secs[0]) < 0.01
    assert failed.error_msg and not failed.run_secs


def test_tuning_workers_start_without_torch_and_the_environment_is_restored(
    monkeypatch,
) -> None:
    """Processes started inside `without_torch` (MetaSchedule's workers) skip tvm_ffi's torch
    import; the user's PYTHONPATH is kept and restored."""
    import os
    import subprocess
    import sys

    from codesign.tvm_backend.workers import without_torch

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    code = (
        "import sys\ntry:\n    import torch\nexcept ImportError as e:\n    print('no torch', e)\n"
    )
    code += "print(sys.path)"
    with without_torch():
        inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "no torch" in inside.stdout and "/somewhere/else" in inside.stdout
    assert os.environ["PYTHONPATH"] == "/somewhere/else"
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "no torch" not in after.stdout


def test_a_tuned_record_that_was_timed_lucky_loses_to_the_analytic_schedule(block_tasks, x86):
    """A record whose time was taken in a fast moment of the host (here: 1 ns, the naive loop
    nest) is timed again beside the analytic schedule; the analytic schedule is committed
    with its paired time and ranks first; a second confirmation measures nothing."""
    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord

    from codesign.tvm_backend.confirm import confirm_best
    from codesign.tvm_backend.ms_runner import fastest_of_repeats
    from codesign.tvm_backend.schedules import analytic_schedule
    from codesign.tvm_backend.tuning import fast_build

    ts, db = block_tasks
    task = max(ts.tasks, key=lambda t: len(t.mod.script()))  # the expand conv: real work
    naive = s_tir.Schedule(task.mod)
    naive.get_sblock("root")  # the naive loop nest (an empty trace is not a valid record)
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    db.commit_tuning_record(
        TuningRecord(naive.trace, db.commit_workload(task.mod), [1e-9], x86.tvm_target(), args)
    )
    builder, runner = ms.builder.LocalBuilder(f_build=fast_build), fastest_of_repeats(2, 5)
    ratios = confirm_best([task.mod], x86, db, builder=builder, runner=runner, rounds=2)
    assert set(ratios) == {0} and ratios[0] < 1.0  # scheduled beats naive in every pair
    best = db.best_record(task.mod)
    assert float(best.run_secs[0]) == pytest.approx(1e-9 * ratios[0])
    sch = s_tir.Schedule(task.mod)
    best.trace.apply_to_schedule(sch, remove_postproc=False)
    assert tvm_ffi.structural_equal(sch.mod, analytic_schedule(task.mod, x86).mod)
    assert confirm_best([task.mod], x86, db, builder=builder, runner=runner) == {}
