"""HAQ end to end: model directory -> per-precision LUT -> DDPG search -> QAT -> integer TVM
module, compiled, measured and checked against its PyTorch fake-quant reference.

    out/lut.sqlite      block latencies at every precision on the target's menu (keys ..._int8),
                        and the MetaSchedule records they were tuned with (the final module
                        is compiled with the same records)
    out/search.pt       the search checkpoint (re-running the same command resumes)
    out/policy.json     the chosen QuantPolicy
    out/model/          the quantised network as a model directory (blocks with their
                        precisions, the policy, activation ranges, the fine-tuned fake-quant
                        weights): `codesign compile --model out/model` recompiles it
    out/model.tar       the verified artifact (`codesign.artifact`): the compiled mixed-precision
                        library checked against its PyTorch fake-quant twin, with accuracy and
                        latency measured on the target; loads with the plain TVM runtime
    out/result.json     accuracy (fake-quant and compiled), measured latency, size, LUT cost
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.blocks import BlockSpec
from codesign.compression.ddpg import DDPGConfig
from codesign.compression.quant.policy import QuantPolicy
from codesign.compression.quant.qat import QATConfig
from codesign.errors import CodesignError
from codesign.measurement import MeasureProtocol
from codesign.targets import Target, parse_target
from codesign.tvm_backend.precision import PrecisionMenu


class LUTMissingError(CodesignError):
    """A block at some precision has no valid LUT entry."""


def lut_latency(
    db: str | Path, target: Target, mode: str
) -> Callable[[Sequence[BlockSpec]], float]:
    """Latency (ms) of a block list as the sum of its LUT entries (precision in the key)."""
    from codesign.lut import LatencyTable

    table = LatencyTable(db, readonly=True)
    cache: dict[str, float] = {}

    def block_ms(b: BlockSpec) -> float:
        if b.key not in cache:
            e = table.get(target.key, b, mode)
            if e is None or not e.ok:
                raise LUTMissingError(
                    f"{db}: no valid {mode} entry for {b.key} on {target.key}; build it with "
                    "build_lut(..., precisions=menu.precisions) (the quantize command does)"
                )
            cache[b.key] = e.median_ms
        return cache[b.key]

    return lambda blocks: float(sum(block_ms(b) for b in blocks))


def precision_lut(
    blocks: Sequence[BlockSpec],
    target: Target,
    db: str | Path,
    menu: PrecisionMenu,
    *,
    trials: int,
    protocol: MeasureProtocol | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Callable[[Sequence[BlockSpec]], float]:
    """Measure (or reuse) every block at every precision of the menu; return the latency fn."""
    from codesign.lut_build import build_lut

    fp = tuple(b.with_precision("fp32") for b in blocks)
    build_lut(
        None, target, db, trials=trials, blocks=fp, precisions=menu.precisions,
        protocol=protocol, seed=seed, progress=progress,
    )  # fmt: skip
    return lut_latency(db, target, "tuned" if trials > 0 else "untuned")


def compile_policy(
    qnet: Any,
    policy: QuantPolicy,
    menu: PrecisionMenu,
    target: Target,
    db: str | Path | None,
    *,
    trials: int = 0,
    seed: int = 0,
) -> Any:
    """The compiled TVM module of a fake-quant network at `policy` (records from `db`).

    With `trials`, tasks the LUT's records lack are tuned first with that budget: where blocks
    of different precisions meet, FuseOps can merge one block's output conversion with the
    next block's input conversion into a task no single block has."""
    from codesign.compression.quant.fakequant import export_params
    from codesign.tvm_backend.build import compile_module, prepare
    from codesign.tvm_backend.quantize import lower_quantized

    database = None
    if db is not None:
        from codesign.tvm_backend.database import open_tuning_database

        database = open_tuning_database(db, target.key)
    blocks = policy.apply(qnet.specs)
    low = lower_quantized(blocks, export_params(qnet), menu, label=policy.encode()[:60])
    fused = prepare(low.mod)
    if database is not None and trials > 0:
        from codesign.tvm_backend.tuning import tune_missing

        tune_missing(fused, target, database, trials=trials, seed=seed, label="policy")
    return compile_module(low, target, database, fused=fused)


