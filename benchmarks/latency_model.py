"""Whole-network latency prediction on x86: LUT only vs linear-on-FLOPs vs LUT + XGBoost residual.

    python benchmarks/latency_model.py --quick     # tiny space, untuned LUT, 60 networks
    python benchmarks/latency_model.py             # proxyless space, tuned LUT, 160 networks
    python benchmarks/latency_model.py --adapt     # few-network models, adaptation, uncertainty
                                                   # (benchmarks/latency_adapt.py)

Builds (or resumes) the LUT, measures sampled whole networks with the same protocol, fits on a
seeded split, and reports RMSPE, MAPE and the share within +-5% / +-10% on held-out networks.
The noise floor is the spread of one network measured 5 times during the run.
Writes benchmarks/results/latency_model.json (latency_model_quick.json with --quick,
latency_model_untuned.json with --trials 0) and the predicted-vs-measured scatter plot next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_result  # noqa: E402

from codesign.latency.fit import fit_latency_model, held_out  # noqa: E402
from codesign.latency.networks import compile_network, measure_networks, sample_archs  # noqa: E402
from codesign.latency.plot import scatter  # noqa: E402
from codesign.lut_build import build_lut  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.modules import build_network  # noqa: E402
from codesign.search.space import get_space  # noqa: E402
from codesign.targets import parse_target  # noqa: E402


def noise_floor(space, target, db, arch, mode: str, protocol) -> dict:
    """One network measured again and again with the LUT's probe (`repeat_spread`: the same
    statistic as the LUT's recorded noise floor, (p90 - p10) / median of its medians)."""
    from codesign.tvm_backend.database import open_tuning_database
    from codesign.tvm_backend.runner import LocalRunner, repeat_spread

    database = open_tuning_database(db, target.key) if mode == "tuned" else None
    net = build_network(space, arch)
    built, _ = compile_network(net, target, label=arch.encode(), database=database)
    spread, samples = repeat_spread(LocalRunner(), built, protocol)
    return {
        "arch": arch.encode(),
        "times": len(samples),
        "median_ms": round(statistics.median(samples), 5),
        "samples_ms": [round(s, 5) for s in samples],
        "spread": round(spread, 4),
        "statistic": "(p90 - p10) / median",
        "cv": round(statistics.pstdev(samples) / statistics.mean(samples), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--space", default=None)
    ap.add_argument("--networks", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None, help="0: untuned LUT")
    ap.add_argument("--test-fraction", type=float, default=0.33)
    ap.add_argument("--db", default=None, help="LUT file (default: out/bench/<space>.sqlite)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--adapt", action="store_true", help="few-network / adaptation / uncertainty benchmark"
    )
    ap.add_argument("--source", default="x86", help="--adapt: target adapted from")
    ap.add_argument("--adapt-to", default="x86", help="--adapt: the new target")
    ap.add_argument("--adapt-space", default="tiny-w2", help="--adapt: the new space")
    ap.add_argument("--adapt-networks", type=int, default=64, help="--adapt: new networks")
    ap.add_argument(
        "--no-measure", action="store_true", help="--adapt: use the networks measured so far"
    )
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # --adapt's child
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure or args.adapt:
        import latency_adapt

        args.db_path = Path(args.db or "out/bench/tiny-adapt.sqlite")
        args.db_path.parent.mkdir(parents=True, exist_ok=True)
        if args.measure:
            latency_adapt.measure_target(
                args.measure, args.space or "tiny", args.db_path, args.networks or 80,
                args.seed, Path(args.side),
            )  # fmt: skip
            return 0
        result = latency_adapt.run_adapt(args, machine())
        write_result("latency_model_adapt", result)
        print(json.dumps({k: result.get(k) for k in ("demo", "adapt", "uncertainty", "goals")}))
        return 0
    space = get_space(args.space or ("tiny" if args.quick else "proxyless"))
    n = args.networks or (60 if args.quick else 160)
    trials = args.trials if args.trials is not None else (0 if args.quick else 32)
    mode = "tuned" if trials > 0 else "untuned"
    target = parse_target("x86")
    db = Path(args.db or f"out/bench/{space.name}.sqlite")
    protocol = MeasureProtocol()
    info = machine()
    t0 = time.time()
    build_lut(space, target, db, trials=trials, protocol=protocol)
    t1 = time.time()
    archs = sample_archs(space, n, args.seed)
    rep = measure_networks(
        space, target, db, archs, mode=mode, trials=trials, protocol=protocol, seed=args.seed
    )
    t2 = time.time()
    model, report = fit_latency_model(
        db,
        space,
        target,
        mode=mode,
        archs=archs,
        test_fraction=args.test_fraction,
        seed=args.seed,
        trials=trials,
    )
    name = "latency_model_quick" if args.quick else f"latency_model{'' if trials else '_untuned'}"
    model.save(Path("out/bench") / f"{name}.model.json")
    _, meas, preds = held_out(model, db)
    plot = scatter(
        RESULTS / f"{name}.png",
        meas,
        {k: preds[k] for k in ("lut_only", "lut_xgb")},
        f"{space.name} on {target.key} ({mode}): {len(meas)} held-out networks",
    )
    floor = noise_floor(space, target, db, archs[0], mode, protocol)
    result = {
        "target": target.key,
        "space": space.name,
        "mode": mode,
        "trials_per_task": trials,
        "n_train": report.n_train,
        "n_test": report.n_test,
        "noise_floor": floor,
        "residual_form": report.form,
        "cv_rmspe": report.cv_rmspe,
        **{
            k: {m: round(v, 4) for m, v in report.test[k].items() if m != "n"}
            for k in ("lut_only", "flops_linear", "lut_xgb")
        },
        "train_fit": {k: round(v["rmspe"], 4) for k, v in report.train.items()},
        "networks_measured_this_run": rep.measured,
        "networks_failed": len(rep.failed),
        "seconds": {"lut": round(t1 - t0, 1), "networks": round(t2 - t1, 1)},
        "protocol": protocol.to_dict(),
        "machine": info,
        "plot": plot.name,
    }
    write_result(name, result)
    for k in ("lut_only", "flops_linear", "lut_xgb"):
        r = result[k]
        print(
            f"{k:<13} RMSPE {r['rmspe']:.2%}  MAPE {r['mape']:.2%}  within5 {r['within5']:.0%}  "
            f"within10 {r['within10']:.0%}"
        )
    print(f"noise floor: {floor['times']} runs of one network spread {floor['spread']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
