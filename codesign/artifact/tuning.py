"""The artifact's tuning: open the LUT file's tuning database (or this CPU's tuning cache,
`codesign.paths.tuning_cache`), tune
the network's tasks into it (a uniform budget, then focus trials where the time goes), and
describe what was applied for the manifest."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.errors import ArtifactError
from codesign.targets import Target

if TYPE_CHECKING:
    from codesign.artifact.pack import CompileOptions


def untuned_section(target: Target, opts: CompileOptions) -> dict[str, Any]:
    """The manifest's tuning section of a module built without a tuning database (analytic
    schedules only)."""
    return {
        "mode": "untuned",
        "database": None,
        "database_digest": None,
        "target_key": target.key,
        "trials_per_task": opts.tune_trials,
        "focus_trials": opts.focus_trials,
        "seconds": 0.0,
    }


def tune_for_artifact(
    fused: Any, target: Target, out: Path, opts: CompileOptions
) -> tuple[Any, dict[str, Any]]:
    """Open (and tune into) the LUT file's tuning database; the manifest's tuning section."""
    info = untuned_section(target, opts)
    tunes = opts.tune_trials or opts.focus_trials
    if not tunes and opts.tuning_db is None:
        return None, info
    from codesign.paths import tuning_cache
    from codesign.tvm_backend.database import open_tuning_database
    from codesign.tvm_backend.focus import tune_focused
    from codesign.tvm_backend.tuning import extract_tasks, tune

    db_path = Path(opts.tuning_db) if opts.tuning_db else tuning_cache(target)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if not tunes and not db_path.exists():
        raise ArtifactError(
            f"tuning database {db_path} does not exist; give the LUT file built with "
            "`codesign lut build --trials N`, or tune now with --tune-trials N"
        )
    database = open_tuning_database(db_path, target.key)
    try:
        taskset = extract_tasks({"network": fused}, target)
        t0 = time.time()
        if opts.tune_trials:
            todo = sum(1 for t in taskset.tasks if database.needs_tuning(t.mod, opts.tune_trials))
            with _trial_bar(
                todo * opts.tune_trials, f"tune {todo}/{taskset.unique} tasks", opts
            ) as bar:
                report = tune(
                    taskset,
                    target,
                    database,
                    trials_per_task=opts.tune_trials,
                    seed=opts.seed,
                    on_trials=bar.update,
                )
            info.update(tuned_tasks=report.tuned_tasks, new_records=report.valid_records)
        if opts.focus_trials:
            with _trial_bar(opts.focus_trials, "focus on the dominant tasks", opts) as bar:
                focus = tune_focused(
                    taskset,
                    target,
                    database,
                    "network",
                    extra=opts.focus_trials,
                    base=opts.tune_trials,
                    seed=opts.seed,
                    on_trials=bar.update,
                )
            info.update(focus_tuned_tasks=focus.tuned_tasks, focus_new_records=focus.valid_records)
        mods = taskset.mods_of("network")
        covered = sum(database.best_record(m) is not None for m in mods)
        if covered == 0:
            keys = _record_targets(db_path)
            raise ArtifactError(
                f"no tuning record in {db_path} matches this network's {len(mods)} tasks for target "
                f"{target.key} (the file has records for: {', '.join(keys) or 'no target'}). Use the "
                "same target spec (threads, mcpu) the LUT was built with, or tune with --tune-trials N"
            )
        info.update(
            mode="tuned",
            database=db_path.name,
            database_digest=database.digest(mods),
            unique_tasks=taskset.unique,
            tasks_with_records=covered,
            trials_done=sum(database.trials_done(t.mod) for t in taskset.tasks),
            seconds=round(time.time() - t0, 3),
        )
    except BaseException:
        database.close()
        raise
    return database, info


def _record_targets(db_path: Path) -> list[str]:
    from codesign.lut import connect

    con = connect(db_path, readonly=True)
    try:
        return [r[0] for r in con.execute("SELECT DISTINCT target FROM tuning_records")]
    finally:
        con.close()


def _trial_bar(total: int, desc: str, opts: CompileOptions) -> Any:
    """A progress bar of tuning trials on stderr (off with `opts.progress` False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="trial", disable=not opts.progress, file=sys.stderr)
