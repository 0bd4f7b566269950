"""Confirm a tuned record against the analytic schedule it would replace, measured in pairs.

Tuning ranks candidates by times taken minutes apart. On a shared 2-vCPU guest the host runs
in states about 1.5x apart that last seconds to minutes (docs/lut-and-latency-model.md), so a
candidate timed in a fast state can outrank the analytic schedule (`schedules.analytic_schedule`,
what an untuned build runs) timed in a slow one, and a "tuned" network ships slower kernels than
the untuned one. Seen on the EMR guest: the MobileNetV2-style 224 net tuned with 656 trials ran
6.02 ms in its fast rounds, the same net untuned 5.79 ms.

After a task is tuned, its best record and its analytic schedule are built and timed in
alternation (best, analytic, best, analytic, ...: `ROUNDS` pairs, each time the tuning runner's
fastest of three windows), so both meet the same host states. The median ratio analytic / best
of the pairs puts the analytic schedule on the record's time scale, and it is committed as a
record with that time: the database then ranks the two by the paired comparison, and the
analytic schedule wins wherever the tuned record did not measure faster beside it. Each task's
confirmation is recorded (`confirm:<task>:<best record's time>`), so a warm run confirms nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from codesign.targets import Target

ROUNDS = 3
# Tuning runs of fewer trials per task are the seeds alone (`seeds.seed_budget`), timed back to
# back with the analytic schedule in one batch: nothing minutes apart to confirm (and a test's
# 2-trial LUT would pay ~3 s a task for it).
CONFIRM_MIN_TRIALS = 8


def confirm_best(
    task_mods: Sequence[Any],
    target: Target,
    database: Any,
    *,
    builder: Any,
    runner: Any,
    rounds: int = ROUNDS,
) -> dict[int, float]:
    """Time each task's best record beside its analytic schedule (`rounds` pairs) and commit
    the analytic schedule with its paired time. Returns analytic / best per task confirmed
    (< 1: the analytic schedule now ranks first)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    if target.name == "cuda" or rounds < 1:
        return {}
    tvm_target = target.tvm_target()
    pairs = []  # (task index, best record, its schedule, analytic schedule, key)
    for i, mod in enumerate(task_mods):
        pair = _pair(mod, target, database)
        if pair is not None:
            pairs.append((i, *pair))
    ratios: dict[int, float] = {}
    for i, best, scheduled, analytic, key in pairs:
        mods = [scheduled.mod, analytic.mod]
        built = builder.build([ms.builder.BuilderInput(m, tvm_target) for m in mods])
        try:
            if any(b.error_msg is not None for b in built):
                continue
            args = [ms.arg_info.ArgInfo.from_entry_func(m, remove_preproc=True) for m in mods]
            inputs = [ms.runner.RunnerInput(built[k % 2].artifact_path, "cpu", args[k % 2])
                      for k in range(2 * rounds)]  # fmt: skip
            secs = [_seconds(f.result()) for f in runner.run(inputs)]
        finally:
            for b in built:
                if b.artifact_path:
                    remove_build_dir(b.artifact_path)
        paired = [a / b for b, a in zip(secs[0::2], secs[1::2], strict=True) if a and b]
        if not paired:
            continue
        ratio = statistics.median(paired)
        best_secs = float(best.run_secs[0])
        workload = database.commit_workload(task_mods[i])
        database.commit_tuning_record(
            TuningRecord(analytic.trace, workload, [best_secs * ratio], tvm_target, args[1])
        )
        database.mark_run_finished(key, rounds)
        ratios[i] = ratio
    return ratios


def _pair(mod: Any, target: Target, database: Any) -> tuple[Any, Any, Any, str] | None:
    """(best record, its schedule, the analytic schedule, confirmation key) of a task still to
    confirm: one whose best record is not its analytic schedule and was not confirmed at its
    current time."""
    import tvm_ffi

    from codesign.tvm_backend.schedules import analytic_schedule

    best = database.best_record(mod)
    if best is None or not best.run_secs:
        return None
    key = f"confirm:{database.task_hash(mod)}:{float(best.run_secs[0]):.6e}"
    if database.run_finished(key):
        return None
    analytic = analytic_schedule(mod, target)
    if analytic is None:
        return None
    try:
        scheduled = _scheduled(best, mod)
    except Exception:  # noqa: BLE001 - a record whose trace no longer applies: nothing to confirm
        return None
    if tvm_ffi.structural_equal(scheduled.mod, analytic.mod):
        return None  # the analytic schedule is the best record already
    return best, scheduled, analytic, key


def _scheduled(record: Any, mod: Any) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def _seconds(result: Any) -> float | None:
    if result.error_msg is not None or not result.run_secs:
        return None
    return float(result.run_secs[0])
