"""End to end: search -> final Arch -> measured through TVM -> retrained -> model dir + report.

Two entry points:

    search_arch(space, model, data, latency_ms, out, settings=...)   Python objects in (the
        pipeline's entry): a SearchSpace, a LatencyModel (or a model file + `lut=`), a Dataset
    run_search_job(SearchJob(...), out)   names in (the CLI's): builds the LUT if it lacks blocks,
        loads the dataset and the latency model, then calls search_arch

OUT holds:

    job.json             what the search depends on (a re-run with other inputs is refused)
    search.pt            supernet + architecture parameters, saved every epoch (resumable)
    evolution.json       evolution state per generation (strategy evolution)
    derive.json          derived architectures and their measured latencies
    arch.json            the final architecture
    retrain.pt           retraining checkpoint (resumable)
    model.json, weights.pt   the trained network (codesign.model_dir format; not written when
                         settings.retrain_epochs == 0)
    report.json          accuracy, predicted and measured latency, target met, seconds, history

The final architecture is measured before it is retrained: compiled like the latency model's
networks (`compile_network`, with the LUT's tuning records in tuned mode) and timed with
`LocalRunner`. If it misses the target as measured, the budget given to the derivation is
tightened by measured/target and the next architecture is measured (at most `measure_rounds`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from codesign.arch import Arch
from codesign.data import Dataset, load_dataset
from codesign.search.hardware import (
    check_feasible,
    check_model,
    ensure_lut,
    log,
    model_identity,
)
from codesign.search.objective import LatencyObjective, SearchError
from codesign.search.settings import ESTIMATORS, STRATEGIES, SearchSettings
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

__all__ = [
    "ESTIMATORS",
    "STRATEGIES",
    "SearchJob",
    "SearchResult",
    "SearchSettings",
    "run_search_job",
    "search_arch",
]


@dataclass(frozen=True, slots=True)
class SearchJob:
    """A search named by strings (the CLI, benchmarks): space, target spec, dataset name or
    path, LUT and model files, and how to search (`settings`)."""

    space: str
    target: str
    latency_ms: float
    dataset: str = "mnist5k"
    db: str | None = None  # default: OUT/lut.sqlite
    latency_model: str | None = None  # fitted model file; default: LUT only
    settings: SearchSettings = field(default_factory=SearchSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SearchResult:
    arch: Arch
    predicted_ms: float
    measured_ms: float
    target_met: bool
    accuracy: float | None  # validation accuracy after retraining (None: not retrained)
    out: Path
    report: dict[str, Any] = field(compare=False, hash=False, repr=False)  # OUT/report.json

    @classmethod
    def from_report(cls, report: dict[str, Any], out: Path) -> SearchResult:
        return cls(
            Arch.decode(report["arch"]),
            report["predicted_ms"],
            report["measured_ms"],
            report["target_met"],
            report["accuracy"],
            out,
            report,
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _check_identity(out: Path, ident: dict[str, Any]) -> None:
    """Refuse when OUT/job.json records other values for the keys of `ident`; changes nothing."""
    path = out / "job.json"
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), json.loads(json.dumps(ident))
    diff = sorted(k for k in new if old.get(k) != new.get(k))
    if diff:
        raise SearchError(
            f"{out} holds a search with other settings ({', '.join(diff)}); use another "
            "output directory, or delete it to start over (nothing was changed)"
        )


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


# ------------------------------------------------------------------ Python entry point
def search_arch(
    space: SearchSpace,
    model: Any,
    data: Dataset,
    latency_ms: float,
    out: str | Path,
    *,
    settings: SearchSettings | None = None,
    lut: str | Path | None = None,
    target: Target | str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search `space` on `data` for a network under `latency_ms` on the latency model's target.

    `model` is a `codesign.latency.LatencyModel` or the path of a saved one (then `lut`, the
    LUT file it was fitted on, is checked against it). `target` defaults to the model's. `lut`
    defaults to the model's LUT file; it is needed for a tuned model (its tuning records compile
    the measured network). Re-running with the same `out` resumes (or returns the finished
    result); other inputs or settings in the same `out` raise SearchError.
    """
    from codesign.latency.model import LatencyModel
    from codesign.search.strategies import derive_and_measure, retrain, run_strategy

    settings = settings or SearchSettings()
    out = Path(out)
    t_start = time.time()
    source = "(given)"
    if isinstance(model, (str, Path)):
        source = str(model)
        model = LatencyModel.load(model, lut, target=target)
    target = parse_target(target) if target is not None else cast("Target | None", model.target)
    if target is None:
        raise SearchError(f"latency model {source} names no target: pass target=")
    db = Path(lut) if lut is not None else model.db
    check_model(model, space, target, db, source)
    objective = LatencyObjective(latency_ms, form=settings.loss)  # bad input fails early
    ident = {
        "space": space.name,
        "space_digest": space.digest,
        "target": target.key,
        "latency_ms": latency_ms,
        "dataset": data.info.to_dict(),
        "latency_model": model_identity(model),
        **settings.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(out, ident)
    if (out / "report.json").exists():
        log(f"{out} already holds a finished search; see {out / 'report.json'}", progress)
        return SearchResult.from_report(json.loads((out / "report.json").read_text()), out)
    _write_json(out / "job.json", ident)
    check_feasible(space, model, latency_ms, progress)
    tspace = task_space(space, data)
    log(
        f"{settings.strategy} search on {space.name} for {target.key}, target {latency_ms:g} ms "
        f"({model.mode} LUT, {'fitted model' if model.training else 'LUT sum'}), data "
        f"{data.info.name} ({data.info.n_train} train / {data.info.n_val} val)",
        progress,
    )
    split = search_split(data, settings.seed)
    found = run_strategy(settings, latency_ms, tspace, split, model, objective, out, progress)
    derived = derive_and_measure(
        settings, latency_ms, tspace, found, model, target, db, out, progress
    )
    arch = space.decode(derived["arch"])
    (out / "arch.json").write_text(arch.to_json() + "\n")
    trained: dict[str, Any] = {"accuracy": None, "history": [], "seconds": 0.0}
    if settings.retrain_for > 0:
        from codesign.model_dir import ModelDir, save_model

        net, trained = retrain(settings, tspace, arch, data, out, progress)
        extra = {
            "target": target.spec,
            "target_key": target.key,
            "latency_target_ms": latency_ms,
            "predicted_ms": derived["predicted_ms"],
            "measured_ms": derived["measured_ms"],
        }
        meta = ModelDir(
            tuple(net.specs),
            arch=arch.encode(),
            space=space.name,
            dataset=data.info,
            accuracy=trained["accuracy"],
            extra=extra,
        )
        save_model(out, net, meta)
    report = {
        "space": space.name,
        "target": target.spec,
        "target_key": target.key,
        "strategy": settings.strategy,
        "dataset": data.info.to_dict(),
        "arch": arch.encode(),
        "accuracy": trained["accuracy"],
        "latency_target_ms": latency_ms,
        "predicted_ms": derived["predicted_ms"],
        "measured_ms": derived["measured_ms"],
        "measurement": derived["measurement"],
        "target_met": derived["measured_ms"] <= latency_ms,
        "lut_mode": model.mode,
        "latency_model": source if model.training else "lut-only",
        "seconds": {
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
        "job": ident,
    }
    _write_json(out / "report.json", report)
    acc = "not retrained" if trained["accuracy"] is None else f"{trained['accuracy']:.2f}% val"
    log(
        f"{arch.encode()}: {acc}, {derived['predicted_ms']:.4g} ms predicted, "
        f"{derived['measured_ms']:.4g} ms measured (target {latency_ms:g} ms "
        f"{'met' if report['target_met'] else 'MISSED'}); wrote {out}",
        progress,
    )
    return SearchResult.from_report(report, out)


# ------------------------------------------------------------------ CLI entry point
def run_search_job(job: SearchJob, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) `job` in directory `out`; returns the report (also OUT/report.json)."""
    from codesign.latency.model import LatencyModel
    from codesign.measurement import MeasureProtocol

    out = Path(out)
    s = job.settings
    space, target = get_space(job.space), parse_target(job.target)
    early = {"space": space.name, "target": target.key, "latency_ms": job.latency_ms}
    _check_identity(out, {**early, **s.to_dict()})  # before any LUT work
    if (out / "report.json").exists():
        log(f"{out} already holds a finished search; see {out / 'report.json'}", progress)
        return json.loads((out / "report.json").read_text())
    LatencyObjective(job.latency_ms, form=s.loss)  # bad input fails before any work
    data = load_dataset(job.dataset, space.input_shape, seed=s.seed)
    db = Path(job.db) if job.db else out / "lut.sqlite"
    out.mkdir(parents=True, exist_ok=True)
    protocol = MeasureProtocol(repeat=s.repeat, min_repeat_ms=s.min_repeat_ms)
    lut_seconds, lut = 0.0, None
    if job.latency_model is None or job.db:
        lut_seconds, lut = ensure_lut(space, target, db, protocol, progress), db
    if job.latency_model is None:
        model: Any = LatencyModel.from_lut(db, space, target, mode="auto")
    else:
        model = job.latency_model
    result = search_arch(
        space, model, data, job.latency_ms, out, settings=s, lut=lut, target=target,
        progress=progress,
    )  # fmt: skip
    report = result.report
    if "lut" not in report["seconds"]:
        report["seconds"] = {"lut": round(lut_seconds, 2), **report["seconds"]}
        _write_json(out / "report.json", report)
    return report
