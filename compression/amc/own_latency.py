"""What a user's pruned CNN costs on the target, measured with TVM (the latency side of
`own.py`).

LayerLatency      layer -> ms from the LUT file, measured on demand with TVM (keys `layer:...`,
                  the `entries` table of codesign.lut); whole networks measured in alternating
                  passes into its `networks` table (keys `own:<class>:<digest>`); a network
                  measured beside a reference, as a ratio to it (`relative_ms`)
OwnLatency        a policy's predicted ms: the layers' LUT sum corrected by a ridge fit of its
                  gap to whole networks (`calibrate` on `calibration_counts`' networks)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from codesign.compression.amc.own_layers import LayerSpec, OwnGraph, layer_specs
from codesign.compression.amc.policy import PruneError
from codesign.latency.calibrate import Ridge, fit_log_ratio
from codesign.lut import LAYER_PREFIX, LatencyTable
from codesign.measurement import MeasureProtocol
from codesign.targets import Target

# Part of every network key: 2 since whole networks compile with their BatchNorm folded
# (`tvm_backend.lower.fold_batch_norm`; before, MobileNetV2 ran 2.7x slower), so networks
# measured before are measured again.
NETWORK_KEY_VERSION = 2


def network_key(model: nn.Module, specs: Sequence[LayerSpec]) -> str:
    """The `networks` table key of a (pruned) user network: its class and layer shapes."""
    h = hashlib.sha256(f"{type(model).__name__}|v{NETWORK_KEY_VERSION}".encode())
    for s in specs:
        h.update(s.key.encode())
    return f"own:{type(model).__name__}:{h.hexdigest()[:16]}"


class LayerLatency:
    """Layer and whole-network latencies on `target`, measured once each into the LUT file."""

    def __init__(self, db: str | Path, target: Target, protocol: MeasureProtocol) -> None:
        from codesign.lut_build import provenance_for

        self.db, self.target, self.protocol = Path(db), target, protocol
        self.provenance = provenance_for(target, tuned=False, tuning_digest="", protocol=protocol)
        self.measured = self.reused = 0
        with LatencyTable(self.db) as table:
            self.lut = {e.key: e.median_ms for e in table.entries(target.key, "untuned")
                        if e.key.startswith(LAYER_PREFIX) and e.ok
                        and e.provenance.digest == self.provenance.digest}  # fmt: skip

    def layer_ms(self, spec: LayerSpec) -> float:
        ms = self.lut.get(spec.key)
        if ms is None:
            from codesign.tvm_backend.lower import lower_module

            low = lower_module(spec.module(), spec.input_shape, label=spec.key,
                               nhwc_in=spec.nhwc_in, nhwc_out=spec.op == "conv")  # fmt: skip
            m = self._run(low, spec.key)
            with LatencyTable(self.db) as table:
                table.put(self.target.key, spec.key, "untuned", m, self.provenance)
            self.lut[spec.key] = ms = m.median_ms
            self.measured += 1
        return ms

    def network_ms(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Measured ms of the whole network (reused from the LUT's `networks` table)."""
        return self.networks_ms([model], input_shape)[0]

    def networks_ms(self, models: Sequence[nn.Module], input_shape: tuple[int, ...]
                    ) -> list[float]:  # fmt: skip
        """Measured ms of whole networks, reused from the LUT's `networks` table when every one
        is there; else all measured again in alternating passes (`measure_in_passes`: a slow
        phase of the host hits them alike, so their ratios hold) and stored."""
        from codesign.tvm_backend.runner import LocalRunner, measure_in_passes

        keys = [network_key(m, tuple(layer_specs(m, input_shape).values())) for m in models]
        with LatencyTable(self.db) as table:
            old = [table.get_network(self.target.key, k, "untuned") for k in keys]
        if all(o is not None and o.ok and o.provenance.digest == self.provenance.digest
               for o in old):  # fmt: skip
            self.reused += len(keys)
            return [o.median_ms for o in old if o is not None]
        builts = [compile_own(m, input_shape, self.target) for m in models]
        if len(builts) == 1:
            found = [self._run(builts[0], keys[0])]
        else:
            found = measure_in_passes(LocalRunner(), builts, self.protocol)
        with LatencyTable(self.db) as table:
            for k, m in zip(keys, found, strict=True):
                table.put_network(self.target.key, k, "untuned", self._checked(m, k),
                                  self.provenance)  # fmt: skip
        return [m.median_ms for m in found]

    def relative_ms(self, model: nn.Module, reference: Any, reference_ms: float,
                    input_shape: tuple[int, ...]) -> float:  # fmt: skip
        """`model` measured in alternating passes with `reference` (a compiled network that
        measured `reference_ms` before): reference_ms x their ratio. A slow phase of the host
        now hits both alike (a ResNet-18 policy read 3.66 ms alone, 0.72x the unpruned network
        beside it: 2.3 ms). Not stored: the ratio belongs to this reference."""
        from codesign.tvm_backend.runner import LocalRunner, measure_in_passes

        built = compile_own(model, input_shape, self.target)
        mine, ref = measure_in_passes(LocalRunner(), [built, reference], self.protocol)
        label = type(model).__name__
        return (
            reference_ms
            * self._checked(mine, label).median_ms
            / self._checked(ref, label).median_ms
        )

    def _run(self, built_or_lowered: Any, label: str) -> Any:
        from codesign.tvm_backend.build import Built, compile_module
        from codesign.tvm_backend.runner import LocalRunner, run_steady

        built = built_or_lowered
        if not isinstance(built, Built):
            built = compile_module(built_or_lowered, self.target)
        return self._checked(run_steady(LocalRunner(), built, self.protocol), label)

    def _checked(self, m: Any, label: str) -> Any:
        """`m`, a measurement of `label`, if it succeeded; else a PruneError saying why."""
        if not m.ok:
            raise PruneError(f"measuring {label} on {self.target.key} failed: {m.error}")
        return m


