"""MetaSchedule tuning with a shared, persistent database.

Tasks (fused PrimFuncs) are extracted from every module, de-duplicated across modules by
structural equality, and tuned once each in a single MetaSchedule session: identical TIR in
different blocks costs one tuning. Tasks that already have enough valid records are skipped,
so an interrupted run resumes where it stopped.

A budget of N trials per task is spent in two parts: convolution tasks first get up to N/2
register-tiled seed schedules (`seeds`, measured once per task), then MetaSchedule's
evolutionary search spends the rest, starting from the best records; each task's winner is
then timed in pairs beside the analytic schedule it would replace (`confirm`). Extra trials
where a network spends its time: `focus`.

Traps handled here (see docs/tvm-guide.md §1):
- the stock builder imports `tvm.s_tir.tensor_intrin` in every worker (~22 s, past its 30 s
  timeout), so `fast_build` skips it;
- the main process must import it (the x86 schedule rules reference its intrinsics), quickly:
  `fast_import.import_intrinsics` (~50 s -> ~5 s);
- the per-task trial cap is always set, so the first task cannot eat the whole budget.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codesign.errors import TuningError
from codesign.targets import Target
from codesign.tvm_backend.confirm import CONFIRM_MIN_TRIALS, confirm_best
from codesign.tvm_backend.fast_import import import_intrinsics
from codesign.tvm_backend.ms_runner import fastest_of_repeats
from codesign.tvm_backend.seeds import measure_seeds, seed_budget
from codesign.tvm_backend.workers import tuning_workers


def fast_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build minus the slow `tvm.s_tir.tensor_intrin` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


@dataclass
class Task:
    """One unique tuning task and the modules (labels) that contain it."""

    name: str
    extracted: Any  # ms.ExtractedTask
    users: list[str] = field(default_factory=list)

    @property
    def mod(self) -> Any:
        return self.extracted.dispatched[0]


@dataclass
class TaskSet:
    tasks: list[Task]
    per_module: dict[str, list[int]]  # label -> indices into tasks
    total: int  # tasks before de-duplication
    calls: dict[str, list[int]] = field(default_factory=dict)  # label -> calls per run, by index

    def calls_of(self, label: str) -> list[int]:
        """How often one run of module `label` calls each of its tasks (per_module's order)."""
        return self.calls.get(label) or [1] * len(self.per_module.get(label, []))

    @property
    def unique(self) -> int:
        return len(self.tasks)

    def mods_of(self, label: str) -> list[Any]:
        return [self.tasks[i].mod for i in self.per_module.get(label, [])]


def extract_tasks(fused_by_label: dict[str, Any], target: Target) -> TaskSet:
    """Tuning tasks of several fused modules, de-duplicated by structural equality."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tvm_target = target.tvm_target()
    tasks: list[Task] = []
    by_hash: dict[int, list[int]] = {}
    per_module: dict[str, list[int]] = {}
    calls: dict[str, list[int]] = {}
    total = 0
    for label, fused in fused_by_label.items():
        idx, n = [], []
        for ext in ms.relax_integration.extract_tasks(fused, tvm_target):
            total += 1
            mod = ext.dispatched[0]
            h = tvm_ffi.structural_hash(mod)
            found = next(
                (i for i in by_hash.get(h, []) if tvm_ffi.structural_equal(tasks[i].mod, mod)), None
            )
            if found is None:
                found = len(tasks)
                tasks.append(Task(ext.task_name, ext))
                by_hash.setdefault(h, []).append(found)
            if label not in tasks[found].users:
                tasks[found].users.append(label)
            idx.append(found)
            n.append(int(ext.weight))
        per_module[label], calls[label] = idx, n
    return TaskSet(tasks, per_module, total, calls)


@dataclass(frozen=True)
class TuneReport:
    unique_tasks: int
    tuned_tasks: int  # tasks tuned in this run (the rest already had records)
    trials: int
    valid_records: int
    seconds: float


def tune(
    taskset: TaskSet,
    target: Target,
    database: Any,
    *,
    trials_per_task: int,
    seed: int = 0,
    work_dir: str | None = None,
    on_trials: Callable[[int], None] | None = None,
    new_trials: int | None = None,
) -> TuneReport:
    """Tune every task that has fewer than `trials_per_task` valid records in `database` and no
    finished run of that budget (`needs_tuning`): `new_trials` each now (default
    `trials_per_task`), and mark them tuned to `trials_per_task`."""
    from tvm.s_tir import meta_schedule as ms

    start = time.time()
    todo = [t for t in taskset.tasks if database.needs_tuning(t.mod, trials_per_task)]
    run = trials_per_task if new_trials is None else new_trials
    if not todo or trials_per_task <= 0 or run <= 0:
        return TuneReport(taskset.unique, 0, 0, 0, time.time() - start)
    if target.name == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise TuningError("tuning for cuda needs a CUDA GPU on this machine; none was found")
    if target.is_remote:
        raise TuningError(
            f"target {target.key} is measured over RPC; tune it through the device farm "
            "(codesign farm), not locally"
        )
    _quiet_metaschedule()
    import_intrinsics()
    before = sum(database.valid_count(t.mod) for t in todo)
    with tempfile.TemporaryDirectory(prefix="codesign-tune-") as tmp, tuning_workers():
        builder = ms.builder.LocalBuilder(f_build=fast_build)
        runner = fastest_of_repeats()  # its worker starts now: inside tuning_workers
        seed_then_search(
            todo,
            target,
            database,
            run,
            work_dir=work_dir or tmp,
            seed=seed,
            builder=builder,
            runner=runner,
            on_trials=on_trials,
        )
    after = sum(database.valid_count(t.mod) for t in todo)
    if after == before:
        raise TuningError(
            f"tuning {len(todo)} task(s) for {target.key} produced no valid record; "
            "every candidate failed to build or run (see MetaSchedule logs with CODESIGN_DEBUG=1)"
        )
    database.mark_tuned([t.mod for t in todo], trials_per_task)
    return TuneReport(
        taskset.unique, len(todo), run * len(todo), after - before, time.time() - start
    )


def seed_then_search(
    todo: list[Task],
    target: Target,
    database: Any,
    trials: int,
    *,
    work_dir: str,
    seed: int,
    builder: Any,
    runner: Any,
    on_trials: Callable[[int], None] | None = None,
) -> None:
    """Spend `trials` on each of `todo`: seed schedules first (`seed_budget`, convolutions not
    seeded yet), then MetaSchedule's search gets what the seeds left of each task's budget;
    then each task's best record is confirmed beside its analytic schedule (`confirm_best`).
    The builder and runner decide where candidates run (locally, or on a device farm)."""
    plain_builder = builder
    seeded = measure_seeds(
        [t.mod for t in todo],
        target,
        database,
        per_task=seed_budget(trials),
        builder=builder,
        runner=runner,
        seed=seed,
        on_trials=on_trials,
    )
    if on_trials is not None:
        builder = _counting_builder(builder, on_trials)
    groups: dict[int, list[Task]] = {}
    for i, task in enumerate(todo):
        groups.setdefault(trials - seeded.get(i, 0), []).append(task)
    for left, tasks in groups.items():
        if left > 0:
            _search(tasks, target, left, work_dir, seed, builder, runner, database)
    if trials >= CONFIRM_MIN_TRIALS:  # the winners, timed beside what they replace (confirm.py)
        confirm_best([t.mod for t in todo], target, database, builder=plain_builder, runner=runner)


def _search(
    tasks: list[Task],
    target: Target,
    trials: int,
    work_dir: str,
    seed: int,
    builder: Any,
    runner: Any,
    database: Any,
) -> None:
    """One MetaSchedule session: `trials` evolutionary-search trials for each of `tasks`."""
    from tvm.s_tir import meta_schedule as ms

    contexts, weights = _tune_contexts(tasks, target, work_dir, _strategy(trials), seed)
    _quiet_metaschedule()  # each session re-configures MetaSchedule's loggers at INFO
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=[float(w) for w in weights],
            work_dir=work_dir,
            max_trials_global=trials * len(tasks),
            max_trials_per_task=trials,
            num_trials_per_iter=max(1, min(trials, 32)),
            builder=builder,
            runner=runner,
            database=database,
            cost_model="xgb",
        )
    except Exception as err:
        raise TuningError(f"MetaSchedule tuning failed for {target.key}: {err}") from err


def tune_missing(
    fused: Any, target: Target, database: Any, *, trials: int, seed: int = 0, label: str = "module"
) -> str:
    """Tune the tasks of one fused module that `database` lacks (`trials` each; none when 0)
    and return the digest of the records that now apply to it (see `database.digest`)."""
    taskset = extract_tasks({label: fused}, target)
    if trials > 0:
        tune(taskset, target, database, trials_per_task=trials, seed=seed)
    return database.digest(taskset.mods_of(label))


def _tune_contexts(
    todo: list[Task], target: Target, work_dir: str, strategy: Any, seed: int
) -> tuple[list[Any], list[float]]:
    """MetaSchedule's `extracted_tasks_to_tune_contexts`, except that int8 convolution tasks
    (see `codesign.tvm_backend.intrin`) get the target's tensorizing design space. Float tasks
    keep the default space and the same per-task seeds as before."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    from codesign.tvm_backend.intrin import design_space

    contexts, weights = [], []
    loggers = get_loggers_from_work_dir(work_dir, [t.extracted.task_name for t in todo])
    for task, logger, rand_state in zip(todo, loggers, fork_seed(seed, n=len(todo)), strict=True):
        if task.extracted.mod.attrs.get("tirx.is_scheduled", False):
            continue  # as MetaSchedule does: nothing to tune
        contexts.append(
            ms.TuneContext(
                mod=task.mod,
                target=task.extracted.target,
                space_generator=design_space(task.mod, target),
                search_strategy=strategy,
                task_name=task.extracted.task_name,
                logger=logger,
                rand_state=rand_state,
                num_threads="physical",
            ).clone()
        )
        weights.append(task.extracted.weight)
    return contexts, weights


def _strategy(trials_per_task: int) -> Any:
    """Evolutionary search with a population scaled to the budget: MetaSchedule's default
    (512) doubles the per-task cost of small budgets (measured: 58 s vs 30 s for 3 tasks x 8
    trials) without better results at that scale."""
    from tvm.s_tir import meta_schedule as ms

    population = max(64, min(512, 8 * trials_per_task))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2)
    )


def _counting_builder(inner: Any, on_trials: Callable[[int], None]) -> Any:
    """A builder that reports each batch of candidates as it is built (steady progress: the
    scheduler builds synchronously but joins run results only at the end of a round)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import PyBuilder

    @derived_object
    class _CountingBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = inner.build(build_inputs)
            on_trials(len(build_inputs))
            return results

    return _CountingBuilder()


def _quiet_metaschedule() -> None:
    """Silence MetaSchedule's console chatter, and drop unnamed handlers from its logger:
    MetaSchedule re-configures logging on every tuning run by handler *name*, and crashes
    (`'NoneType' object has no attribute 'format'`) on a handler without one, e.g. one added by
    a test harness."""
    import os

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)
    if os.environ.get("CODESIGN_DEBUG"):
        return
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)
