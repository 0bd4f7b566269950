"""Run every benchmark, one after the other (they time things: never in parallel), and print the
headline figure of each from its result file.

    python benchmarks/run_all.py            # every benchmark in --quick mode (about an hour)
    python benchmarks/run_all.py --full     # full modes (several hours on 2 cores)
    python benchmarks/run_all.py --only lut_build,latency_model

A benchmark that fails is reported and the others still run; the exit status says whether all
passed. Each writes benchmarks/results/<name>[_quick].json (see the script's docstring).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = (
    "lut_build",
    "latency_model",
    "runtime_vs_peers",
    "farm",
    "nas",
    "haq",
    "amc",
)


def _headline(name: str, d: dict) -> str:
    """One line per benchmark: the figure its issue asks for."""
    try:
        if name == "lut_build":
            t, sp = d["tuned"], d["speedup_tuned_over_untuned"]
            return (
                f"{d['entries']} blocks, {t['unique_tasks']} unique tasks of "
                f"{t['tasks_in_all_blocks']}, tuned/untuned geomean {sp['geomean']:.2f}x, "
                f"build {d['untuned']['seconds']:.0f} s untuned + {t['seconds']:.0f} s tuned"
            )
        if name == "latency_model":
            return (
                ", ".join(
                    f"{k} RMSPE {d[k]['rmspe'] * 100:.1f}% (±10%: {d[k]['within10'] * 100:.0f}%)"
                    for k in ("lut_only", "flops_linear", "lut_xgb")
                )
                + f"; spread of 5 repeats of one net {d['noise_floor']['spread'] * 100:.1f}%"
            )
        if name == "runtime_vs_peers":
            return (
                f"TVM tuned {d['tvm_tuned_ms']:.3g} ms, ORT/TVM {d['ratio_ort_over_tvm']:.2f}, "
                f"torch/TVM {d['ratio_torch_over_tvm']:.2f}"
            )
        if name == "farm":
            t, r = d["throughput"], d["rpc_vs_local"]
            return (
                f"entries/min local {t['local']['entries_per_minute']}, 1 server "
                f"{t['farm_1_servers']['entries_per_minute']}, 2 servers "
                f"{t['farm_2_servers']['entries_per_minute']}; RPC/local median ratio "
                f"{r.get('median_ratio', r)}"
            )
        if name == "nas":
            return f"speedup at equal accuracy {d['speedup_at_equal_accuracy']}"
        if name == "haq":
            return (
                f"fp32 {d['fp32_ms']:.3g} ms {d['fp32_acc']:.1f}%, int8 {d['int8_ms']:.3g} ms, "
                f"HAQ {d['haq_ms']:.3g} ms {d['haq_acc']:.1f}% ({d['speedup_vs_fp32']}x)"
            )
        if name == "amc":
            return (
                f"base {d['base_ms']:.3g} ms {d['base_acc']:.1f}%, AMC {d['amc_ms']:.3g} ms "
                f"{d['amc_acc']:.1f}% ({d['speedup']:.2f}x), uniform {d['uniform_acc']:.1f}%"
            )
    except (KeyError, TypeError, ValueError):
        pass
    return "(see the JSON)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="full modes instead of --quick")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    suffix = "" if args.full else "_quick"
    status: dict[str, tuple[int, float]] = {}
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"== {name}: {script.name} missing, skipped", flush=True)
            status[name] = (-1, 0.0)
            continue
        cmd = [sys.executable, str(script)] + ([] if args.full else ["--quick"])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        status[name] = (rc, time.time() - t0)
    print("\nbenchmark          status   minutes  headline")
    for name, (rc, secs) in status.items():
        result = RESULTS / f"{name}{suffix}.json"
        line = ""
        if rc == 0 and result.exists():
            line = _headline(name, json.loads(result.read_text()))
        state = "ok" if rc == 0 else ("missing" if rc < 0 else f"rc={rc}")
        print(f"{name:<18} {state:<8} {secs / 60:>7.1f}  {line}")
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