def compile_own(model: nn.Module, input_shape: tuple[int, ...], target: Target) -> Any:
    """Lower (BN folded, torch.export) and compile a whole user network with the one recipe."""
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_module

    return compile_module(lower_module(model, input_shape, label=type(model).__name__), target)


class OwnLatency:
    """Predicted ms of the network with given kept counts: the layers' LUT sum, corrected by
    a ridge fit of log(measured / LUT sum) on whole networks (`fit`), over three features:

        1           a constant gap (layouts, fusion the isolated layers do not see)
        weight MiB  weights that stop fitting in cache stream from memory in the network
                    (ResNet-18 at 64 px: 1.25x its LUT sum unpruned, 0.77x at half width)
        1 / LUT ms  each isolated layer pays a call the network does not

    Fitted on 6 networks (uniform 1.0 / 0.75 / 0.5 / 0.25 and two random policies, measured in
    alternating passes), it predicted 6 other random policies within 8.6% (ResNet-18) and 5.7%
    (MobileNetV2); a line through the unpruned and half-width networks missed them by up to
    61% and 17% (Zen 4 guest, 2 threads)."""

    def __init__(self, graph: OwnGraph, layers: LayerLatency, missing: str = "measure") -> None:
        self.graph, self.layers, self.missing = graph, layers, missing
        self.ridge: Ridge | None = None
        self._cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def layer_ms(self, name: str, spec: Any) -> float:
        known = self.layers.lut.get(spec.key)
        if known is not None or self.missing == "measure":
            return known if known is not None else self.layers.layer_ms(spec)
        base = self.graph.layers[name]
        return self.layers.layer_ms(base) * spec.macs() / max(base.macs(), 1)

    def _sums(self, counts: dict[str, int]) -> tuple[float, float]:
        """(LUT sum ms, weight MiB) of the network with `counts`."""
        key = tuple(counts.get(u.name, u.channels) for u in self.graph.units)
        if key not in self._cache:
            specs = self.graph.specs(counts)
            lut = sum(self.layer_ms(n, s) for n, s in zip(self.graph.layers, specs, strict=True))
            self._cache[key] = (float(lut), sum(s.weight_count() for s in specs) * 4 / 2**20)
        return self._cache[key]

    def lut_sum(self, counts: dict[str, int]) -> float:
        return self._sums(counts)[0]

    def features(self, counts: dict[str, int]) -> np.ndarray:
        lut, mib = self._sums(counts)
        return np.array([1.0, mib, 1.0 / max(lut, 1e-9)])

    def __call__(self, counts: dict[str, int]) -> float:
        lut = self.lut_sum(counts)
        if self.ridge is None:
            return lut
        return lut * float(np.exp(self.features(counts) @ np.array(self.ridge.w)))

    def fit(self, points: Sequence[tuple[dict[str, int], float]]) -> Ridge:
        """Fit the correction on (counts, measured ms) of whole networks."""
        z = np.array([self.features(c) for c, _ in points])
        y = np.log([ms / self.lut_sum(c) for c, ms in points])
        spread = np.std(z, axis=0)
        scale = np.where(spread > 1e-12, spread, 1.0)
        scale[0] = 1.0
        self.ridge = fit_log_ratio(("icpt", "weight_mib", "per_lut_ms"), z, y, scale)
        return self.ridge

    def fingerprint(self) -> str:
        w = () if self.ridge is None else self.ridge.w
        return f"{self.missing}|w=" + ",".join(f"{v:.6g}" for v in w)


