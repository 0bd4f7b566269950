"""`codesign compile` on an ONNX file from outside the search spaces, against ONNX Runtime and
OpenVINO on the same file, side by side.

    python benchmarks/compile_onnx.py                  # MobileNetV2 (width 1.0, 1000 classes)
                                                       # at 1x3x224x224, analytic schedules
    python benchmarks/compile_onnx.py --quick          # the same net at 1x3x64x64
    python benchmarks/compile_onnx.py --tune-trials 8 --focus-trials 128   # tuned

The network is codesign.zoo.mobilenet_v2 with seeded weights and non-trivial BatchNorm
statistics, exported to ONNX with codesign.peers.export_onnx (opset 17, TorchScript exporter).
The script runs the real CLI (`codesign compile --model net.onnx --json`), then loads the
artifact as users do (codesign.load) and times, in interleaved rounds with the same threads and
input: the artifact (TVM time_evaluator, and per call from Python) and ONNX Runtime and OpenVINO
per call from Python (codesign.peers). The numerical check is the artifact's max abs difference
from ONNX Runtime (as recorded by `codesign compile`, and again on fresh inputs here).
Writes benchmarks/results/compile_onnx.json (compile_onnx_quick.json with --quick, or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

import codesign  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.peers import ENGINES, export_onnx, python_ms  # noqa: E402
from codesign.targets import parse_target  # noqa: E402


def mobilenet_v2(seed: int = 0):
    import torch

    from codesign.zoo import mobilenet_v2 as make

    torch.manual_seed(seed)
    net = make(num_classes=1000, width=1.0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # as if trained: folding must be exact
            m.running_mean.uniform_(-0.2, 0.2)  # pyright: ignore[reportOptionalMemberAccess]
            m.running_var.uniform_(0.5, 1.5)  # pyright: ignore[reportOptionalMemberAccess]
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1x3x64x64 instead of 1x3x224x224")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--focus-trials", type=int, default=0)
    ap.add_argument("--tuning-db", default=None, help="records to apply / tune into")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--min-repeat-ms", type=int, default=50)
    ap.add_argument("--name", default=None, help="result file name (default compile_onnx[_quick])")
    args = ap.parse_args()

    host = machine()  # load average before this run adds its own
    size = 64 if args.quick else 224
    shape = (1, 3, size, size)
    target = parse_target(args.target)
    threads = target.threads
    work = Path(tempfile.mkdtemp(prefix=f"compile-onnx-{os.getpid()}-"))
    onnx_path = export_onnx(mobilenet_v2(), shape, work / "mobilenet_v2.onnx")
    out = work / "mobilenet_v2.tar"
    cmd = [sys.executable, "-m", "codesign.cli.main", "compile", "--model", str(onnx_path),
           "--target", args.target, "--out", str(out), "--check-inputs", "4", "--json",
           "--repeat", str(args.repeat), "--min-repeat-ms", str(args.min_repeat_ms),
           "--tune-trials", str(args.tune_trials), "--focus-trials", str(args.focus_trials),
           "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]  # fmt: skip
    if args.tuning_db:
        cmd += ["--tuning-db", args.tuning_db]
    print("$ codesign " + " ".join(cmd[3:]), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"codesign compile failed:\n{res.stderr[-3000:]}")
    manifest = json.loads(res.stdout)
    compile_log = res.stderr.strip().splitlines()[-1:]

    mask = os.sched_getaffinity(0)
    proto = MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    timing = {"repeat": args.repeat, "min_repeat_ms": args.min_repeat_ms}
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(shape).astype("float32") for _ in range(4)]
    peers = {name: make(onnx_path, threads) for name, make in ENGINES.items()}
    own: list[float] = []
    call: dict[str, list[float]] = {k: [] for k in ("codesign", *peers)}
    with codesign.load(out) as predict:
        ort = peers["onnxruntime"]
        diff = max(float(np.abs(predict(x) - ort(x)).max()) for x in xs)
        diff_ov = max(float(np.abs(peers["openvino"](x) - ort(x)).max()) for x in xs)
        x = xs[0]
        for r in range(args.rounds):
            own.append(predict.time(proto).median_ms)
            call["codesign"].append(python_ms(lambda: predict(x), **timing))
            for name, fn in peers.items():
                call[name].append(python_ms(lambda fn=fn: fn(x), **timing))
            print(f"round {r + 1}: codesign {own[-1]:.3f} ms (time_evaluator), per call: "
                  + ", ".join(f"{k} {v[-1]:.3f}" for k, v in call.items()) + " ms", flush=True)  # fmt: skip
    per_call = {k: round(statistics.median(v), 4) for k, v in call.items()}
    ours = per_call["codesign"]
    result = {
        "model": "codesign.zoo.mobilenet_v2(num_classes=1000, width=1.0), seeded, ONNX opset 17",
        "input_shape": list(shape),
        "target": target.key,
        "threads": threads,
        "cpu_affinity": sorted(mask),
        "tuning": {
            k: manifest["tuning"].get(k)
            for k in (
                "mode",
                "trials_per_task",
                "focus_trials",
                "tasks_with_records",
                "unique_tasks",
                "seconds",
            )
        },  # fmt: skip
        "max_abs_diff_vs_onnxruntime": diff,
        "max_abs_diff_vs_onnxruntime_at_compile": manifest["equality"]["max_abs_err"],
        "max_abs_diff_openvino_vs_onnxruntime": diff_ov,
        "output_scale": manifest["equality"]["output_scale"],
        "codesign_time_evaluator_ms": round(statistics.median(own), 4),
        "per_call_ms": per_call,
        "ratio_onnxruntime_over_codesign": round(per_call["onnxruntime"] / ours, 3),
        "ratio_openvino_over_codesign": round(per_call["openvino"] / ours, 3),
        "compile_report_per_call_ms": manifest["peers"]["per_call_ms"],
        "compile_log": compile_log,
        "machine": host,
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(
        f"\nMobileNetV2 {'x'.join(map(str, shape))} on {threads} threads ({target.key}), per call:"
        f"\n  codesign    {ours:8.3f} ms   (max abs diff vs ONNX Runtime {diff:.2e})"
        f"\n  onnxruntime {per_call['onnxruntime']:8.3f} ms   ratio ORT/codesign "
        f"{result['ratio_onnxruntime_over_codesign']:.2f}"
        f"\n  openvino    {per_call['openvino']:8.3f} ms   ratio OpenVINO/codesign "
        f"{result['ratio_openvino_over_codesign']:.2f}"
    )
    write_result(args.name or ("compile_onnx_quick" if args.quick else "compile_onnx"), result)


if __name__ == "__main__":
    main()
    for leftover in Path(tempfile.gettempdir()).glob(f"compile-onnx-{os.getpid()}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
