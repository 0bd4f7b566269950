"""The pipeline's stages, each a function of (config, upstream outputs) that writes into its own
work directory and returns JSON-able outputs; `codesign.pipeline.run` chains them through the
stage cache (`codesign.pipeline.cache`). Usable on their own:

    stage_lut -> stage_latency -> latency_budget -> stage_search -> stage_baselines
    -> stage_prune (AMC) -> stage_quantize (HAQ) -> stage_compile -> stage_verify
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from codesign.pipeline.cache import file_digest
from codesign.pipeline.config import ConfigError, PipelineConfig
from codesign.pipeline.verify import stage_verify

__all__ = [
    "latency_budget",
    "stage_baselines",
    "stage_compile",
    "stage_latency",
    "stage_lut",
    "stage_prune",
    "stage_quantize",
    "stage_search",
    "stage_verify",
]


def _protocol(cfg: PipelineConfig) -> Any:
    from codesign.measurement import MeasureProtocol

    return MeasureProtocol(repeat=cfg.lut.repeat, min_repeat_ms=cfg.lut.min_repeat_ms)


def db_path(cfg: PipelineConfig, out: Path) -> Path:
    """The LUT file: [lut] db, relative to the output directory unless absolute."""
    db = Path(cfg.lut.db)
    return db if db.is_absolute() else out / db


def _mode(cfg: PipelineConfig) -> str:
    return "tuned" if cfg.lut.trials > 0 else "untuned"


# ------------------------------------------------------------------ stages
def _bounded(cfg: PipelineConfig, target: Any) -> Any:
    """The FarmConfig bounding every RPC phase by `[target] rpc_timeout_s` when `target` is
    remote and the key is set; None otherwise (local targets talk to no RPC server)."""
    from codesign.targets import parse_target

    if cfg.target.rpc_timeout_s is None or not parse_target(target).is_remote:
        return None
    from codesign.farm.config import load_config

    return load_config().with_rpc_timeout(cfg.target.rpc_timeout_s)


def _network_runner(cfg: PipelineConfig, target: Any) -> Any:
    """The runner timing whole networks on a remote target under `[target] rpc_timeout_s`;
    None: measure_networks' own choice (the target's servers, or this machine)."""
    farm = _bounded(cfg, target)
    if farm is None:
        return None
    from codesign.tvm_backend.runner import Where

    return Where.of_target(target).runner(seed=cfg.task.seed, config=farm)


def stage_lut(cfg: PipelineConfig, db: Path, progress: bool = True) -> dict[str, Any]:
    """Measure every block of the space on the search target into the LUT (rows are reused)."""
    from codesign.lut_build import build_lut
    from codesign.targets import parse_target
    from codesign.tvm_backend.runner import Where

    target = cfg.target.targets[0]
    bounded = _bounded(cfg, target)
    rep = build_lut(
        cfg.task.space,
        target,
        db,
        trials=cfg.lut.trials,
        protocol=_protocol(cfg),
        seed=cfg.task.seed,
        farm=None if bounded is None else Where.of_target(parse_target(target)).farm(bounded),
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
        runner=_network_runner(cfg, target),
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
        allow_noisy=cfg.latency.allow_noisy,
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
        "networks": {
            "measured": nets.measured,
            "reused": nets.reused,
            "failed": nets.failed,
            "passes": nets.passes,
            "slow_share": nets.slow_share,
        },  # fmt: skip
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
    from codesign.latency.measured import latency_counts, measuring
    from codesign.latency.model import LatencyModel
    from codesign.search.run import search_arch
    from codesign.search.space import get_space

    model: Any = model_path
    if cfg.latency.measure_uncertain > 0:
        model = measuring(
            LatencyModel.load(model_path, db, target=cfg.target.targets[0]),
            budget_ms=budget_ms,
            max_measurements=cfg.latency.measure_uncertain,
            protocol=_protocol(cfg),
            seed=cfg.task.seed,
        )
    result = search_arch(
        get_space(cfg.task.space),
        model,
        _data(cfg),
        budget_ms,
        work,
        settings=_settings(cfg),
        lut=db,
        target=cfg.target.targets[0],
        progress=progress,
    )
    counts = latency_counts(model)  # candidates measured instead of predicted (None: off)
    return {"model_dir": str(work), "report": result.report, "latency_counts": counts}


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
        runner=_network_runner(cfg, target),
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


def _pass_through(model_dir: str, work: Path) -> str:
    """A copy of the model directory in `work/model` (a step that is off ships its input)."""
    dest = work / "model"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("model.json", "weights.pt"):
        shutil.copy2(Path(model_dir) / name, dest / name)
    return str(dest)


def stage_prune(
    cfg: PipelineConfig,
    search: dict[str, Any],
    db: Path,
    model_path: str,
    work: Path,
    progress: bool,
) -> dict[str, Any]:
    """AMC channel pruning of the searched network (`search`: the search stage's outputs);
    without "amc" in [compress] methods the searched network passes through."""
    model_dir = search["model_dir"]
    if "amc" not in cfg.compress.methods:
        rep = search["report"]
        now = {"acc": rep["accuracy"], "measured_ms": rep["measured_ms"]}
        return {"method": None, "model_dir": _pass_through(model_dir, work), "after": now}
    from codesign.pipeline.compress import prune

    return prune(cfg, Path(model_dir), db, model_path, work, progress)


def stage_quantize(
    cfg: PipelineConfig, pruned: dict[str, Any], db: Path, work: Path, progress: bool
) -> dict[str, Any]:
    """HAQ mixed precision of the prune stage's network (`pruned`: its outputs); without "haq"
    in [compress] methods that network passes through."""
    # what the prune step ships: the searched network where pruning did not measure faster
    ships = pruned["before"] if pruned.get("shipped") == "searched" else pruned["after"]
    if "haq" not in cfg.compress.methods:
        return {
            "method": None,
            "model_dir": _pass_through(pruned["model_dir"], work),
            "float_model_dir": pruned["model_dir"],
            "after": ships,
        }
    from codesign.pipeline.compress import quantize

    return quantize(cfg, Path(pruned["model_dir"]), db, ships, work, progress)


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
            rpc_timeout_s=cfg.target.rpc_timeout_s or CompileOptions.rpc_timeout_s,
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
