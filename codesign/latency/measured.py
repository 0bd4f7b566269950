"""`MeasuringLatency`: a latency model that measures where its prediction cannot decide.

A search or a compression agent asks "is this candidate under the budget?". When the model's
95% interval for the candidate contains the budget and the prediction is not `confident`, the
answer is measured instead: the candidate is compiled with the LUT's recipe and timed through
TVM on this machine (`LocalRunner`), and the measurement is cached (architectures in the LUT's
`networks` table, reused across runs; other block lists, such as pruned networks, in memory).
Everything else is the wrapped `LatencyModel`'s prediction. `counts` says how many candidates
were measured instead of predicted.

    lat = MeasuringLatency(LatencyModel.load(path, db), budget_ms=2.0)
    lat.predict(arch); lat.predict_blocks(specs)    # as LatencyModel (LatencySource too)
    lat.counts                                      # LatencyCounts(measured=.., predicted=..)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codesign.arch import Arch
from codesign.blocks import BlockSpec
from codesign.latency.calibrate import LatencyPrediction
from codesign.latency.model import LatencyModel, LatencyModelError


@dataclass(frozen=True, slots=True)
class LatencyCounts:
    """Candidates answered by measurement (`measured`: TVM runs, `cached`: an earlier
    measurement reused) and by prediction (`predicted`)."""

    measured: int = 0
    cached: int = 0
    predicted: int = 0
    failed: int = 0  # measurements that failed: the prediction was used

    def to_dict(self) -> dict[str, int]:
        return {
            "measured": self.measured,
            "cached": self.cached,
            "predicted": self.predicted,
            "failed": self.failed,
        }


class MeasuringLatency:
    """Wraps a `LatencyModel`; any attribute not defined here is the model's."""

    def __init__(
        self,
        model: LatencyModel,
        *,
        budget_ms: float | None,
        max_measurements: int = 32,
        protocol: Any = None,
        runner: Any = None,
        seed: int = 0,
    ) -> None:
        if model.target is None or model.target.is_remote:
            raise LatencyModelError(
                "measuring uncertain candidates needs a local target on the model "
                "(load the model with target=...)"
            )
        self.model = model
        self.budget_ms = budget_ms
        self.max_measurements = max_measurements
        self.protocol = protocol
        self.runner = runner
        self.seed = seed
        self._memo: dict[tuple[str, ...], tuple[float, bool]] = {}  # ms, measured
        self._n = {"measured": 0, "cached": 0, "predicted": 0, "failed": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    @property
    def counts(self) -> LatencyCounts:
        return LatencyCounts(**self._n)

    # ------------------------------------------------------------------ decisions
    def uncertain(self, p: LatencyPrediction) -> bool:
        """Measure this one? Not confident, and its interval contains the budget."""
        if self.budget_ms is None or p.confident:
            return False
        return p.low <= self.budget_ms <= p.high

    def _answer(self, key: tuple[str, ...], p: LatencyPrediction, measure: Any) -> float:
        """One answer per candidate for the wrapper's life, measured or predicted: a candidate
        priced under one budget keeps its price under another (AMC raises its budget to the
        floor it priced; a floor predicted first and measured later could lie above it)."""
        if key in self._memo:
            ms, measured = self._memo[key]
            self._n["cached" if measured else "predicted"] += 1
            return ms
        if not self.uncertain(p) or self._n["measured"] >= self.max_measurements:
            self._n["predicted"] += 1
            self._memo[key] = (p.ms, False)
            return p.ms
        ms, fresh = measure()
        if ms is None:
            self._n["failed"] += 1
            self._n["predicted"] += 1
            self._memo[key] = (p.ms, False)
            return p.ms
        self._n["measured" if fresh else "cached"] += 1
        self._memo[key] = (ms, True)
        return ms

    # ------------------------------------------------------------------ LatencySource
    def predict(self, arch: Arch) -> float:
        p = self.model.predict_with_uncertainty(arch)
        return self._answer((arch.encode(),), p, lambda: self._measure_arch(arch))

    def predict_many(self, archs: Sequence[Arch]) -> np.ndarray:
        return np.array([self.predict(a) for a in archs])

    def predict_blocks(self, specs: Sequence[BlockSpec]) -> float:
        p = self.model.predict_blocks_with_uncertainty(specs)
        key = tuple(s.key for s in specs)
        return self._answer(key, p, lambda: self._measure_blocks(specs))

    def block_ms(self, spec: BlockSpec) -> float:
        return self.model.block_ms(spec)

    # ------------------------------------------------------------------ measuring
    def _measure_arch(self, arch: Arch) -> tuple[float | None, bool]:
        from codesign.latency.networks import measure_networks
        from codesign.lut import LatencyTable

        m = self.model
        assert m.target is not None  # checked in __init__
        if m.db is None:
            return self._measure_blocks(m.space.arch_blocks(arch))
        rep = measure_networks(
            m.space, m.target, m.db, [arch], mode=m.mode, trials=m.trials,
            protocol=self.protocol, seed=self.seed, runner=self.runner, progress=False,
        )  # fmt: skip
        with LatencyTable(m.db) as table:
            row = table.get_network(m.target_key, arch.encode(), m.mode)
        if row is None or not row.ok:
            return None, False
        return row.median_ms, rep.measured > 0

    def _measure_blocks(self, specs: Sequence[BlockSpec]) -> tuple[float | None, bool]:
        from codesign.latency.networks import compile_like_lut
        from codesign.measurement import MeasureProtocol
        from codesign.modules import Network, init_weights
        from codesign.tvm_backend.runner import LocalRunner, run_steady

        m = self.model
        assert m.target is not None  # checked in __init__
        net = Network(specs)
        init_weights(net, self.seed)
        built = compile_like_lut(net, m.target, db=m.db, mode=m.mode, trials=m.trials,
                                 label="candidate", seed=self.seed)  # fmt: skip
        runner = self.runner or LocalRunner(seed=self.seed)
        meas = run_steady(runner, built, self.protocol or MeasureProtocol())
        return (meas.median_ms if meas.ok else None), True


def measuring(model: Any, *, budget_ms: float | None, **kwargs: Any) -> Any:
    """`model` wrapped in `MeasuringLatency` (a wrapper already is re-budgeted, not nested)."""
    if isinstance(model, MeasuringLatency):
        model.budget_ms = budget_ms
        return model
    return MeasuringLatency(model, budget_ms=budget_ms, **kwargs)


def latency_counts(model: Any) -> dict[str, int] | None:
    """The wrapper's counts as a dict, or None for a plain model (for result records)."""
    counts = getattr(model, "counts", None)
    return counts.to_dict() if isinstance(counts, LatencyCounts) else None