def compiled_accuracy(built: Any, data: Any, limit: int) -> tuple[float, float]:
    """(top-1 % of the compiled module, images) on the first `limit` validation images, one
    image per call (the module's input shape)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    params = [tvm.runtime.tensor(p) for p in built.params]
    correct = total = 0
    for x, y in data.batches("val", 64, limit=limit):
        for i in range(len(y)):
            out = vm["main"](tvm.runtime.tensor(x[i : i + 1].numpy()), *params).numpy()
            correct += int(np.argmax(out) == int(y[i]))
            total += 1
    return 100.0 * correct / max(total, 1), float(total)


def measure_built(built: Any, protocol: MeasureProtocol, seed: int = 0) -> float:
    """Median ms of the compiled quantized network on this machine: the runner the LUT is
    measured with, measured again while unsteady like the LUT's blocks."""
    from codesign.tvm_backend.runner import Where, run_steady

    m = run_steady(Where.local().runner(seed=seed), built, protocol)
    if not m.ok:
        raise CodesignError(f"measuring {built.label} failed: {m.error}")
    return m.median_ms


@dataclass(frozen=True, slots=True)
class QuantizeConfig:
    budget_kind: str  # latency | size
    budget: float
    episodes: int = 60
    trials: int = 0  # MetaSchedule trials per task for the LUT and the final module
    seed: int = 0
    calib_images: int = 256
    val_images: int = 500
    search_qat: QATConfig = field(default_factory=lambda: QATConfig(images=1000))
    final_qat: QATConfig = field(default_factory=lambda: QATConfig(images=4000, epochs=2))
    ddpg: DDPGConfig = field(default_factory=lambda: DDPGConfig(warmup_episodes=20))
    protocol: MeasureProtocol = field(default_factory=MeasureProtocol)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ddpg"] = self.ddpg.to_dict()
        return d


@dataclass
class Prepared:
    """What every HAQ run on one model and target needs (built once, shared by budgets)."""

    net: Any
    data: Any
    ranges: list[Any]
    target: Target
    menu: PrecisionMenu
    db: Path
    latency: Callable[[Sequence[BlockSpec]], float]
    trials: int = 0  # the LUT's budget, also for tasks only whole networks have
    seed: int = 0


def prepare(
    net: Any,
    data: Any,
    target: str | Target,
    db: str | Path,
    cfg: QuantizeConfig,
    *,
    progress: bool = True,
) -> Prepared:
    from codesign.compression.quant.fakequant import calibrate
    from codesign.tvm_backend.precision import precision_menu

    target = parse_target(target)
    menu = precision_menu(target)
    ranges = calibrate(net.eval(), [data.calibration(cfg.calib_images, cfg.seed)])
    latency = precision_lut(
        net.specs, target, db, menu, trials=cfg.trials, protocol=cfg.protocol, seed=cfg.seed,
        progress=progress,
    )  # fmt: skip
    return Prepared(net, data, ranges, target, menu, Path(db), latency, cfg.trials, cfg.seed)


def evaluate_policy(
    prep: Prepared,
    policy: QuantPolicy,
    qat: QATConfig,
    val_images: int,
    protocol: MeasureProtocol,
    *,
    against_float: bool = False,
) -> dict[str, Any]:
    """Fine-tune the fake-quant network at `policy`, compile it, measure accuracy and latency.
    With `against_float`, the float network is compiled too, measured in alternating passes
    with it (`float_ms`) and scored on the same images (`float_acc`): a ship decision then
    compares like with like."""
    from codesign.compression.quant.fakequant import quantize_network
    from codesign.compression.quant.qat import finetune
    from codesign.train import evaluate

    qnet = quantize_network(prep.net, prep.ranges, policy)
    if any(lb.w <= 8 or lb.a <= 8 for lb in policy.layers):
        finetune(qnet, prep.data, qat)
    qnet.eval()
    built = compile_policy(
        qnet, policy, prep.menu, prep.target, prep.db, trials=prep.trials, seed=prep.seed
    )
    acc_tvm, n = compiled_accuracy(built, prep.data, val_images)
    timed: dict[str, float]  # ms, and float_ms with against_float
    if against_float:
        from codesign.latency.networks import compile_like_lut
        from codesign.tvm_backend.runner import LocalRunner, measure_in_passes

        mode = "tuned" if prep.trials > 0 else "untuned"  # as the precision LUT (lut_latency)
        fp32 = compile_like_lut(prep.net, prep.target, db=prep.db, mode=mode,
                                trials=prep.trials, label="float", seed=prep.seed)  # fmt: skip
        pair = measure_in_passes(LocalRunner(seed=prep.seed), [built, fp32], protocol)
        for m in pair:
            if not m.ok:
                raise CodesignError(f"measuring {built.label} against float failed: {m.error}")
        timed = {"ms": pair[0].median_ms, "float_ms": pair[1].median_ms}
        timed["float_acc"] = compiled_accuracy(fp32, prep.data, val_images)[0]  # same images
    else:
        timed = {"ms": measure_built(built, protocol)}
    return {
        "policy": policy.encode(),
        "precisions": {p: policy.precisions.count(p) for p in set(policy.precisions)},
        "acc_fakequant": evaluate(qnet, prep.data, limit=val_images),
        "acc": acc_tvm,
        "val_images": int(n),
        **timed,
        "lut_ms": prep.latency(policy.apply(prep.net.specs)),
        "size_mb": policy.size_mb(prep.net.specs),
        "qnet": qnet,
        "built": built,
    }