def uniform_counts(
    graph: OwnGraph, options: dict[str, tuple[int, ...]], ratio: float
) -> dict[str, int]:
    """Every group at its largest allowed width <= ratio x its channels (else its smallest)."""
    return {
        u.name: max([o for o in options[u.name] if o <= ratio * u.channels + 1e-9]
                    or [options[u.name][0]])
        for u in graph.units
    }  # fmt: skip


def calibration_counts(
    graph: OwnGraph,
    options: dict[str, tuple[int, ...]],
    ratios: Sequence[float],
    random: int,
    seed: int,
) -> list[dict[str, int]]:
    """The policies whose networks fit `OwnLatency`: unpruned first, then uniform at `ratios`,
    then `random` seeded random ones (distinct)."""
    rng = np.random.default_rng(seed)
    found = [uniform_counts(graph, options, r) for r in (1.0, *ratios)]
    found += [{u.name: int(rng.choice(options[u.name])) for u in graph.units}
              for _ in range(random)]  # fmt: skip
    distinct: dict[tuple[int, ...], dict[str, int]] = {}
    for c in found:
        distinct.setdefault(tuple(c[u.name] for u in graph.units), c)
    return list(distinct.values())


def policies_ms(layers: LayerLatency, graph: OwnGraph, counts: Sequence[dict[str, int]]
                ) -> list[float]:  # fmt: skip
    """The whole networks of `counts` (the model itself where a policy keeps every channel),
    measured together (`LayerLatency.networks_ms`: in alternating passes, stored, reused)."""
    full = {u.name: u.channels for u in graph.units}
    nets = [graph.model if c == full else graph.prune(c) for c in counts]
    return layers.networks_ms(nets, graph.input_shape)


def calibrate(latency: OwnLatency, graph: OwnGraph, counts: Sequence[dict[str, int]]
              ) -> list[tuple[dict[str, int], float]]:  # fmt: skip
    """Measure the networks of `counts` whole (`policies_ms`); fit `latency`; return the
    (counts, measured ms) points (the first: the unpruned network, when `counts` starts so)."""
    points = list(zip(counts, policies_ms(latency.layers, graph, counts), strict=True))
    latency.fit(points)
    return points
