"""Fill a latency table with real TVM measurements of every block of a search space.

    blocks = space.blocks()
    untuned: for each block without a valid entry: lower -> compile -> measure -> commit
    tuned:   lower all blocks -> extract + de-duplicate tasks -> tune what lacks records
             (records go into the LUT file) -> for each block whose entry is missing or was
             measured with other records: compile with the records -> measure -> commit

Remote targets (`arm:key=...,tracker=...`), or any target with `farm=FarmSpec(...)`, measure
through the device farm instead: blocks are compiled here (cross-compiled for ARM) and measured
in parallel on the servers of the key by the farm scheduler (deadlines, retries, quarantine),
each row committed as its result arrives; tuning goes through MetaSchedule's RPC runner with the
farm's guards. Emulated servers get `emulated=True` provenance and are refused for tuning.

Every entry is committed as soon as it is measured, so an interrupted build loses at most the
block in flight; re-running the same command measures only what is missing. An entry is valid
only if its provenance (TVM version, target JSON, pipeline, protocol, threads, tuning records)
matches the current run, so stale entries are re-measured rather than trusted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign import interrupt
from codesign.blocks import BlockSpec
from codesign.lut import LatencyTable
from codesign.measurement import MeasureProtocol, Provenance
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

if TYPE_CHECKING:  # annotations only: these import TVM
    from codesign.farm.measure import FarmSpec
    from codesign.tvm_backend.database import SQLiteDatabase
    from codesign.tvm_backend.runner import Runner


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
    farm: dict[str, Any] = field(default_factory=dict)  # farm runs: servers, retries, quarantine
    noise_floor: float | None = None  # this host's, when measured by this build (LatencyTable)
    # blocks whose every try shared the CPU with other work (Measurement.converged False): their
    # medians are stored but may be inflated; rebuild on a quieter machine to trust them
    unconverged: list[str] = field(default_factory=list)
    # passes the blocks were measured in, and the share of runs in slow phases of the host that
    # set them (codesign.tvm_backend.runner.LaterPasses); None: nothing measured again
    passes: int | None = None
    slow_share: float | None = None

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
    space: str | SearchSpace | None,
    target: str | Target,
    db: str | Path,
    *,
    trials: int = 0,
    protocol: MeasureProtocol | None = None,
    seed: int = 0,
    blocks: Sequence[BlockSpec] | None = None,
    runner: Runner | None = None,
    progress: bool = True,
    farm: FarmSpec | None = None,
    precisions: Sequence[str] | None = None,
    noise_floor: bool | None = None,
) -> BuildReport:
    """Measure the blocks of `space` on `target` into the LUT at `db` (see module docstring).

    `trials` is the MetaSchedule budget per unique tuning task (0: untuned default schedules).
    `farm` (a codesign.farm.measure.FarmSpec) measures on a device farm; remote targets use
    their tracker and key by default.
    `precisions` (e.g. the target's precision menu) measures every block at each precision
    (keys `..._int8`, `..._fp16`); by default blocks are measured at their own precision.
    `space` may be None when `blocks` are given (e.g. the blocks of one pruned network).
    With `noise_floor` (default: when the whole space is measured, i.e. no `blocks` given; it
    needs a space and a local runner), the host's noise floor is measured once per LUT file,
    target and protocol and stored (`LatencyTable.noise_floor`).
    """
    from codesign.tvm_backend.build import compile_module, prepare
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import LaterPasses, Where, run_steady

    if space is None and blocks is None:
        raise ValueError("build_lut needs a search space or an explicit list of blocks")
    space = get_space(space) if space is not None else None
    target = parse_target(target)
    protocol = protocol or MeasureProtocol()
    if farm is None and runner is None and target.is_remote:
        farm = Where.of_target(target).farm()
    runner = runner or (None if farm is not None else Where.local().runner(seed=seed))
    blocks_given = blocks
    if blocks is None:
        assert space is not None  # checked above
        blocks = space.blocks()
    blocks = tuple(blocks)
    if precisions:
        blocks = tuple(dict.fromkeys(b.with_precision(p) for p in precisions for b in blocks))
    mode = "tuned" if trials > 0 else "untuned"
    name = space.name if space is not None else "-"
    report = BuildReport(name, target.key, mode, len(blocks), trials_per_task=trials)
    t_start = time.time()
    if noise_floor is None:
        noise_floor = blocks_given is None
    emulated = farm.is_emulated() if farm is not None else bool(getattr(runner, "emulated", False))
    if mode == "tuned" and emulated:
        from codesign.errors import TuningError

        raise TuningError(
            f"{target.key}: the measuring device is emulated; its timings must not drive tuning. "
            "Tune on a real board, or build an untuned LUT (trials=0)"
        )
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
                    interrupt.check()
                    lowered[b.key] = lower_block(
                        b, seed=seed, params_as_input=protocol.cache_flush, target=target
                    )
                    fused[b.key] = prepare(lowered[b.key].mod)
                    bar.update()
            taskset = extract_tasks(fused, target)
            report.total_tasks, report.unique_tasks = taskset.total, taskset.unique
            report.seconds["lower"] = time.time() - t0
            database = open_tuning_database(db, target.key)
            t0 = time.time()
            todo = sum(1 for t in taskset.tasks if database.needs_tuning(t.mod, trials))
            with _progress(
                todo * trials, f"tune {todo}/{taskset.unique} tasks", progress, unit="trial"
            ) as bar:
                if farm is not None:
                    from codesign.farm.tuning import tune_on_farm

                    tr = tune_on_farm(
                        taskset,
                        target,
                        database,
                        farm,
                        trials_per_task=trials,
                        seed=seed,
                        on_trials=bar.update,
                    )
                else:
                    tr = tune(
                        taskset,
                        target,
                        database,
                        trials_per_task=trials,
                        seed=seed,
                        on_trials=bar.update,
                    )
            interrupt.check()  # tuning may swallow the interrupt: its records are stored
            report.tuned_tasks, report.valid_records = tr.tuned_tasks, tr.valid_records
            report.seconds["tune"] = time.time() - t0
            digests = {b.key: database.digest(taskset.mods_of(b.key)) for b in blocks}

        t0 = time.time()
        if farm is not None:
            _measure_on_farm(
                blocks,
                target,
                table,
                farm,
                report,
                lowered,
                fused,
                database,
                digests,
                protocol=protocol,
                seed=seed,
                emulated=emulated,
                progress=progress,
            )
            blocks = ()  # measured above
        later = LaterPasses(runner, protocol) if runner is not None else None
        with _progress(len(blocks), f"measure {mode}", progress) as bar:
            for b in blocks:
                interrupt.check()
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
                    b, seed=seed, params_as_input=protocol.cache_flush, target=target
                )
                built = compile_module(low, target, database, fused=fused.get(b.key))
                # without a farm: the given or a local runner
                assert runner is not None and later is not None
                m = run_steady(runner, built, protocol)
                interrupt.check()  # a timing cut short by the interrupt is not a failed block
                table.put(target.key, b, mode, m, prov, tuning_digest=digest)
                later.add(built, m, partial(table.put, target.key, b, mode, provenance=prov,
                                            tuning_digest=digest))  # fmt: skip
                if m.ok:
                    report.measured += 1
                    if not m.converged:
                        report.unconverged.append(b.key)
                else:
                    report.failed.append(f"{b.key}: {m.error}")
                bar.set_postfix_str(f"{b.key} {m.median_ms:.3f} ms" if m.ok else "failed")
                bar.update()
        if later:
            with _progress(len(later), "measure again", progress) as bar:
                later.run(bar.update)
            report.passes, report.slow_share = later.passes, later.slow_share
        report.seconds["measure"] = time.time() - t0
        if noise_floor and farm is None and space is not None:
            assert runner is not None  # without a farm: the given or a local runner
            t0 = time.time()
            # pooled over as many passes as the batch's (a noisy hour's batch takes more)
            probe = replace(protocol, passes=max(protocol.passes, report.passes or 0))
            report.noise_floor = _record_noise_floor(
                table, space, target, runner, probe, seed=seed, progress=progress
            )
            if report.noise_floor is not None:
                report.seconds["noise_floor"] = time.time() - t0
    finally:
        report.seconds["total"] = time.time() - t_start
        table.close()
    return report


def _record_noise_floor(
    table: LatencyTable,
    space: SearchSpace,
    target: Target,
    runner: Runner,
    protocol: MeasureProtocol,
    *,
    seed: int,
    progress: bool,
) -> float | None:
    """Measure one seeded network of the space again and again and store the spread of its
    medians as the LUT's noise floor, unless already stored for this target and protocol.
    A failure is reported, not raised: the blocks are stored already."""
    import random

    from codesign.latency.networks import compile_network
    from codesign.modules import build_network
    from codesign.tvm_backend.runner import repeat_spread

    old = table.noise_floor_info()
    if old and old.get("target") == target.key and old.get("protocol") == protocol.to_dict():
        return None
    arch = space.sample(random.Random(seed))
    try:
        net = build_network(space, arch, seed=seed)
        built, _ = compile_network(net, target, label=arch.encode(), seed=seed)
        value, medians = repeat_spread(runner, built, protocol)
    except Exception as err:  # the probe only: never lose or fail the measured blocks
        if progress:
            print(f"noise floor not recorded: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    interrupt.check()
    table.set_noise_floor(
        value,
        target=target.key,
        network=arch.encode(),
        samples_ms=list(medians),
        protocol=protocol.to_dict(),
    )
    return value


def _measure_on_farm(
    blocks: Sequence[BlockSpec],
    target: Target,
    table: LatencyTable,
    farm: FarmSpec,
    report: BuildReport,
    lowered: dict[str, Any],
    fused: dict[str, Any],
    database: SQLiteDatabase | None,
    digests: dict[str, str],
    *,
    protocol: MeasureProtocol,
    seed: int,
    emulated: bool,
    progress: bool,
) -> None:
    """The measure phase on a device farm: compile here, measure there, commit on arrival."""
    from codesign.farm.measure import Item, measure_many
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_block

    mode = report.mode
    protocol = replace(protocol, passes=1)  # the farm measures each block once
    provs: dict[str, Provenance] = {}
    todo: list[Item] = []
    for b in blocks:
        prov = provenance_for(
            target,
            tuned=mode == "tuned",
            tuning_digest=digests.get(b.key, ""),
            protocol=protocol,
            emulated=emulated,
        )
        old = table.get(target.key, b, mode)
        if old is not None and old.ok and old.provenance.digest == prov.digest:
            report.reused += 1
            continue
        provs[b.key] = prov

        def build(b: BlockSpec = b) -> Any:
            low = lowered.get(b.key) or lower_block(
                b, seed=seed, params_as_input=protocol.cache_flush, target=target
            )
            return compile_module(low, target, database, fused=fused.get(b.key))

        todo.append(Item(b.key, build))
    specs = {b.key: b for b in blocks}
    with _progress(len(todo), f"measure {mode} on {farm.key}@{farm.tracker}", progress) as bar:

        def commit(item: Item, m: Any, server: str) -> None:
            prov = replace(provs[item.id], host=farm.host_label(server), created=time.time())
            digest = digests.get(item.id, "")
            table.put(target.key, specs[item.id], mode, m, prov, tuning_digest=digest)
            if m.ok:
                report.measured += 1
            else:
                report.failed.append(f"{item.id}: {m.error}")
            bar.set_postfix_str(f"{item.id} {m.median_ms:.3f} ms" if m.ok else "failed")
            bar.update()

        sched = measure_many(todo, protocol, farm, commit, seed=seed)
    report.farm = {
        "tracker": farm.tracker,
        "key": farm.key,
        "emulated": emulated,
        "retries": sched.retries,
        "deadlines": sched.deadlines,
        "quarantined": sched.quarantined,
        "per_server": sched.per_server,
    }
