"""Helpers shared by the benchmark scripts: peer timings, machine facts, result files.

Benchmarks measure side by side in one run (the machine is shared and noisy) and write JSON to
benchmarks/results/. They are scripts, never timed unit tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    from codesign.host_cpu import machine_facts

    facts = machine_facts()
    cpu, load = facts["cpu"], facts["loadavg"] or [float("nan")] * 3
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def torch_eager_ms(
    module: Any, x: Any, *, threads: int, repeat: int = 10, min_repeat_ms: float = 50.0
) -> float:
    """Median over `repeat` samples of the mean eager latency (each sample >= min_repeat_ms)."""
    import torch

    torch.set_num_threads(threads)
    module = module.eval()
    samples = []
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        number = 1
        while True:  # calibrate like TVM's time_evaluator
            t0 = time.perf_counter()
            for _ in range(number):
                module(x)
            dt = time.perf_counter() - t0
            if dt * 1e3 >= min_repeat_ms:
                break
            number *= 2
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                module(x)
            samples.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(samples)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        **data,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path
