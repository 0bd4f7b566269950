"""Prune a model directory end to end: search, prune, fine-tune, save, compile, measure.

    load model DIR + dataset (the model's own split) + latency model (LUT or saved model)
    -> AMC search under the budget (resumable, OUT/search.pt)
    -> prune the best policy (+ optional least-squares refit), refresh BN statistics
    -> fine-tune (resumable, OUT/finetune.pt) -> evaluate on the validation split
    -> save OUT as a model directory (policy in model.json policies["prune"])
    -> compile the pruned and the original network with the one TVM recipe (the LUT's tuning
       records when the LUT is tuned) and time both with LocalRunner
    -> compile OUT into the artifact OUT/model.tar with `codesign compile`'s code (outputs
       checked against PyTorch; `codesign verify` / `codesign run` / `codesign.load` take it)
A report lands in OUT/prune.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codesign.compression.amc.env import AMCConfig, AMCEnv, reachable_ms
from codesign.compression.amc.policy import PruneError, PrunePolicy, structure
from codesign.compression.amc.search import amc_search
from codesign.compression.amc.surgery import prune_network, recalibrate_bn
from codesign.data import Dataset, load_dataset
from codesign.measurement import MeasureProtocol
from codesign.model_dir import ModelDir, load_model, save_model
from codesign.modules import Network
from codesign.targets import Target, parse_target
from codesign.train import TrainConfig, evaluate, train


def load_data(meta: ModelDir, dataset: str, input_shape: tuple[int, int, int]) -> Dataset:
    """The dataset with the model's own train/validation split when it was trained on it."""
    info = meta.dataset
    if info is not None and info.name == Path(dataset).name and info.n_train + info.n_val > 0:
        return load_dataset(
            dataset,
            input_shape,
            val_fraction=info.n_val / (info.n_train + info.n_val),
            seed=info.seed,
        )
    return load_dataset(dataset, input_shape)


def open_latency_model(
    meta: ModelDir,
    target: Target,
    *,
    db: str | Path | None,
    latency_model: str | Path | None,
    missing: str,
    trials: int = 0,
) -> Any:
    from codesign.latency.model import LatencyModel

    if latency_model is not None:
        model = LatencyModel.load(latency_model, db, missing=missing, target=target)
    elif db is not None:
        if meta.space is None:
            raise PruneError(
                "the model directory names no search space, so the LUT cannot be opened for it; "
                "pass a fitted latency model (--latency-model) instead"
            )
        model = LatencyModel.from_lut(db, meta.space, target, missing=missing, trials=trials)
    else:
        raise PruneError(
            "give the latency table (--db) or a fitted latency model (--latency-model)"
        )
    if model.target_key != target.key:
        raise PruneError(
            f"the latency model is for target {model.target_key}, not {target.key}; use a LUT "
            "measured on this target"
        )
    if missing == "measure" and model.db is None:
        raise PruneError("measuring missing blocks needs the LUT file (--db)")
    if missing == "measure" and model.mode == "tuned" and model.trials <= 0:
        raise PruneError(
            "the LUT holds tuned latencies: measuring new block shapes the same way needs a "
            "tuning budget (--trials N, trials per new task), or use --missing predict"
        )
    return model


# ------------------------------------------------------------------------- TVM
ARTIFACT = "model.tar"


def ship(out: Path, target: Target, lat: Any, job: PruneJob, seed: int, progress: bool) -> Any:
    """Compile the saved model directory `out` into OUT/model.tar with `codesign compile`'s
    code (equality with PyTorch checked, accuracy and latency recorded in its manifest)."""
    from codesign.artifact.pack import CompileOptions, compile_artifact

    tuned = lat.mode == "tuned" and lat.db is not None
    opts = CompileOptions(
        tune_trials=lat.trials if tuned else 0,
        tuning_db=Path(lat.db) if tuned and lat.db is not None else None,
        protocol=job.protocol,
        seed=seed,
        device_check=job.measure,
        progress=progress,
    )
    return compile_artifact(out, target, out / ARTIFACT, opts).artifact


