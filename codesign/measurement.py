"""Measurement value objects: how a module is timed, what came out, and where it came from."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# How far above the host's quiet floor a timing window may lie and still count as the quiet
# state. A shared 2-vCPU guest runs the same module in states 1.3x and 2x slower than its
# quiet one, for phases of 10 ms to seconds that no in-guest counter shows (no steal time, no
# run delay; with 1 TVM thread as with 2). Within the quiet state 10 ms windows agree within
# ~3%. Measured on the EMR guest, a 0.037 ms network, 8 fresh processes: the median of all
# windows spread 35-53 us, the median of the quiet windows 35-40 us (benchmarks/
# measure_stability.py --processes).
QUIET_BAND = 0.08


def quiet_samples(samples: Sequence[float], band: float = QUIET_BAND) -> list[float]:
    """The samples of the host's quiet state, in their order: those within `band` of the floor
    (the 10th percentile, so one odd low window does not set it). Slow phases only ever add
    time, so the fastest state the windows saw is the one every module can be compared in."""
    if not samples:
        return []
    xs = sorted(samples)
    floor = xs[len(xs) // 10]
    return [s for s in samples if s <= floor * (1 + band)]


@dataclass(frozen=True, slots=True)
class MeasureProtocol:
    """TVM `time_evaluator` settings. Each of `repeat` samples averages >= `number` runs and
    lasts at least `min_repeat_ms`; TVM makes one untimed warm-up call first. With
    `cache_flush`, CPU caches are flushed before every run (weights become runtime inputs so
    that the flush reaches them).

    `passes`: a batch of modules (a LUT's blocks, a set of networks) is measured this many
    times, in passes over the whole batch (more where the batch's runs show a noisy host,
    up to 2x: `LaterPasses`), and each module's quiet windows are pooled
    (`Measurement.pool`): the host's slow phases last seconds to minutes, so runs of one module
    spread over the batch's time rarely all fall in one (each run also gets a fresh VM and
    fresh buffers: one VM instance can run 1.3x slower than the next for its whole life).
    Measured on the EMR guest, 24 tiny networks: 10.5% scatter between two single passes
    (6-20%), 3.5% between two pools of 3 (benchmarks/measure_stability.py --passes 3). A module
    measured alone is timed once."""

    repeat: int = 10
    number: int = 1
    min_repeat_ms: int = 50
    cache_flush: bool = False
    passes: int = 3

    def __post_init__(self) -> None:
        if self.repeat < 1 or self.number < 1 or self.min_repeat_ms < 0 or self.passes < 1:
            raise ValueError(f"invalid measurement protocol {self}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeasureProtocol:
        """A stored protocol; one stored before `passes` existed was measured in two."""
        return cls(**{"passes": 2, **d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def quick(cls) -> MeasureProtocol:
        """A cheap protocol for tests: short windows, one pass."""
        return cls(repeat=3, number=1, min_repeat_ms=5, passes=1)


@dataclass(frozen=True, slots=True)
class Measurement:
    """Latency statistics of one build on one target, in milliseconds. A failed measurement is
    a value with `error` set, not an exception."""

    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    samples_ms: tuple[float, ...] = ()
    error: str | None = None
    # False when the timing protocol gave up: every round of windows shared the CPU with other
    # work (see codesign.tvm_backend.runner.timing); not stored in the LUT
    converged: bool = field(default=True, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cv(self) -> float:
        """Coefficient of variation of the samples (std / mean); nan when failed."""
        return self.std_ms / self.mean_ms if self.ok and self.mean_ms > 0 else float("nan")

    @property
    def median_error(self) -> float:
        """How well the samples pin the median down: the half-width of a distribution-free ~95%
        confidence interval of the median (order statistics n/2 -+ 0.98 sqrt(n)), relative to
        the median. Unlike `cv` it shrinks with more samples whatever the noise looks like (a
        shared host's windows spread 10-20% for good); nan when failed."""
        n = len(self.samples_ms)
        if not self.ok or n == 0 or not self.median_ms > 0:
            return float("nan")
        xs = sorted(self.samples_ms)
        lo = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
        hi = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)) - 1)
        return (xs[hi] - xs[lo]) / (2 * self.median_ms)

    def steady(self, max_cv: float) -> bool:
        """Whether the median is trustworthy: the samples agree within `max_cv`, or there are
        enough of them to pin the median within `max_cv` (`median_error`) although they
        spread (a load spike mid-run spreads them and moves a median of few)."""
        if not (self.ok and self.converged):
            return False
        return self.cv <= max_cv or self.median_error <= max_cv

    @classmethod
    def from_samples(
        cls, samples_s: list[float] | tuple[float, ...], *, converged: bool = True
    ) -> Measurement:
        ms = tuple(float(s) * 1e3 for s in samples_s)
        if not ms:
            return cls.failed("no samples")
        return cls(
            median_ms=statistics.median(ms),
            mean_ms=statistics.fmean(ms),
            std_ms=statistics.pstdev(ms) if len(ms) > 1 else 0.0,
            min_ms=min(ms),
            max_ms=max(ms),
            repeats=len(ms),
            samples_ms=ms,
            converged=converged,
        )

    @classmethod
    def pool(cls, runs: Sequence[Measurement]) -> Measurement:
        """One measurement of the runs in the host's fast state: the same module measured
        several times, apart in time, so that a slow phase of the host which covered some of
        them does not set the result. The runs whose medians lie within QUIET_BAND of the
        fastest run's are pooled (their quiet windows, `quiet_samples`): a run's median is
        already robust to bursts shorter than the run, and phases only ever add time. (Pooling
        all windows and taking their 10th percentile as the floor failed where one fast run
        of 7 gave under 10% of the windows: the demo's networks then read 1.25x slow.) Failed
        runs are ignored, and so are runs that never got a quiet CPU (`converged=False`)
        beside one that did; only such stay as they were (unconverged). Nothing measured: the
        first failure."""
        ok = [m for m in runs if m.ok]
        if not ok:
            return runs[0] if runs else cls.failed("no runs")
        if len(ok) == 1:
            return ok[0]
        quiet = [m for m in ok if m.converged]
        if not quiet:
            every = [x / 1e3 for m in ok for x in m.samples_ms]
            return cls.from_samples(every, converged=False)
        if len(quiet) == 1:
            return quiet[0]
        best = min(m.median_ms for m in quiet)
        fast = [m for m in quiet if m.median_ms <= best * (1 + QUIET_BAND)]
        xs = quiet_samples([x for m in fast for x in m.samples_ms])
        return cls.from_samples([x / 1e3 for x in xs])

    @classmethod
    def failed(cls, error: str) -> Measurement:
        nan = float("nan")
        return cls(nan, nan, nan, nan, nan, 0, (), error)


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a measurement came from. Two measurements are comparable only when their
    provenance digests (everything except the time and host name) match."""

    tvm_version: str
    target_key: str
    target_json: str
    pipeline: str
    tuned: bool
    tuning_digest: str
    threads: int
    protocol: MeasureProtocol
    emulated: bool = False
    host: str = field(default_factory=lambda: f"{socket.gethostname()}/{platform.machine()}")
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["protocol"] = self.protocol.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        d = dict(d)
        d["protocol"] = MeasureProtocol.from_dict(d["protocol"])
        return cls(**d)

    @property
    def digest(self) -> str:
        d = self.to_dict()
        d.pop("created")
        d.pop("host")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
