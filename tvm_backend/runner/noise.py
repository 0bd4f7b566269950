"""The host's noise floor: how far repeated measurements of one module disagree.

A LUT records it (`LatencyTable.noise_floor`): a latency model whose held-out error is within
the noise floor cannot be told apart from measurement noise on that host.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from codesign.errors import CodesignError
from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.runner.base import Runner

REPEATS = 7


def relative_spread(values: Sequence[float]) -> float:
    """(p90 - p10) / median of `values` (linear interpolation between order statistics)."""
    xs = sorted(float(v) for v in values)
    if len(xs) < 2:
        raise ValueError("a spread needs at least two values")
    p10, *_, p90 = statistics.quantiles(xs, n=10, method="inclusive")
    return (p90 - p10) / statistics.median(xs)


def repeat_spread(
    runner: Runner, built: Any, protocol: MeasureProtocol, *, repeats: int = REPEATS
) -> tuple[float, tuple[float, ...]]:
    """Measure `built` as a stored measurement is made, `repeats` times: (relative spread of
    the medians, the medians in ms). With `protocol.passes` > 1 each value pools that many runs
    taken apart in time, as a batch's passes are (repeat j pools runs j, j + repeats, ...).
    Raises CodesignError when a run fails."""
    n = max(2, repeats)
    runs: list[Measurement] = []
    for _ in range(n * protocol.passes):
        m = runner.run(built, protocol)
        if not m.ok:
            raise CodesignError(f"measuring the noise floor on {built.label} failed: {m.error}")
        runs.append(m)
    medians = [Measurement.pool(runs[j::n]).median_ms for j in range(n)]
    return relative_spread(medians), tuple(medians)
