"""HAQ on x86: fp32 vs uniform int8 vs HAQ policies at two budgets, all measured as compiled
TVM modules (accuracy of the compiled module on validation images, latency by TVM's evaluator).

    python benchmarks/haq.py --quick     # tiny net on digits, untuned LUT, 6 episodes/budget
    python benchmarks/haq.py             # tiny-w4 net on mnist5k, tuned LUT (64 trials/task),
                                         # 120 episodes/budget
    python benchmarks/haq.py --trials 24 --episodes 40      # what benchmarks/results/haq.json ran

Also reports int8 vs fp32 latency per block from the per-precision LUT. The budget kind follows
the measurements: latency budgets (halfway and a fifth of the way from the cheapest reachable
LUT latency to fp32's, and the cheapest itself) when some precision runs some block faster than
fp32 on this target, otherwise a size budget, since then no latency budget below fp32 is
reachable with the target's honest precision menu. Writes benchmarks/results/haq.json
(haq_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_result  # noqa: E402

from codesign.compression.ddpg import DDPGConfig  # noqa: E402
from codesign.compression.haq.pipeline import (  # noqa: E402
    QuantizeConfig,
    evaluate_policy,
    prepare,
    run_haq,
)
from codesign.compression.quant.policy import QuantPolicy  # noqa: E402
from codesign.compression.quant.qat import QATConfig  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402


def baseline(quick: bool, work: Path, model: str | None, dataset: str, space_name: str):
    from codesign.data import load_dataset
    from codesign.model_dir import ModelDir, load_model, save_model
    from codesign.modules import build_network
    from codesign.search.space import get_space
    from codesign.train import TrainConfig, evaluate, train

    if model:
        net, _ = load_model(model)
        return net, load_dataset(dataset, tuple(net.input_shape[1:]))
    space = get_space(space_name)
    arch = space.uniform("k3e6")
    data = load_dataset(dataset, space.input_shape)
    path = work / "baseline"
    if (path / "model.json").exists():
        net, _ = load_model(path)
        return net, data
    net = build_network(space, arch, seed=0)
    cfg = TrainConfig(epochs=3 if quick else 8)
    train(net, data, cfg, checkpoint=work / "baseline_train.pt", desc="baseline")
    acc = evaluate(net, data)
    save_model(path, net, ModelDir(net.specs, arch.encode(), space.name, data.info, acc))
    return net, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="model directory (default: tiny k3e6 baseline)")
    ap.add_argument(
        "--space",
        default=None,
        help="space of the uniform k3e6 baseline (default: tiny with --quick, else tiny-w4: 4x "
        "the widths, where precision pays off; tiny's blocks run in 10-30 us, overhead-bound)",
    )
    ap.add_argument("--name", default=None, help="result file name (default haq / haq_quick)")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument(
        "--work",
        default=None,
        help="work dir: LUT, baseline, checkpoints (default out/haq[_quick]; re-run resumes)",
    )
    args = ap.parse_args()
    quick = args.quick
    dataset = args.dataset or ("digits" if quick else "mnist5k")
    episodes = args.episodes or (6 if quick else 120)
    trials = args.trials if args.trials is not None else (0 if quick else 64)
    space_name = args.space or ("tiny" if quick else "tiny-w4")
    default_work = "haq_quick" if quick else f"haq_{'model' if args.model else space_name}"
    work = Path(args.work or RESULTS.parents[1] / "out" / default_work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    info = machine()

    net, data = baseline(quick, work, args.model, dataset, space_name)
    protocol = MeasureProtocol.quick() if quick else MeasureProtocol()
    val = 300 if quick else 1000
    cfg = QuantizeConfig(
        "size",
        1.0,
        episodes=episodes,
        trials=trials,
        val_images=val,
        search_qat=QATConfig(images=256 if quick else 1000),
        final_qat=QATConfig(images=1000 if quick else 4000, epochs=1 if quick else 2),
        ddpg=DDPGConfig(warmup_episodes=3 if quick else 30),
        protocol=protocol,
    )
    prep = prepare(net, data, "x86", work / "lut.sqlite", cfg)
    blocks = net.specs
    per_block = []
    for b in blocks:
        row = {"block": b.key}
        for p in prep.menu.precisions:
            row[f"{p}_ms"] = round(prep.latency([b.with_precision(p)]), 5)
        if "int8_ms" in row:
            row["int8_speedup"] = round(row["fp32_ms"] / row["int8_ms"], 3)
        per_block.append(row)
        print(row)
    fp_pol = QuantPolicy.uniform(blocks, 32, 32, prep.menu)
    # uniform int8: the widest exact integer bits on this kernel (8x8 on VNNI, 7x8 on AVX2)
    w8 = 8 if prep.menu.int8_exact(8, 8) else 7
    i8_pol = QuantPolicy.uniform(blocks, w8, 8, prep.menu)
    fp = evaluate_policy(prep, fp_pol, cfg.final_qat, val, protocol)
    i8 = evaluate_policy(prep, i8_pol, cfg.final_qat, val, protocol)
    for r in (fp, i8):
        r.pop("qnet"), r.pop("built")
        print({k: r[k] for k in ("acc", "ms", "lut_ms", "size_mb")})

    fp_lut = prep.latency(blocks)
    best_lut = sum(
        min(prep.latency([b.with_precision(p)]) for p in prep.menu.precisions) for b in blocks
    )
    if best_lut < 0.95 * fp_lut:
        kind, unit = "latency", "ms"
        # halfway, a fifth of the way, and the cheapest reachable latency (every block at its
        # fastest measured precision: on an int8-fast CPU that is about uniform int8's latency)
        budgets = [best_lut + f * (fp_lut - best_lut) for f in (0.5, 0.2)]
        budgets.append(best_lut * (1 + 1e-6))
    else:
        kind, unit = "size", "MiB"
        budgets = [f * fp["size_mb"] for f in (0.25, 0.15)]
    runs = []
    for i, budget in enumerate(budgets):
        c = QuantizeConfig(
            kind, budget, cfg.episodes, cfg.trials, cfg.seed, cfg.calib_images, val,
            cfg.search_qat, cfg.final_qat, cfg.ddpg, protocol,
        )  # fmt: skip
        policy, summary = run_haq(prep, c, work / f"search_{kind}_{i}.pt")
        r = evaluate_policy(prep, policy, cfg.final_qat, val, protocol)
        r.pop("qnet"), r.pop("built")
        runs.append(
            {
                "kind": kind,
                "budget": round(budget, 5),
                "unit": unit,
                **r,
                "speedup_vs_fp32": round(fp["ms"] / r["ms"], 3),
                "search_best_reward": summary["best"]["reward"],
            }
        )
        print({k: runs[-1][k] for k in ("budget", "acc", "ms", "size_mb", "policy")})
    best = max(runs, key=lambda r: (r["acc"] >= fp["acc"] - 0.5, fp["ms"] / r["ms"]))
    result = {
        "quick": quick,
        "machine": info,
        "target": prep.target.key,
        "menu": prep.menu.to_dict(),
        "dataset": dataset,
        "space": None if args.model else space_name,
        "network": [b.key for b in blocks],
        "episodes": episodes,
        "trials_per_task": trials,
        "fp32_ms": fp["ms"],
        "fp32_acc": fp["acc"],
        "fp32_size_mb": fp["size_mb"],
        "int8_ms": i8["ms"],
        "int8_acc": i8["acc"],
        "int8_size_mb": i8["size_mb"],
        "int8_policy": i8["policy"],
        "haq_ms": best["ms"],
        "haq_acc": best["acc"],
        "haq_size_mb": best["size_mb"],
        "speedup_vs_fp32": best["speedup_vs_fp32"],
        "int8_speedup_vs_fp32": round(fp["ms"] / i8["ms"], 3),
        "policy": best["policy"],
        "budget_kind": kind,
        "budgets": runs,
        "per_block": per_block,
        "fp32": fp,
        "int8": i8,
        "seconds": round(time.time() - t_start, 1),
    }
    write_result(args.name or ("haq_quick" if quick else "haq"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
