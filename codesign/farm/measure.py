"""Measuring many compiled modules on a farm: compile here, time there, commit as results arrive.

    FarmSpec(tracker="127.0.0.1:9190", key="arm64")      where to measure
    measure_many(items, protocol, farm, on_result)        the measure phase of LUT building

Compilation stays in this process (cross-compiled for ARM by `Built.export`); each module is
exported and becomes one scheduler job, pulled lazily so compiling overlaps the measurements in
flight. `on_result` is called once per item, in this thread, as soon as its result arrives, so
the caller commits it at once (an interrupted run loses only the jobs in flight).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codesign.errors import TuningError
from codesign.farm.config import FarmConfig, load_config
from codesign.farm.scheduler import FarmScheduler, Job, JobResult, SchedulerReport, key_is_emulated
from codesign.measurement import Measurement, MeasureProtocol


@dataclass(frozen=True, slots=True)
class FarmSpec:
    """The servers of `key` on the tracker at `tracker` (HOST:PORT), with the farm's limits."""

    tracker: str
    key: str
    config: FarmConfig | None = None  # timeouts and retries; None: defaults (state dir included)
    emulated: bool | None = None  # None: ask the local farm's records

    @classmethod
    def for_target(cls, target: Any, config: FarmConfig | None = None) -> FarmSpec:
        from codesign.tvm_backend.runner import Where

        return Where.of_target(target).farm(config)

    def resolved(self) -> FarmConfig:
        return self.config or load_config()

    def is_emulated(self) -> bool:
        if self.emulated is not None:
            return self.emulated
        return key_is_emulated(self.resolved(), self.tracker, self.key)

    def refuse_tuning(self) -> None:
        if self.is_emulated():
            raise TuningError(
                f"the servers of key {self.key!r} are emulated (qemu): their timings do not rank "
                "schedules like real cores, so tuning on them is refused. Tune on a real board, "
                "or build an untuned LUT (--trials 0) to check the plumbing"
            )

    def host_label(self, server: str) -> str:
        return f"rpc:{self.key}@{self.tracker}/{server}" + (
            " (emulated)" if self.is_emulated() else ""
        )


@dataclass(frozen=True, slots=True)
class Item:
    """One module to measure: `build()` compiles it (called lazily, in this process)."""

    id: str
    build: Callable[[], Any]  # -> codesign.tvm_backend.build.Built


def measure_many(
    items: Sequence[Item],
    protocol: MeasureProtocol,
    farm: FarmSpec,
    on_result: Callable[[Item, Measurement, str], None],
    *,
    seed: int = 0,
    max_workers: int = 8,
) -> SchedulerReport:
    """Measure every item on the farm; `on_result(item, measurement, server)` once per item.

    A module that fails to compile or export is reported as a failed Measurement, not raised.
    """
    from codesign.tvm_backend.runner import prepare_job

    by_id = {it.id: it for it in items}
    if not items:
        return SchedulerReport()
    scheduler = FarmScheduler(farm.resolved(), max_workers=max_workers)
    scheduler.check(farm.tracker, farm.key)  # fail fast, before compiling anything
    with tempfile.TemporaryDirectory(prefix="codesign-farm-") as tmp:

        def jobs() -> Iterator[Job]:
            for it in items:
                try:
                    built = it.build()
                    payload = prepare_job(built, protocol, Path(tmp), seed=seed)
                except Exception as err:  # compile/export failure: this item only
                    on_result(it, Measurement.failed(f"{type(err).__name__}: {err}"), "")
                    continue
                yield Job(it.id, farm.key, farm.tracker, payload)

        def done(r: JobResult) -> None:
            on_result(by_id[r.job.id], r.measurement, r.server)
            Path(r.job.payload.lib_path).unlink(missing_ok=True)

        return scheduler.run(jobs(), done)