# ------------------------------------------------------------------------- pipeline
@dataclass(frozen=True, slots=True)
class PruneJob:
    model: str
    target: str
    budget_ms: float
    dataset: str
    out: str
    db: str | None = None
    latency_model: str | None = None
    # pruned block shapes absent from the LUT: "measure" them through TVM into the LUT (the
    # default, as `codesign prune`), or "predict" them with the per-block XGBoost model
    missing: str = "measure"
    trials: int = 0  # tuned LUTs: MetaSchedule trials per task of a new block shape
    measure: bool = True  # time the original and the pruned network side by side
    artifact: bool = True  # compile the pruned model into OUT/model.tar (`codesign compile`)
    protocol: MeasureProtocol = MeasureProtocol()
    # A budget below what pruning can reach is raised to that floor instead of refused (the
    # pipeline's budget is a fraction of the searched network: with scheduled kernels a small
    # network's fixed per-kernel costs can keep every pruned width above it).
    raise_budget_to_floor: bool = False
    # measure (through TVM) up to this many candidates whose predicted latency is uncertain
    # near the budget instead of trusting the prediction (codesign.latency.measured); 0: never
    measure_uncertain: int = 0


def finalize(
    net: Network, policy: PrunePolicy, config: AMCConfig, data: Dataset
) -> tuple[Network, dict[str, torch.Tensor]]:
    """The pruned network as the search scored it (refit, BN refresh), before fine-tuning."""
    calib = data.calibration(config.calib_images, seed=config.seed)
    pruned, keep = prune_network(
        net,
        policy,
        prune_outputs=config.prune_outputs,
        calibration=calib if config.reconstruct else None,
        seed=config.seed,
    )
    if config.bn_recalibrate:
        recalibrate_bn(pruned, calib)
    return pruned, keep


def fine_tune(
    pruned: Network, data: Dataset, cfg: TrainConfig, out: Path, policy: PrunePolicy, progress: bool
) -> list[dict[str, float]]:
    """Resumable fine-tuning; a checkpoint of another policy's network is discarded."""
    ckpt, tag = out / "finetune.pt", out / "finetune.policy"
    if ckpt.exists() and (not tag.exists() or tag.read_text() != policy.encode()):
        ckpt.unlink()
    tag.write_text(policy.encode())
    if cfg.epochs == 0:
        return []
    return train(pruned, data, cfg, checkpoint=ckpt, progress=progress, desc="fine-tune")


