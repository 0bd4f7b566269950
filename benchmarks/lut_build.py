"""Cost of building a latency table on x86, and what tuning buys.

    python benchmarks/lut_build.py --quick            # tiny space, 8 trials/task (minutes)
    python benchmarks/lut_build.py                    # proxyless space, 32 trials/task (long)

Builds the LUT untuned, then tuned with a per-task trial budget, into a fresh SQLite file (or
`--db`, which resumes an interrupted run), and reports: entries, unique tuning tasks vs tasks in
all blocks, seconds per phase, the per-block tuned/untuned speedup, and for one representative
block TVM tuned vs TVM untuned vs PyTorch eager (same threads) measured interleaved in this run.
Writes benchmarks/results/lut_build.json (lut_build_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, torch_eager_ms, write_result  # noqa: E402

from codesign.lut import LatencyTable  # noqa: E402
from codesign.lut_build import build_lut  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.search.space import get_space  # noqa: E402
from codesign.targets import parse_target  # noqa: E402

REPRESENTATIVE = {"proxyless": "mb_k3_e6_i40_o40_s1_h28_w28", "tiny": "mb_k3_e6_i24_o24_s1_h7_w7"}


def representative(space, target, db: Path, key: str, rounds: int) -> dict:
    """TVM tuned vs untuned vs PyTorch eager on one block, interleaved rounds, medians."""
    import torch

    from codesign.blocks import BlockSpec
    from codesign.modules import build_block, fold_bn, init_weights
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.database import open_tuning_database
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import LocalRunner

    spec = BlockSpec.from_key(key)
    low = lower_block(spec)
    untuned = compile_module(low, target)
    tuned = compile_module(low, target, open_tuning_database(db, target.key))
    module = fold_bn(init_weights(build_block(spec)))
    x = torch.randn(spec.input_shape)
    runner, proto = LocalRunner(), MeasureProtocol(repeat=10, min_repeat_ms=100)
    rows = {"tvm_tuned_ms": [], "tvm_untuned_ms": [], "torch_eager_ms": []}
    for _ in range(rounds):
        rows["tvm_tuned_ms"].append(runner.run(tuned, proto).median_ms)
        rows["tvm_untuned_ms"].append(runner.run(untuned, proto).median_ms)
        rows["torch_eager_ms"].append(torch_eager_ms(module, x, threads=target.threads))
    out = {"block": key, "threads": target.threads, "rounds": rounds}
    out.update({k: round(statistics.median(v), 5) for k, v in rows.items()})
    out["tuned_speedup_vs_untuned"] = round(out["tvm_untuned_ms"] / out["tvm_tuned_ms"], 3)
    out["tuned_speedup_vs_torch"] = round(out["torch_eager_ms"] / out["tvm_tuned_ms"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny space, 8 trials per task")
    ap.add_argument("--space", default=None)
    ap.add_argument("--trials", type=int, default=None, help="trials per unique task")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--db", default=None, help="LUT file (default: a fresh temporary file)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the block")
    args = ap.parse_args()
    space = get_space(args.space or ("tiny" if args.quick else "proxyless"))
    trials = args.trials or (8 if args.quick else 32)
    target = parse_target(args.target)
    tmp = tempfile.TemporaryDirectory(prefix="codesign-bench-")
    db = Path(args.db) if args.db else Path(tmp.name) / "lut.sqlite"
    info = machine()
    print(f"LUT for {space.name} ({len(space.blocks())} blocks) on {target.key} -> {db}")

    t0 = time.time()
    untuned = build_lut(space, target, db)
    t1 = time.time()
    tuned = build_lut(space, target, db, trials=trials)
    t2 = time.time()

    with LatencyTable(db) as lut:
        u, t = lut.latencies(target.key, "untuned"), lut.latencies(target.key, "tuned")
    speedups = {k: u[k] / t[k] for k in u if k in t and t[k] > 0}
    ratios = sorted(speedups.values())
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else float("nan")
    key = REPRESENTATIVE.get(space.name, space.layers()[1].block("k3e6").key)
    rep = representative(space, target, db, key, args.rounds)

    result = {
        "space": space.name,
        "target": target.key,
        "target_json": target.tvm_json,
        "machine": info,
        "entries": len(space.blocks()),
        "untuned": {
            "seconds": round(t1 - t0, 1),
            "measured": untuned.measured,
            "reused": untuned.reused,
            "failed": len(untuned.failed),
            "lut_sum_all_blocks_ms": round(sum(u.values()), 4),
        },
        "tuned": {
            "seconds": round(t2 - t1, 1),
            "trials_per_task": trials,
            "tasks_in_all_blocks": tuned.total_tasks,
            "unique_tasks": tuned.unique_tasks,
            "tasks_tuned_this_run": tuned.tuned_tasks,
            "measured": tuned.measured,
            "reused": tuned.reused,
            "failed": len(tuned.failed),
            "phase_seconds": {k: round(v, 1) for k, v in tuned.seconds.items()},
            "lut_sum_all_blocks_ms": round(sum(t.values()), 4),
        },
        "speedup_tuned_over_untuned": {
            "geomean": round(geo, 3),
            "median": round(statistics.median(ratios), 3),
            "min": round(ratios[0], 3),
            "max": round(ratios[-1], 3),
            "slower_after_tuning": sum(r < 1 for r in ratios),
            "per_block": {k: round(v, 3) for k, v in sorted(speedups.items())},
        },
        "representative_block": rep,
    }
    write_result("lut_build_quick" if args.quick else "lut_build", result)
    print(
        f"untuned: {result['untuned']['seconds']} s; tuned ({trials} trials x "
        f"{tuned.unique_tasks} unique tasks of {tuned.total_tasks}): "
        f"{result['tuned']['seconds']} s; per-block speedup geomean {geo:.2f}x"
    )
    print(
        f"{key}: tuned {rep['tvm_tuned_ms']} ms, untuned {rep['tvm_untuned_ms']} ms, "
        f"torch eager {rep['torch_eager_ms']} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
