"""The CPU engines a user would otherwise ship with, run on the same network and threads.

    export_onnx(net, shape, path)        the PyTorch network as ONNX (opset 17, TorchScript
                                         exporter: works offline)
    onnxruntime_call(path, threads)      numpy -> numpy through ONNX Runtime's CPU provider
    openvino_call(path, threads)         the same through OpenVINO's CPU plugin (latency hint,
                                         f32: on AMX / AVX512-BF16 hosts it would run bf16)
    python_ms(fn)                        one call from Python, as a user's predict(x) costs
    time_peers(net, shape, threads, dir) both engines' per-call latency, or why one is missing
    time_onnx(path, x, threads)          the same on an existing ONNX file

Both engines are optional (the `bench` extra installs them): a missing one is reported, never
an error. They serve the pipeline's report and benchmarks/runtime_vs_peers.py alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from codesign.measurement import quiet_samples

Call = Callable[[np.ndarray], np.ndarray]


def export_onnx(net: Any, input_shape: tuple[int, ...], path: Path) -> Path:
    import torch

    x = torch.zeros(input_shape, dtype=torch.float32)
    with torch.no_grad():
        torch.onnx.export(
            net.eval(),
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    return path


def onnxruntime_call(path: Path, threads: int) -> Call:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name  # "input" for export_onnx's files; others name their own
    return lambda x: sess.run(None, {name: x})[0]


def openvino_call(path: Path, threads: int) -> Call:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda x: request.infer({0: x})[output]


ENGINES: dict[str, Callable[[Path, int], Call]] = {
    "onnxruntime": onnxruntime_call,
    "openvino": openvino_call,
}


def python_ms(fn: Callable[[], Any], *, repeat: int = 10, min_repeat_ms: float = 50.0) -> float:
    """Latency (ms) of one call of `fn`, by the statistic TVM's runner uses: windows of
    `min_repeat_ms / 5` (calls per window calibrated as time_evaluator calibrates), at least
    `5 x repeat` of them, and the median of the quiet ones (`quiet_samples`), so that an
    engine timed per call and a module timed by time_evaluator meet the host's slow phases
    alike."""
    window_ms = min_repeat_ms / 5
    for _ in range(3):
        fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if (time.perf_counter() - t0) * 1e3 >= window_ms or number >= 1 << 20:
            break
        number *= 2
    samples = []
    for _ in range(5 * repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(quiet_samples(samples))


def time_peers(
    net: Any,
    input_shape: tuple[int, ...],
    threads: int,
    workdir: Path,
    *,
    repeat: int = 10,
    min_repeat_ms: float = 50.0,
) -> dict[str, Any]:
    """Per-call ms of each engine on `net` ({engine: ms}), and {engine: reason} under
    "missing" for an engine that is not installed or cannot run the network."""
    path = export_onnx(net, input_shape, Path(workdir) / "peer.onnx")
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    return time_onnx(path, x, threads, repeat=repeat, min_repeat_ms=min_repeat_ms)


def time_onnx(
    path: Path, x: np.ndarray, threads: int, *, repeat: int = 10, min_repeat_ms: float = 50.0
) -> dict[str, Any]:
    """`time_peers` on an ONNX file that exists already (e.g. the one `codesign compile` was
    given), fed `x`."""
    out: dict[str, Any] = {"missing": {}}
    for name, make in ENGINES.items():
        try:
            call = make(path, threads)
        except ImportError:
            out["missing"][name] = "not installed (pip install codesign[bench])"
            continue
        except Exception as err:  # noqa: BLE001 - a peer that cannot load the net is reported
            out["missing"][name] = f"{type(err).__name__}: {err}"[:200]
            continue
        out[name] = round(
            python_ms(lambda c=call: c(x), repeat=repeat, min_repeat_ms=min_repeat_ms), 5
        )
    return out
