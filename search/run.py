"""End to end: LUT -> latency model -> search -> final Arch -> measured -> retrained -> model dir.

    OUT/job.json         the settings (a re-run with other settings is refused, nothing lost)
    OUT/lut.sqlite       the LUT, built untuned for the space's blocks if it lacks them
    OUT/search.pt        supernet + architecture parameters, saved every epoch (resumable)
    OUT/evolution.json   evolution state per generation (strategy evolution)
    OUT/derive.json      derived architectures and their measured latencies
    OUT/arch.json        the final architecture
    OUT/retrain.pt       retraining checkpoint (resumable)
    OUT/model.json, OUT/weights.pt   the trained network (codesign.model_dir format)
    OUT/report.json      accuracy, predicted and measured latency, target met, seconds, history

The final architecture is measured before it is retrained: compiled like the latency model's
networks (`compile_network`, with the LUT's tuning records in tuned mode) and timed with
`LocalRunner`. If it misses the target as measured, the budget given to the derivation is
tightened by measured/target and the next architecture is measured (at most `measure_rounds`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codesign.arch import Arch
from codesign.data import Dataset, load_dataset
from codesign.search.objective import LatencyObjective, SearchError
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

STRATEGIES = ("proxyless", "evolution")


@dataclass(frozen=True, slots=True)
class SearchJob:
    space: str
    target: str
    latency_ms: float
    dataset: str = "mnist5k"
    strategy: str = "proxyless"
    epochs: int = 10
    warmup_epochs: int | None = None  # default: epochs // 4 (proxyless)
    retrain_epochs: int | None = None  # default: epochs
    db: str | None = None  # default: OUT/lut.sqlite
    latency_model: str | None = None  # fitted model file; default: LUT only
    estimator: str = "binary"
    loss: str = "mul"
    batch_size: int = 32
    lr: float = 0.05
    arch_lr: float = 0.01
    population: int = 24
    generations: int = 8
    repeat: int = 10
    min_repeat_ms: int = 50
    measure_rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SearchError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.epochs < 1 or (self.retrain_epochs is not None and self.retrain_epochs < 1):
            raise SearchError("epochs and retrain epochs must be >= 1")
        if self.measure_rounds < 1:
            raise SearchError("measure_rounds must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"codesign search: {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------ latency
def ensure_lut(
    space: SearchSpace, target: Target, db: Path, protocol: Any, progress: bool
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
    _log(
        f"{db} lacks {len(missing)} blocks of {space.name} on {target.key}: measuring them "
        "(untuned)",
        progress,
    )
    t0 = time.time()
    report = build_lut(space, target, db, blocks=missing, protocol=protocol, progress=progress)
    if report.failed:
        raise SearchError(f"measuring LUT blocks failed, e.g. {report.failed[0]}")
    return time.time() - t0


def load_latency_model(job: SearchJob, space: SearchSpace, target: Target, db: Path) -> Any:
    from codesign.latency.model import LatencyModel

    if job.latency_model is None:
        return LatencyModel.from_lut(db, space, target, mode="auto")
    model = LatencyModel.load(job.latency_model, db if job.db else None, target=target)
    if model.space.name != space.name or model.space.digest != space.digest:
        raise SearchError(
            f"latency model {job.latency_model} is for space {model.space.name!r}, not "
            f"{space.name!r}; fit one with `codesign latency fit --space {space.name}`"
        )
    if model.target_key != target.key:
        raise SearchError(
            f"latency model {job.latency_model} is for target {model.target_key}, not {target.key}"
        )
    if model.mode == "tuned" and not job.db:
        raise SearchError(
            "a tuned latency model needs --db (the LUT file holding its tuning records) so that "
            "the final network is compiled with the same records"
        )
    return model


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
        _log(
            f"warning: target {latency_ms:g} ms is below the fastest network's predicted "
            f"{ms:.4g} ms; searching anyway, the measurement decides",
            progress,
        )


def measure_arch(
    space: SearchSpace,
    arch: Arch,
    target: Target,
    protocol: Any,
    *,
    database: Any = None,
    trials: int = 0,
    seed: int = 0,
) -> Any:
    """Compile like the latency model's networks (`compile_network`, with `database` for tuned
    LUTs) and time with `LocalRunner` -> Measurement."""
    from codesign.latency.networks import compile_network
    from codesign.tvm_backend.runner import LocalRunner

    built, _ = compile_network(space, arch, target, seed=seed, database=database, trials=trials)
    # TVM's thread pool pins the calling thread to one core when it is configured (any thread
    # count) and never unpins it: restore the mask, or everything after the measurement in this
    # process (PyTorch training, parse_target's core count) runs on a single core.
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        m = LocalRunner(seed=seed).run(built, protocol)
    finally:
        if mask is not None:
            os.sched_setaffinity(0, mask)
    if not m.ok:
        raise SearchError(f"measuring {arch.encode()} on {target.key} failed: {m.error}")
    return m


def tuning_database(model: Any, db: Path, target: Target) -> Any:
    """The LUT's tuning records when the model's LUT is tuned, else None."""
    if model.mode != "tuned":
        return None
    from codesign.tvm_backend.database import open_tuning_database

    return open_tuning_database(db, target.key)


# ------------------------------------------------------------------ data
def search_split(data: Dataset, seed: int, fraction: float = 0.2) -> Dataset:
    """The training split divided again: weights train on one part, the architecture is chosen
    on the other (the validation split stays untouched for the final accuracy)."""
    import torch

    n = len(data.x_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_arch = max(1, int(round(n * fraction)))
    a, w = order[:n_arch], order[n_arch:]
    info = dataclasses.replace(data.info, n_train=len(w), n_val=len(a))
    return Dataset(info, data.x_train[w], data.y_train[w], data.x_train[a], data.y_train[a])


def task_space(space: SearchSpace, data: Dataset) -> SearchSpace:
    """`space` with the dataset's number of classes (latency: the head's classifier only)."""
    n = data.info.num_classes
    return space if n == space.num_classes else dataclasses.replace(space, num_classes=n)


# ------------------------------------------------------------------ the job
def run_search(job: SearchJob, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) `job` in directory `out`; returns the report (also OUT/report.json)."""
    from codesign.search.strategies import derive_and_measure, retrain, run_strategy

    out = Path(out)
    t_start = time.time()
    space, target = get_space(job.space), parse_target(job.target)
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    if job_file.exists():
        old = json.loads(job_file.read_text())
        if old != job.to_dict():
            diff = sorted(k for k in job.to_dict() if old.get(k) != job.to_dict()[k])
            raise SearchError(
                f"{out} holds a search with other settings ({', '.join(diff)}); use another "
                "--out, or delete the directory to start over (nothing was changed)"
            )
    report_file = out / "report.json"
    if report_file.exists():
        _log(f"{out} already holds a finished search; see {report_file}", progress)
        return json.loads(report_file.read_text())
    objective = LatencyObjective(job.latency_ms, form=job.loss)  # bad input fails early
    data = load_dataset(job.dataset, space.input_shape, seed=job.seed)
    _write_json(job_file, job.to_dict())
    db = Path(job.db) if job.db else out / "lut.sqlite"
    from codesign.measurement import MeasureProtocol

    protocol = MeasureProtocol(repeat=job.repeat, min_repeat_ms=job.min_repeat_ms)
    lut_seconds = 0.0
    if not (job.latency_model and not job.db):
        lut_seconds = ensure_lut(space, target, db, protocol, progress)
    model = load_latency_model(job, space, target, db)
    check_feasible(space, model, job.latency_ms, progress)
    tspace = task_space(space, data)
    _log(
        f"{job.strategy} search on {space.name} for {target.key}, target {job.latency_ms:g} ms "
        f"({model.mode} LUT{', fitted model' if job.latency_model else ''}), data "
        f"{data.info.name} ({data.info.n_train} train / {data.info.n_val} val)",
        progress,
    )
    found = run_strategy(job, tspace, search_split(data, job.seed), model, objective, out, progress)
    derived = derive_and_measure(job, tspace, found, model, target, db, out, progress)
    arch = space.decode(derived["arch"])
    (out / "arch.json").write_text(arch.to_json() + "\n")
    net, trained = retrain(job, tspace, arch, data, out, progress)
    from codesign.model_dir import ModelDir, save_model

    extra = {
        "target": target.spec,
        "target_key": target.key,
        "latency_target_ms": job.latency_ms,
        "predicted_ms": derived["predicted_ms"],
        "measured_ms": derived["measured_ms"],
    }
    save_model(
        out,
        net,
        ModelDir(
            tuple(net.specs),
            arch=arch.encode(),
            space=space.name,
            dataset=data.info,
            accuracy=trained["accuracy"],
            extra=extra,
        ),
    )
    report = {
        "space": space.name,
        "target": target.spec,
        "target_key": target.key,
        "strategy": job.strategy,
        "dataset": data.info.to_dict(),
        "arch": arch.encode(),
        "accuracy": trained["accuracy"],
        "latency_target_ms": job.latency_ms,
        "predicted_ms": derived["predicted_ms"],
        "measured_ms": derived["measured_ms"],
        "measurement": derived["measurement"],
        "target_met": derived["measured_ms"] <= job.latency_ms,
        "lut_mode": model.mode,
        "latency_model": job.latency_model or "lut-only",
        "seconds": {
            "lut": round(lut_seconds, 2),
            "search": round(found["seconds"], 2),
            "derive_and_measure": round(derived["seconds"], 2),
            "retrain": round(trained["seconds"], 2),
            "this_run": round(time.time() - t_start, 2),
        },
        "history": {
            "search": found["history"],
            "derive": derived["rounds"],
            "retrain": trained["history"],
        },
        "job": job.to_dict(),
    }
    _write_json(report_file, report)
    _log(
        f"{arch.encode()}: {trained['accuracy']:.2f}% val, {derived['predicted_ms']:.4g} ms "
        f"predicted, {derived['measured_ms']:.4g} ms measured (target {job.latency_ms:g} ms "
        f"{'met' if report['target_met'] else 'MISSED'}); wrote {out}",
        progress,
    )
    return report
