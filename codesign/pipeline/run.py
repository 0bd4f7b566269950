"""The main job: LUT -> latency model -> search -> baselines -> compress -> compile -> verify.

    from codesign.pipeline import load_config, run
    result = run(load_config("codesign.toml"), "out/")   # or run(None, "out/"): embedded default
    print(result.summary["artifact"]["latency_ms"], result.report_html)

Each stage is a function of (config, upstream outputs) run through StageRunner, so a re-run skips
what is done, resumes what was interrupted, and redoes what a changed input invalidates. The
search runs for the first target; the shipped artifact is compiled, checked and measured on every
target in [target] targets (remote ones through their RPC tracker). Layout of OUT:

    lut.sqlite           LUT + whole-network measurements + MetaSchedule records (shared)
    stages/<name>.json   each stage's inputs digest and outputs;  stages/<name>/  its files
    model.tar            the artifact of the first target (model-<target key>.tar for others)
    report.md, report.html, summary.json
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from codesign.pipeline.config import ConfigError, PipelineConfig
from codesign.pipeline.stages import StageRunner, digest_of, file_digest
from codesign.pipeline.verify import stage_verify

STAGES = ("lut", "latency", "search", "baselines", "compress", "compile", "verify")


@dataclass(frozen=True)
class PipelineResult:
    out: Path
    artifact: Path
    report_md: Path
    report_html: Path
    summary: dict[str, Any]


def _protocol(cfg: PipelineConfig) -> Any:
    from codesign.measurement import MeasureProtocol

    return MeasureProtocol(repeat=cfg.lut.repeat, min_repeat_ms=cfg.lut.min_repeat_ms)


def _db_path(cfg: PipelineConfig, out: Path) -> Path:
    db = Path(cfg.lut.db)
    return db if db.is_absolute() else out / db


def _mode(cfg: PipelineConfig) -> str:
    return "tuned" if cfg.lut.trials > 0 else "untuned"


# ------------------------------------------------------------------ stages
def stage_lut(cfg: PipelineConfig, db: Path, progress: bool = True) -> dict[str, Any]:
    """Measure every block of the space on the search target into the LUT (rows are reused)."""
    from codesign.lut_build import build_lut

    rep = build_lut(
        cfg.task.space,
        cfg.target.targets[0],
        db,
        trials=cfg.lut.trials,
        protocol=_protocol(cfg),
        seed=cfg.task.seed,
        progress=progress,
    )
    if rep.failed:
        raise ConfigError(
            f"{len(rep.failed)} block(s) failed to measure (first: {rep.failed[0]}); the rows "
            "measured so far are kept in the LUT, fix the cause and re-run to resume"
        )
    return {"db": str(db), "report": rep.to_dict()}


def stage_latency(
    cfg: PipelineConfig, db: Path, work: Path, progress: bool = True
) -> dict[str, Any]:
    """Measure sampled whole networks and fit LUT + XGBoost; LUT-only when networks = 0."""
    from codesign.latency.fit import fit_latency_model, held_out
    from codesign.latency.model import LatencyModel
    from codesign.latency.networks import measure_networks, sample_archs
    from codesign.latency.plot import scatter
    from codesign.latency.regress import metrics

    space, target, mode = cfg.task.space, cfg.target.targets[0], _mode(cfg)
    path = work / "latency_model.json"
    if cfg.latency.networks == 0:
        model = LatencyModel.from_lut(db, space, target, mode=mode, trials=cfg.lut.trials)
        model.save(path)
        return {"model": str(path), "digest": file_digest(path), "fitted": False}
    from codesign.search.space import get_space

    archs = sample_archs(get_space(space), cfg.latency.networks, cfg.task.seed)
    nets = measure_networks(
        space,
        target,
        db,
        archs,
        mode=mode,
        trials=cfg.lut.trials,
        protocol=_protocol(cfg),
        seed=cfg.task.seed,
        progress=progress,
    )
    model, rep = fit_latency_model(
        db,
        space,
        target,
        mode=mode,
        archs=archs,
        test_fraction=cfg.latency.test_fraction,
        seed=cfg.task.seed,
        trials=cfg.lut.trials,
    )
    model.save(path)
    test_archs, meas, preds = held_out(model, db)
    png = scatter(
        work / "latency_scatter.png",
        meas,
        {k: preds[k] for k in ("lut_only", "lut_xgb")},
        f"{model.space.name} on {model.target_key} ({model.mode}), {len(test_archs)} held out",
    )
    return {
        "model": str(path),
        "digest": file_digest(path),
        "fitted": True,
        "networks": {"measured": nets.measured, "reused": nets.reused, "failed": nets.failed},
        "fit": rep.to_dict(),
        "held_out": {k: metrics(v, meas) for k, v in preds.items()},
        "scatter": str(png),
    }


def latency_budget(cfg: PipelineConfig, model_path: str, db: Path) -> dict[str, float]:
    """The search's latency budget: [target] latency_ms, or lo + fraction * (hi - lo) between the
    predicted latency of the smallest and the largest network of the space."""
    from codesign.latency.model import LatencyModel

    model = LatencyModel.load(model_path, db)
    space = model.space
    tokens = space.ops
    lo_arch = space.uniform(tokens[-1] if space.allow_skip else tokens[0])
    hi_arch = space.uniform(tokens[-2] if space.allow_skip else tokens[-1])
    lo, hi = model.predict(lo_arch), model.predict(hi_arch)
    if cfg.target.latency_ms is not None:
        budget = cfg.target.latency_ms
        if budget < lo:
            raise ConfigError(
                f"[target] latency_ms = {budget:g} is below the fastest network of the space "
                f"({lo_arch.encode()}: {lo:.4g} ms predicted); raise it"
            )
    else:
        budget = lo + cfg.target.budget_fraction * (hi - lo)
    return {"budget_ms": round(budget, 6), "smallest_ms": lo, "largest_ms": hi}


def _settings(cfg: PipelineConfig) -> Any:
    from codesign.search.run import SearchSettings

    return SearchSettings(
        strategy=cfg.search.strategy,
        epochs=cfg.search.epochs,
        retrain_epochs=cfg.search.retrain_epochs,
        batch_size=cfg.search.batch_size,
        repeat=cfg.lut.repeat,
        min_repeat_ms=cfg.lut.min_repeat_ms,
        seed=cfg.task.seed,
    )


def _data(cfg: PipelineConfig) -> Any:
    from codesign.data import load_dataset
    from codesign.search.space import get_space

    return load_dataset(cfg.task.dataset, get_space(cfg.task.space).input_shape, seed=cfg.task.seed)


def stage_search(
    cfg: PipelineConfig, db: Path, model_path: str, budget_ms: float, work: Path, progress: bool
) -> dict[str, Any]:
    """Search under the budget, measure the chosen network, retrain it; a model dir in `work`."""
    from codesign.search.run import search_arch
    from codesign.search.space import get_space

    result = search_arch(
        get_space(cfg.task.space),
        model_path,
        _data(cfg),
        budget_ms,
        work,
        settings=_settings(cfg),
        lut=db,
        target=cfg.target.targets[0],
        progress=progress,
    )
    return {"model_dir": str(work), "report": result.report}


def stage_baselines(cfg: PipelineConfig, db: Path, work: Path, progress: bool) -> dict[str, Any]:
    """Hand-designed uniform networks trained with the searched network's recipe and measured
    with the same compiler, target and protocol: the points the search must beat."""
    from codesign.latency.networks import measure_networks
    from codesign.lut import LatencyTable
    from codesign.search.run import task_space
    from codesign.search.space import get_space
    from codesign.search.strategies import retrain
    from codesign.targets import parse_target

    space, target = get_space(cfg.task.space), parse_target(cfg.target.targets[0])
    data = _data(cfg)
    archs = [space.uniform(t) for t in cfg.search.baselines]
    measure_networks(
        space,
        target,
        db,
        archs,
        mode=_mode(cfg),
        trials=cfg.lut.trials,
        protocol=_protocol(cfg),
        seed=cfg.task.seed,
        progress=progress,
    )
    with LatencyTable(db, readonly=True) as table:
        measured = {e.key: e.median_ms for e in table.networks(target.key, _mode(cfg)) if e.ok}
    points = []
    for token, arch in zip(cfg.search.baselines, archs, strict=True):
        sub = work / token
        sub.mkdir(exist_ok=True)
        done = sub / "result.json"
        if not done.exists():
            _, trained = retrain(_settings(cfg), task_space(space, data), arch, data, sub, progress)
            done.write_text(json.dumps({"accuracy": trained["accuracy"]}))
        acc = json.loads(done.read_text())["accuracy"]
        points.append(
            {"label": token, "arch": arch.encode(), "acc": acc, "ms": measured[arch.encode()]}
        )
    return {"points": points}


def stage_compress(
    cfg: PipelineConfig,
    model_dir: str,
    db: Path,
    model_path: str,
    budget_ms: float,
    work: Path,
    progress: bool,
) -> dict[str, Any]:
    """AMC pruning or HAQ quantization of the searched network under the budget; `none` passes
    the searched network through."""
    method = cfg.compress.method
    if method == "none":
        dest = work / "model"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for name in ("model.json", "weights.pt"):
            shutil.copy2(Path(model_dir) / name, dest / name)
        return {"method": "none", "model_dir": str(dest)}
    from codesign.pipeline.compress import compress

    return compress(cfg, Path(model_dir), db, model_path, budget_ms, work, progress)


def stage_compile(
    cfg: PipelineConfig, model_dir: str, db: Path, target: str, path: Path, progress: bool
) -> dict[str, Any]:
    """Compile the final network into an artifact, check it against PyTorch, measure it."""
    from codesign.artifact.pack import CompileOptions, compile_artifact

    trials = cfg.compile.trials if cfg.compile.trials is not None else cfg.lut.trials
    rep = compile_artifact(
        model_dir,
        target,
        path,
        CompileOptions(
            tune_trials=trials,
            focus_trials=cfg.compile.focus_trials,
            # untuned LUT and no focus: TVM's default schedules
            tuning_db=db if trials > 0 or cfg.compile.focus_trials > 0 else None,
            protocol=_protocol(cfg),
            seed=cfg.task.seed,
            progress=progress,
        ),
    )
    m = rep.artifact.manifest.data
    return {
        "artifact": str(path),
        "sha256": file_digest(path),
        "manifest": {
            "target": m["target"],
            "tvm": m["tvm"],
            "latency": m.get("latency"),
            "accuracy": m.get("accuracy"),
            "equality": m.get("equality"),
            "tuning": m.get("tuning"),
            "model": {k: m["model"].get(k) for k in ("arch", "space", "blocks", "policies")},
        },
        "seconds": rep.seconds,
    }


# ------------------------------------------------------------------ the job
def run(
    config: PipelineConfig | None = None, out: str | Path = "out", *, progress: bool = True
) -> PipelineResult:
    """Run (or resume) the whole pipeline into `out`; see the module docstring."""
    from codesign.pipeline.report import write_report

    cfg = (config or PipelineConfig()).validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    db = _db_path(cfg, out)
    runner = StageRunner(out, total=len(STAGES) - 1 + len(cfg.target.targets))
    with runner.stop_on_signals():
        summary = _stages(cfg, out, db, runner, progress)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md, html = write_report(out, cfg, summary)
    return PipelineResult(out, Path(summary["artifact"]["path"]), md, html, summary)


def _stages(
    cfg: PipelineConfig, out: Path, db: Path, runner: StageRunner, progress: bool
) -> dict[str, Any]:
    from codesign.targets import parse_target

    main_target = cfg.target.targets[0]

    lut = runner.run(
        "lut",
        {"cfg": cfg.digest("task", "lut"), "target": main_target, "db": str(db)},
        lambda work: stage_lut(cfg, db, progress),
    )
    lat = runner.run(
        "latency",
        {"lut": digest_of(lut), "cfg": cfg.digest("latency")},
        lambda work: stage_latency(cfg, db, work, progress),
    )
    budget = latency_budget(cfg, lat["model"], db)
    up = {"latency": lat["digest"], "budget": budget["budget_ms"]}
    srch = runner.run(
        "search",
        {**up, "cfg": cfg.digest("search", "task")},
        lambda work: stage_search(cfg, db, lat["model"], budget["budget_ms"], work, progress),
    )
    base = runner.run(
        "baselines",
        {
            "lut": digest_of(lut),
            "task": cfg.digest("task"),
            "recipe": [cfg.search.retrain_epochs, cfg.search.batch_size, cfg.search.baselines],
        },
        lambda work: stage_baselines(cfg, db, work, progress),
    )
    comp = runner.run(
        "compress",
        {**up, "search": digest_of(srch), "cfg": cfg.digest("compress")},
        lambda work: stage_compress(
            cfg, srch["model_dir"], db, lat["model"], budget["budget_ms"], work, progress
        ),
    )
    shipped: dict[str, Any] = {}
    for i, target in enumerate(cfg.target.targets):
        key = parse_target(target).key
        name = "compile" if i == 0 else f"compile-{key}"
        path = out / ("model.tar" if i == 0 else f"model-{key}.tar")
        shipped[target] = runner.run(
            name,
            {"compress": digest_of(comp), "target": target, "cfg": cfg.digest("compile", "lut")},
            lambda work, t=target, p=path: stage_compile(
                cfg, comp["model_dir"], db, t, p, progress
            ),
        )
    first = shipped[main_target]
    ver = runner.run(
        "verify",
        {"artifact": first["sha256"], "baselines": digest_of(base)},
        lambda work: stage_verify(
            first["artifact"],
            comp["model_dir"],
            base["points"],
            budget["budget_ms"],
            work,
            space=cfg.task.space,
            seed=cfg.task.seed,
        ),
    )
    summary = {
        "config": cfg.to_dict(),
        "budget": budget,
        "lut": lut["report"],
        "latency": {k: v for k, v in lat.items() if k != "digest"},
        "search": srch["report"],
        "baselines": base["points"],
        "compress": comp,
        "artifacts": shipped,
        "artifact": {
            "path": first["artifact"],
            "latency_ms": (first["manifest"]["latency"] or {}).get("median_ms"),
            "accuracy": (first["manifest"]["accuracy"] or {}).get("top1"),
            "accuracy_n": (first["manifest"]["accuracy"] or {}).get("n"),
        },
        "verify": ver,
        "stages": {"ran": runner.ran, "skipped": runner.skipped},
    }
    return summary


def with_overrides(cfg: PipelineConfig, **sections: dict[str, Any]) -> PipelineConfig:
    """`cfg` with some keys of some sections replaced, e.g. search={"epochs": 1}."""
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg.validate()
