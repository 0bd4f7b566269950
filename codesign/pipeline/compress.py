"""The pipeline's compression stage: AMC channel pruning of the searched
network, under `[compress] budget_fraction` x the searched network's predicted latency (the
search already meets the search budget; compression buys the rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codesign.pipeline.config import ConfigError, PipelineConfig


def compress(
    cfg: PipelineConfig,
    model_dir: Path,
    db: Path,
    model_path: str,
    budget_ms: float,
    work: Path,
    progress: bool,
) -> dict[str, Any]:
    from codesign.latency.model import LatencyModel
    from codesign.model_dir import load_model

    net, _ = load_model(model_dir)
    lat = LatencyModel.load(model_path, db)
    base_ms = lat.predict_blocks(net.specs)
    target_ms = cfg.compress.budget_fraction * base_ms
    if cfg.compress.method == "amc":
        return _amc(cfg, model_dir, db, model_path, target_ms, work, progress)
    raise ConfigError(f"unknown compression method {cfg.compress.method!r}")


def _amc(
    cfg: PipelineConfig,
    model_dir: Path,
    db: Path,
    model_path: str,
    target_ms: float,
    work: Path,
    progress: bool,
) -> dict[str, Any]:
    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.pipeline import PruneJob, prune_model
    from codesign.compression.ddpg import DDPGConfig
    from codesign.measurement import MeasureProtocol
    from codesign.train import TrainConfig

    seed = cfg.task.seed
    episodes = cfg.compress.episodes
    job = PruneJob(
        model=str(model_dir),
        target=cfg.target.targets[0],
        budget_ms=target_ms,
        dataset=cfg.task.dataset,
        out=str(work),
        db=str(db),
        latency_model=model_path,
        trials=cfg.lut.trials,
        measure=True,
        artifact=False,
        raise_budget_to_floor=True,
        protocol=MeasureProtocol(repeat=cfg.lut.repeat, min_repeat_ms=cfg.lut.min_repeat_ms),
    )
    config = AMCConfig(
        episodes=episodes,
        seed=seed,
        ddpg=DDPGConfig(seed=seed, warmup_episodes=max(1, min(20, episodes // 3))),
    )
    finetune = TrainConfig(epochs=cfg.compress.finetune_epochs, seed=seed)
    r = prune_model(job, config, finetune, progress=progress)
    ratios = r["ratios"]
    return {
        "method": "amc",
        "model_dir": str(work),
        "policy": r["policy"],
        "budget_ms": r["budget_ms"],
        "budget_asked_ms": target_ms,
        "before": {"acc": r["base_acc"], "measured_ms": r.get("base_measured_ms")},
        "after": {"acc": r["acc"], "measured_ms": r.get("measured_ms")},
        "report": r,
        "per_layer": {
            "values": list(ratios.values()),
            "labels": [str(k) for k in ratios],
            "ylabel": "kept channel ratio",
            "title": f"AMC policy ({r['episodes']} episodes, budget {target_ms:.3g} ms)",
        },
    }