def run_haq(
    prep: Prepared,
    cfg: QuantizeConfig,
    checkpoint: str | Path | None,
    *,
    progress: bool = True,
) -> tuple[QuantPolicy, dict[str, Any]]:
    """The DDPG search at one budget; returns the best policy and the search summary."""
    from codesign.compression.haq.env import HAQConfig, HAQEnv
    from codesign.compression.haq.search import haq_search

    hc = HAQConfig(cfg.budget_kind, cfg.budget, qat=cfg.search_qat, val_images=cfg.val_images)
    env = HAQEnv(prep.net, prep.data, prep.ranges, prep.menu, prep.latency, hc)
    res = haq_search(env, cfg.episodes, cfg.ddpg, checkpoint=checkpoint, progress=progress)
    summary = {
        "budget_kind": cfg.budget_kind,
        "budget": cfg.budget,
        "unit": env.unit,
        "episodes": cfg.episodes,
        "resumed_from": res.resumed_from,
        "float_accuracy_search": env.float_accuracy,
        "best": res.best.to_dict(),
        "history": res.history,
    }
    return res.best.policy, summary


def search_and_save(
    prep: Prepared,
    cfg: QuantizeConfig,
    *,
    checkpoint: Path,
    dest: Path,
    meta: Any,
    source: str | Path,
    progress: bool = True,
) -> tuple[QuantPolicy, dict[str, Any], dict[str, Any]]:
    """HAQ's search (resumable from `checkpoint`), the final QAT and evaluation of the policy
    found, and the quantised model saved to `dest`: (policy, search summary, evaluation)."""
    from codesign.compression.quant.saved import save_quantized_model

    policy, summary = run_haq(prep, cfg, checkpoint, progress=progress)
    res = evaluate_policy(
        prep, policy, cfg.final_qat, cfg.val_images, cfg.protocol, against_float=True
    )
    qnet, _built = res.pop("qnet"), res.pop("built")
    save_quantized_model(
        dest,
        qnet,
        policy,
        prep.ranges,
        meta,
        accuracy=res["acc"],
        extra={"quantize": {"from": str(source), "target": prep.target.key}},
    )
    return policy, summary, res


def quantize_model(
    model_dir: str | Path,
    out: str | Path,
    target: str | Target,
    dataset: str,
    cfg: QuantizeConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The `codesign quantize` command (see module docstring)."""
    from codesign.artifact import CompileOptions, compile_artifact
    from codesign.data import load_dataset
    from codesign.model_dir import load_model

    net, meta = load_model(model_dir)
    if meta.quantized:
        raise CodesignError(f"{model_dir} is already quantised; give the float model directory")
    data = load_dataset(dataset, net.input_shape[1:], seed=cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(net, data, target, out / "lut.sqlite", cfg, progress=progress)
    policy, summary, res = search_and_save(
        prep, cfg, checkpoint=out / "search.pt", dest=out / "model", meta=meta,
        source=model_dir, progress=progress,
    )  # fmt: skip
    (out / "policy.json").write_text(json.dumps(policy.to_dict(), indent=2) + "\n")
    report = compile_artifact(
        out / "model",
        prep.target,
        out / "model.tar",
        CompileOptions(
            tune_trials=cfg.trials,
            tuning_db=prep.db if cfg.trials > 0 else None,
            protocol=cfg.protocol,
            val_limit=cfg.val_images,
            seed=cfg.seed,
            progress=progress,
        ),
    )
    manifest = report.artifact.manifest.data
    result = {
        "target": prep.target.key,
        "menu": prep.menu.to_dict(),
        "config": cfg.to_dict(),
        **res,
        "artifact": {
            "path": str(report.path),
            "ms": manifest["latency"]["median_ms"] if manifest.get("latency") else None,
            "acc": manifest["accuracy"]["top1"] if manifest.get("accuracy") else None,
            "equality": manifest["equality"],
        },
        "search": {k: v for k, v in summary.items() if k != "history"},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(summary["history"], indent=2) + "\n")
    return result
