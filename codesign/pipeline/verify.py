"""The pipeline's last stage: the shipped artifact re-loaded with the plain TVM runtime, checked
against its sample, timed as a user calls it, and set beside the engines the user would
otherwise have shipped (ONNX Runtime and OpenVINO, `codesign.peers`) on the same network, and
on the best uniform baseline: what the user would have shipped without codesign."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from codesign.pipeline.config import ConfigError

PAIRS = 3  # alternations of time_evaluator and per-call timing


def stage_verify(
    artifact: str,
    model_dir: str,
    baselines: list[dict[str, Any]],
    budget_ms: float,
    work: Path,
    *,
    space: str,
    seed: int,
) -> dict[str, Any]:
    import numpy as np

    import codesign
    from codesign.peers import python_ms

    with codesign.load(artifact) as pred:
        files, samples = pred.artifact.files, pred.manifest.data["samples"]
        x = np.load(io.BytesIO(files[samples["input"]]))
        want = np.load(io.BytesIO(files[samples["output"]]))
        got = pred(x)
        err = float(np.max(np.abs(got - want)))
        if err > 1e-3:
            raise ConfigError(f"{artifact}: re-loaded output differs from its sample by {err:.3g}")
        # time_evaluator and per-call timing alternate (PAIRS pairs): timed one after the
        # other, host drift between the two read as per-call overhead (16% on a 0.044 ms net)
        pairs = []
        for _ in range(PAIRS):
            m = pred.time()
            pairs.append((m, python_ms(lambda: pred(x), repeat=5, min_repeat_ms=50)))
        threads, shape = pred.manifest.threads, tuple(pred.manifest.input.shape)
    m = sorted(pairs, key=lambda p: p[0].median_ms)[PAIRS // 2][0]
    per_call = statistics.median(p[1] for p in pairs)
    overhead = statistics.median(p[1] / p[0].median_ms - 1 for p in pairs if p[0].median_ms > 0)
    out = {
        "max_abs_err": err,
        "reloaded_ms": m.median_ms,
        "std_ms": m.std_ms,
        "per_call_ms": round(per_call, 5),
        "per_call_overhead": round(overhead, 4),  # median over the pairs of per call / timed - 1
        "host": _host(threads),
    }
    if pred.manifest.data["target"].get("name") == "x86":
        out["peers"] = _peers(model_dir, baselines, budget_ms, shape, threads, work, space, seed)
    return out


def _peers(
    model_dir: str,
    baselines: list[dict[str, Any]],
    budget_ms: float,
    shape: tuple[int, ...],
    threads: int,
    work: Path,
    space_name: str,
    seed: int,
) -> dict[str, Any]:
    """Peer engines on the shipped network and on the most accurate baseline within the budget
    (else the fastest baseline); weights do not change their latency, so the baseline runs with
    seeded ones."""
    from codesign.model_dir import load_model
    from codesign.modules import build_network
    from codesign.peers import time_peers
    from codesign.search.space import get_space

    net, _ = load_model(model_dir)
    shipped = time_peers(net, shape, threads, work, repeat=5, min_repeat_ms=50)
    result: dict[str, Any] = {"shipped_network": shipped}
    if baselines:
        within = [b for b in baselines if b["ms"] <= budget_ms]
        best = (
            max(within, key=lambda b: b["acc"]) if within else min(baselines, key=lambda b: b["ms"])
        )
        space = get_space(space_name)
        bnet = build_network(space, space.decode(best["arch"]), seed=seed).eval()
        peers = time_peers(bnet, shape, threads, work, repeat=5, min_repeat_ms=50)
        result["baseline"] = {"label": best["label"], "acc": best["acc"], **peers}
    return result


def _host(threads: int) -> dict[str, Any]:
    """The CPU, the threads and the load the measurements ran with."""
    from codesign.host_cpu import machine_facts

    return {**machine_facts(), "threads": threads}
