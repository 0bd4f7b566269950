"""The target side of a search: the LUT, the latency model, the feasibility check and the
measurement of the final network through a real TVM build (`compile_network` + `LocalRunner`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.arch import Arch
from codesign.search.objective import SearchError
from codesign.search.space import SearchSpace
from codesign.targets import Target

if TYPE_CHECKING:  # annotations only (they import torch or TVM)
    from codesign.latency.measured import MeasuringLatency
    from codesign.latency.model import LatencyModel
    from codesign.measurement import Measurement, MeasureProtocol
    from codesign.tvm_backend.database import SQLiteDatabase

    LatencyPredictor = LatencyModel | MeasuringLatency  # what the search predicts with


def log(msg: str, progress: bool) -> None:
    if progress:
        print(f"codesign search: {msg}", file=sys.stderr, flush=True)


def ensure_lut(
    space: SearchSpace, target: Target, db: Path, protocol: MeasureProtocol, progress: bool
) -> float:
    """Measure (untuned) the blocks of `space` on `target` that `db` lacks; returns seconds."""
    from codesign.lut import LatencyTable
    from codesign.lut_build import build_lut

    have: set[str] = set()
    if db.exists():
        with LatencyTable(db) as table:
            if {b.key for b in space.blocks()} <= set(table.latencies(target.key, "tuned")):
                return 0.0
            have = set(table.latencies(target.key, "untuned"))
    missing = [b for b in space.blocks() if b.key not in have]
    if not missing:
        return 0.0
    log(
        f"{db} lacks {len(missing)} blocks of {space.name} on {target.key}: measuring them "
        "(untuned)",
        progress,
    )
    t0 = time.time()
    report = build_lut(space, target, db, blocks=missing, protocol=protocol, progress=progress)
    if report.failed:
        raise SearchError(f"measuring LUT blocks failed, e.g. {report.failed[0]}")
    return time.time() - t0


def check_model(
    model: LatencyPredictor, space: SearchSpace, target: Target, db: Path | None, source: str
) -> None:
    """The latency model must be for `space` and `target`; a tuned one needs its LUT file."""
    if model.space.name != space.name or model.space.digest != space.digest:
        raise SearchError(
            f"latency model {source} is for space {model.space.name!r}, not {space.name!r}; "
            f"fit one with `codesign latency fit --space {space.name}`"
        )
    if model.target_key != target.key:
        raise SearchError(
            f"latency model {source} is for target {model.target_key}, not {target.key}"
        )
    if model.mode == "tuned" and db is None:
        raise SearchError(
            "a tuned latency model needs its LUT file (--db / lut=) holding its tuning records, "
            "so that the final network is compiled with the same records"
        )


def model_identity(model: LatencyPredictor) -> dict[str, Any]:
    """What makes two latency models predict the same (for resumption checks)."""
    import hashlib

    residual = getattr(model, "residual", None)
    return {
        "lut_digest": model.digest,
        "mode": model.mode,
        "form": model.form,
        "calibration": [float(c) for c in model.calibration],
        "residual": hashlib.sha256(residual.raw.encode()).hexdigest()[:16] if residual else None,
    }


def check_feasible(space: SearchSpace, model: Any, latency_ms: float, progress: bool) -> None:
    """Refuse a target far below the fastest network's predicted latency; warn when below it
    (a LUT-only model over-estimates small networks: such a target may still be met)."""
    tables = model.layer_tables()
    flat = [
        layer.candidates[int(t.argmin())] for layer, t in zip(space.layers(), tables, strict=True)
    ]
    fastest = Arch.from_flat(space.name, flat, list(space.depths))
    ms = float(model.predict(fastest))
    if latency_ms < 0.5 * ms:
        raise SearchError(
            f"latency target {latency_ms:g} ms is far below the fastest network of "
            f"{space.name!r} on {model.target_key} ({ms:.4g} ms predicted for "
            f"{fastest.encode()}); raise --latency-ms or choose a smaller space (e.g. a -w0.5 "
            "variant)"
        )
    if latency_ms < ms:
        log(
            f"warning: target {latency_ms:g} ms is below the fastest network's predicted "
            f"{ms:.4g} ms; searching anyway, the measurement decides",
            progress,
        )


def measure_arch(
    space: SearchSpace,
    arch: Arch,
    target: Target,
    protocol: MeasureProtocol,
    *,
    database: SQLiteDatabase | None = None,
    trials: int = 0,
    seed: int = 0,
) -> Measurement:
    """Compile like the latency model's networks (`compile_network`, with `database` for tuned
    LUTs) and time with `LocalRunner` -> Measurement."""
    from codesign.latency.networks import compile_network
    from codesign.modules import build_network
    from codesign.tvm_backend.runner import LocalRunner

    net = build_network(space, arch, seed=seed)
    built, _ = compile_network(
        net, target, label=arch.encode(), database=database, trials=trials, seed=seed
    )
    m = LocalRunner(seed=seed).run(built, protocol)  # keeps this process's CPU mask
    if not m.ok:
        raise SearchError(f"measuring {arch.encode()} on {target.key} failed: {m.error}")
    return m


def tuning_database(
    model: LatencyPredictor, db: Path | None, target: Target
) -> SQLiteDatabase | None:
    """The LUT's tuning records when the model's LUT is tuned, else None."""
    if model.mode != "tuned":
        return None
    from codesign.tvm_backend.database import open_tuning_database

    assert db is not None  # check_model: a tuned model comes with its LUT file
    return open_tuning_database(db, target.key)
