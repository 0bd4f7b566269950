"""Fill a latency table with real TVM measurements of every block of a search space.

    blocks = space.blocks()
    untuned: for each block without a valid entry: lower -> compile -> measure -> commit
    tuned:   lower all blocks -> extract + de-duplicate tasks -> tune what lacks records
             (records go into the LUT file) -> for each block whose entry is missing or was
             measured with other records: compile with the records -> measure -> commit

Every entry is committed as soon as it is measured, so an interrupted build loses at most the
block in flight; re-running the same command measures only what is missing. An entry is valid
only if its provenance (TVM version, target JSON, pipeline, protocol, threads, tuning records)
matches the current run, so stale entries are re-measured rather than trusted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codesign.blocks import BlockSpec
from codesign.lut import LatencyTable
from codesign.measurement import MeasureProtocol, Provenance
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target


@dataclass
class BuildReport:
    space: str
    target: str
    mode: str
    blocks: int
    measured: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)
    total_tasks: int = 0
    unique_tasks: int = 0
    tuned_tasks: int = 0
    trials_per_task: int = 0
    valid_records: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def provenance_for(
    target: Target,
    *,
    tuned: bool,
    tuning_digest: str,
    protocol: MeasureProtocol,
    emulated: bool = False,
) -> Provenance:
    import tvm

    from codesign.tvm_backend.build import PIPELINE

    return Provenance(
        tvm_version=tvm.__version__,
        target_key=target.key,
        target_json=target.tvm_json,
        pipeline=PIPELINE,
        tuned=tuned,
        tuning_digest=tuning_digest,
        threads=target.threads,
        protocol=protocol,
        emulated=emulated,
    )


def _progress(total: int, desc: str, enabled: bool, unit: str = "block") -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )


def build_lut(
    space: str | SearchSpace,
    target: str | Target,
    db: str | Path,
    *,
    trials: int = 0,
    protocol: MeasureProtocol | None = None,
    seed: int = 0,
    blocks: Sequence[BlockSpec] | None = None,
    runner: Any = None,
    progress: bool = True,
) -> BuildReport:
    """Measure the blocks of `space` on `target` into the LUT at `db` (see module docstring).

    `trials` is the MetaSchedule budget per unique tuning task (0: untuned default schedules).
    """
    from codesign.tvm_backend.build import compile_module, prepare
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import LocalRunner

    space = get_space(space)
    target = parse_target(target)
    protocol = protocol or MeasureProtocol()
    runner = runner or LocalRunner(seed=seed)
    blocks = tuple(blocks) if blocks is not None else space.blocks()
    mode = "tuned" if trials > 0 else "untuned"
    report = BuildReport(space.name, target.key, mode, len(blocks), trials_per_task=trials)
    t_start = time.time()
    emulated = bool(getattr(runner, "emulated", False))
    table = LatencyTable(db)
    try:
        lowered: dict[str, Any] = {}
        fused: dict[str, Any] = {}
        database = None
        digests: dict[str, str] = {}
        if mode == "tuned":
            from codesign.tvm_backend.database import open_tuning_database
            from codesign.tvm_backend.tuning import extract_tasks, tune

            t0 = time.time()
            with _progress(len(blocks), "lower", progress) as bar:
                for b in blocks:
                    lowered[b.key] = lower_block(b, seed=seed, params_as_input=protocol.cache_flush)
                    fused[b.key] = prepare(lowered[b.key].mod)
                    bar.update()
            taskset = extract_tasks(fused, target)
            report.total_tasks, report.unique_tasks = taskset.total, taskset.unique
            report.seconds["lower"] = time.time() - t0
            database = open_tuning_database(db, target.key)
            t0 = time.time()
            todo = sum(1 for t in taskset.tasks if database.valid_count(t.mod) < trials)
            with _progress(
                todo * trials, f"tune {todo}/{taskset.unique} tasks", progress, unit="trial"
            ) as bar:
                tr = tune(
                    taskset,
                    target,
                    database,
                    trials_per_task=trials,
                    seed=seed,
                    on_trials=bar.update,
                )
            report.tuned_tasks, report.valid_records = tr.tuned_tasks, tr.valid_records
            report.seconds["tune"] = time.time() - t0
            digests = {b.key: database.digest(taskset.mods_of(b.key)) for b in blocks}

        t0 = time.time()
        with _progress(len(blocks), f"measure {mode}", progress) as bar:
            for b in blocks:
                digest = digests.get(b.key, "")
                prov = provenance_for(
                    target,
                    tuned=mode == "tuned",
                    tuning_digest=digest,
                    protocol=protocol,
                    emulated=emulated,
                )
                old = table.get(target.key, b, mode)
                if old is not None and old.ok and old.provenance.digest == prov.digest:
                    report.reused += 1
                    bar.update()
                    continue
                low = lowered.get(b.key) or lower_block(
                    b, seed=seed, params_as_input=protocol.cache_flush
                )
                built = compile_module(low, target, database, fused=fused.get(b.key))
                m = runner.run(built, protocol)
                table.put(target.key, b, mode, m, prov, tuning_digest=digest)
                if m.ok:
                    report.measured += 1
                else:
                    report.failed.append(f"{b.key}: {m.error}")
                bar.set_postfix_str(f"{b.key} {m.median_ms:.3f} ms" if m.ok else "failed")
                bar.update()
        report.seconds["measure"] = time.time() - t0
    finally:
        report.seconds["total"] = time.time() - t_start
        table.close()
    return report
