"""AMC channel pruning under a latency budget vs uniform pruning to the same budget, on x86.

    python benchmarks/amc.py --quick     # short training, 12 episodes, predicted new shapes
                                         # (about 3 minutes on 2 cores once the LUT exists)
    python benchmarks/amc.py             # 300 episodes, new block shapes measured into the LUT
                                         # (estimated 45-60 minutes on 2 cores, LUT included)

Base model: a `tiny`-space network trained on mnist5k (cached in out/bench/amc/base). For each
budget (a fraction of the base network's predicted latency), AMC searches a policy whose
predicted latency fits, prunes and fine-tunes it; uniform pruning takes the largest single
ratio that fits the same budget and gets the same fine-tuning. The base, AMC and uniform
networks are compiled with the LUT's recipe and timed side by side in interleaved rounds.
Writes benchmarks/results/amc.json (amc_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

from codesign.compression.amc.env import AMCConfig, AMCEnv  # noqa: E402
from codesign.compression.amc.pipeline import (  # noqa: E402
    PruneJob,
    finalize,
    fine_tune,
    open_latency_model,
    prune_model,
)
from codesign.compression.ddpg import DDPGConfig  # noqa: E402
from codesign.data import load_dataset  # noqa: E402
from codesign.latency.networks import compile_like_lut  # noqa: E402
from codesign.lut_build import build_lut  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.model_dir import ModelDir, load_model, save_model  # noqa: E402
from codesign.modules import build_network  # noqa: E402
from codesign.search.space import get_space  # noqa: E402
from codesign.targets import parse_target  # noqa: E402
from codesign.train import TrainConfig, evaluate, train  # noqa: E402

ARCH = "k3e6-k3e6_k5e6-k5e6_k3e6-k3e6"


def base_model(out: Path, epochs: int, seed: int) -> Path:
    """Train (or reuse) the base network: tiny space, mnist5k."""
    path = out / f"base_e{epochs}_s{seed}"
    if (path / "model.json").exists():
        return path
    space = get_space("tiny")
    arch = space.decode(ARCH)
    net = build_network(space, arch, seed=seed)
    data = load_dataset("mnist5k", space.input_shape)
    cfg = TrainConfig(epochs=epochs, lr=0.05, seed=seed)
    train(net, data, cfg, checkpoint=out / f"base_e{epochs}_s{seed}.pt", desc="train base")
    meta = ModelDir(
        blocks=net.specs,
        arch=arch.encode(),
        space=space.name,
        dataset=data.info,
        accuracy=evaluate(net, data),
        extra={"train": cfg.to_dict()},
    )
    return save_model(path, net, meta)


def timed_side_by_side(builds: dict, rounds: int, protocol: MeasureProtocol) -> dict:
    from codesign.tvm_backend.runner import LocalRunner

    runner = LocalRunner()
    samples: dict[str, list[float]] = {k: [] for k in builds}
    for _ in range(rounds):
        for name, built in builds.items():
            m = runner.run(built, protocol)
            if not m.ok:
                raise RuntimeError(f"measuring {name} failed: {m.error}")
            samples[name].append(m.median_ms)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budgets", default=None, help="fractions of the base latency, e.g. 0.6,0.45")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--db", default=None, help="tiny-space LUT (default: out/bench/tiny.sqlite)")
    ap.add_argument("--missing", choices=("measure", "predict"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # small forward passes; TVM timing uses its own thread pool
    quick = args.quick
    fractions = [float(f) for f in (args.budgets or "0.6,0.45").split(",")]
    episodes = args.episodes or (12 if quick else 300)
    missing = args.missing or ("predict" if quick else "measure")
    target = parse_target("x86")
    db = Path(args.db or "out/bench/tiny.sqlite")
    out = Path("out/bench/amc_quick" if quick else "out/bench/amc")
    out.mkdir(parents=True, exist_ok=True)
    protocol = MeasureProtocol()
    info = machine()
    t0 = time.time()
    build_lut("tiny", target, db, protocol=protocol)  # resumes; nothing to do if complete
    base_dir = base_model(out, epochs=3 if quick else 15, seed=args.seed)
    net, meta = load_model(base_dir)
    data = load_dataset("mnist5k", meta.dataset.input_shape, seed=meta.dataset.seed)
    base_acc = evaluate(net, data)
    lat = open_latency_model(meta, target, db=db, latency_model=None, missing=missing)
    base_pred = lat.predict_blocks(net.specs)
    config = AMCConfig(
        episodes=episodes,
        divisor=8,
        seed=args.seed,
        ddpg=DDPGConfig(warmup_episodes=6 if quick else 30, seed=args.seed),
    )
    finetune = TrainConfig(epochs=1 if quick else 8, lr=0.01, seed=args.seed)
    t_prep = time.time() - t0

    like_lut = partial(compile_like_lut, target=target, db=lat.db, mode=lat.mode, trials=lat.trials)
    rows, builds = [], {"base": like_lut(net)}
    for i, frac in enumerate(fractions):
        budget = frac * base_pred
        ta = time.time()
        job = PruneJob(
            model=str(base_dir),
            target=f"{target.spec}:threads={target.threads}",  # the resolved target
            budget_ms=budget,
            dataset="mnist5k",
            out=str(out / f"amc_b{i}"),
            db=str(db),
            missing=missing,
            measure=False,  # timed below, side by side with the others
            artifact=False,
        )
        amc = prune_model(job, config, finetune)
        amc_net, _ = load_model(job.out)
        ta = time.time() - ta
        tu = time.time()
        env = AMCEnv(net, data, lat, budget, replace(config, episodes=0))
        uni_policy, uni_ratio = env.uniform_policy()
        uni_net, _ = finalize(net, uni_policy, config, data)
        uni_dir = out / f"uniform_b{i}"
        uni_dir.mkdir(exist_ok=True)
        fine_tune(uni_net, data, finetune, uni_dir, uni_policy, progress=True)
        tu = time.time() - tu
        builds[f"amc{i}"] = like_lut(amc_net)
        builds[f"uniform{i}"] = like_lut(uni_net)
        rows.append(
            {
                "fraction": frac,
                "budget_ms": budget,
                "policy": amc["policy"],
                "amc_predicted_ms": amc["predicted_ms"],
                "amc_acc": evaluate(amc_net, data),
                "amc_acc_before_finetune": amc["acc_before_finetune"],
                "uniform_policy": uni_policy.encode(),
                "uniform_ratio": uni_ratio,
                "uniform_predicted_ms": lat.predict_blocks(uni_net.specs),
                "uniform_acc": evaluate(uni_net, data),
                "episodes": amc["episodes"],
                "best_episode": amc["best_episode"],
                "seconds": {"amc": round(ta, 1), "uniform": round(tu, 1)},
            }
        )
    t_measure = time.time()
    ms = timed_side_by_side(builds, args.rounds, protocol)
    t_measure = time.time() - t_measure
    for i, row in enumerate(rows):
        row["amc_ms"], row["uniform_ms"] = ms[f"amc{i}"], ms[f"uniform{i}"]
        row["speedup"] = ms["base"] / row["amc_ms"]
        row["uniform_speedup"] = ms["base"] / row["uniform_ms"]
        row["acc_drop"] = base_acc - row["amc_acc"]
        row["uniform_acc_drop"] = base_acc - row["uniform_acc"]
    head = rows[0]
    result = {
        "base_ms": ms["base"],
        "base_acc": base_acc,
        "amc_ms": head["amc_ms"],
        "amc_acc": head["amc_acc"],
        "uniform_ms": head["uniform_ms"],
        "uniform_acc": head["uniform_acc"],
        "speedup": head["speedup"],
        "acc_drop": head["acc_drop"],
        "policy": head["policy"],
        "budgets": rows,
        "base_predicted_ms": base_pred,
        "base_arch": f"tiny:{ARCH}",
        "dataset": "mnist5k",
        "val_images": data.info.n_val,
        "target": target.key,
        "lut_mode": lat.mode,
        "missing": missing,
        "search": config.to_dict(),
        "finetune": finetune.to_dict(),
        "protocol": protocol.to_dict(),
        "timing_rounds": args.rounds,
        "seconds": {
            "prepare": round(t_prep, 1),
            "measure": round(t_measure, 1),
            "total": round(time.time() - t0, 1),
        },
        "machine": info,
    }
    write_result("amc_quick" if quick else "amc", result)
    print(f"base: {ms['base']:.4f} ms, {base_acc:.2f}%")
    for r in rows:
        print(
            f"budget {r['fraction']:.2f} x base ({r['budget_ms']:.4f} ms predicted): "
            f"AMC {r['amc_ms']:.4f} ms ({r['speedup']:.2f}x) {r['amc_acc']:.2f}% | uniform "
            f"{r['uniform_ms']:.4f} ms ({r['uniform_speedup']:.2f}x) {r['uniform_acc']:.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