def prune_model(
    job: PruneJob, config: AMCConfig, finetune: TrainConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Run the whole pipeline (see the module docstring); returns the report it writes."""
    t0 = time.time()
    target = parse_target(job.target)
    net, meta = load_model(job.model)
    if meta.quantized:
        raise PruneError(
            f"{job.model} is quantised; prune the float model first, then quantise the result"
        )
    if job.budget_ms <= 0:
        raise PruneError(f"the latency budget must be positive, got {job.budget_ms} ms")
    data = load_data(meta, job.dataset, net.input_shape[1:])
    out = Path(job.out)
    if out.resolve() == Path(job.model).resolve():
        raise PruneError("--out must differ from --model: the original model is kept unchanged")
    if (out / "model.json").exists() and not (out / "search.pt").exists():
        raise PruneError(
            f"{out} already holds a model directory that `prune` did not write; choose another "
            "--out (nothing was changed)"
        )
    out.mkdir(parents=True, exist_ok=True)
    lat = open_latency_model(
        meta,
        target,
        db=job.db,
        latency_model=job.latency_model,
        missing=job.missing,
        trials=job.trials,
    )
    from codesign.latency.measured import latency_counts, measuring

    budget_ms = job.budget_ms
    if job.measure_uncertain > 0:  # the floor below is priced as every candidate will be
        lat = measuring(
            lat, budget_ms=budget_ms, max_measurements=job.measure_uncertain, protocol=job.protocol
        )
    if job.raise_budget_to_floor:
        floor_ms, _ = reachable_ms(net, data, lat, config)
        budget_ms = max(budget_ms, floor_ms)
        if job.measure_uncertain > 0:
            lat = measuring(lat, budget_ms=budget_ms)
    env = AMCEnv(net, data, lat, budget_ms, config)
    latency_id = f"{lat.target_key}|{lat.mode}|{lat.digest}|{lat.form}|{job.missing}"
    secs = {"setup": time.time() - t0}
    result = amc_search(env, config, out=out, latency_id=latency_id, progress=progress)
    secs["search"] = result.seconds
    t1 = time.time()
    policy = result.policy
    pruned, _ = finalize(net, policy, config, data)
    acc_before = evaluate(pruned, data)
    history = fine_tune(pruned, data, finetune, out, policy, progress)
    acc = evaluate(pruned, data)
    base_acc = evaluate(net, data)
    secs["finetune"] = time.time() - t1
    t1 = time.time()
    st = structure(net.specs, prune_outputs=config.prune_outputs)
    record: dict[str, Any] = {
        "policy": policy.encode(),
        "ratios": dict(policy.ratios),
        "channels": policy.counts(st),
        "prune_outputs": config.prune_outputs,
        "budget_ms": budget_ms,
        "budget_asked_ms": job.budget_ms,
        "target": target.key,
        "lut_mode": lat.mode,
        "missing": job.missing,
        "predicted_ms": lat.predict_blocks(pruned.specs),
        "base_predicted_ms": env.base_ms,
        "latency_counts": latency_counts(lat),  # measured instead of predicted (or None)
        "base_blocks": [s.key for s in net.specs],
        "episodes": len(result.history),
        "best_episode": result.best["episode"],
        "search_acc": result.best["acc"],
        "acc_before_finetune": acc_before,
        "base_acc": base_acc,
        "acc": acc,
        "finetune": finetune.to_dict(),
        "search": config.to_dict(),
    }
    if job.measure and target.is_remote:
        raise PruneError(
            f"{target.key} is reached over RPC; `prune` times networks on this machine only. "
            "Pass --no-measure (the artifact is still compiled and checked on a host build)."
        )
    if job.measure:
        from codesign.latency.networks import compile_like_lut
        from codesign.tvm_backend.runner import LocalRunner, measure_in_passes

        base_built, pruned_built = (
            compile_like_lut(n, target, db=lat.db, mode=lat.mode, trials=lat.trials, label=name)
            for n, name in ((net, "base"), (pruned, "pruned"))
        )
        m_base, m_pruned = measure_in_passes(
            LocalRunner(seed=config.seed), [base_built, pruned_built], job.protocol
        )
        for m in (m_base, m_pruned):
            if not m.ok:
                raise PruneError(f"measuring on {target.key} failed: {m.error}")
        record.update(
            base_measured_ms=m_base.median_ms,
            measured_ms=m_pruned.median_ms,
            speedup=m_base.median_ms / m_pruned.median_ms,
        )
    policies = {**meta.policies, "pruning": record}
    save_model(
        out,
        pruned,
        ModelDir(
            blocks=pruned.specs,
            arch=None,  # the pruned shapes are no architecture of the space; `blocks` define it
            space=meta.space,
            dataset=data.info,
            accuracy=acc,
            policies=policies,
            extra={
                **meta.extra,
                "pruned_from": str(Path(job.model).resolve()),
                "pruned_from_arch": meta.arch,
            },
        ),
    )
    (out / ARTIFACT).unlink(missing_ok=True)  # an earlier run's archive has other weights
    if job.artifact:
        art = ship(out, target, lat, job, config.seed, progress).manifest.data
        record["artifact"] = {
            "path": ARTIFACT,
            "max_abs_err": art["equality"]["max_abs_err"],
            "latency_ms": (art["latency"] or {}).get("median_ms"),
            "accuracy": (art["accuracy"] or {}).get("top1"),
        }
    secs["compile_measure"] = time.time() - t1
    report = {
        **record,
        "finetune_history": history,
        "seconds": {**secs, "total": time.time() - t0},
        "resumed_from_episode": result.resumed_from,
    }
    (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
