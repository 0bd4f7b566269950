"""HAQ on your own CNN: any torch model with nn.Conv2d / nn.Linear layers, no BlockSpecs.

    res = quantize_own(model, input_shape=(1, 3, 32, 32), data=dataset, target="x86",
                       lut_path="lut.sqlite", budget_ms=1.5, settings=OwnHAQSettings(),
                       seed=0, progress=True)

1. trace: torch.fx, BatchNorm folded into the conv before it, one layer per nn.Conv2d /
   nn.Linear call, by module path (`codesign.compression.quant.graph`)
2. LUT: every layer alone at every precision of the target's menu (int8 where the integer
   kernels fit it), compiled and timed on demand into the LUT file (keys `lut.layer_key`,
   e.g. `layer:conv2d:1x16x8x8:o32:k3:s1:p1:g1:int8`); entries with this run's provenance are
   reused, so a second run measures nothing
3. search: HAQ's DDPG over per-layer weight / activation bits (`GraphHAQEnv`, the episode loop
   `codesign.compression.episodes`, resumable through `settings.checkpoint`); a layer runs in
   int8 / fp16 only where the LUT measured that faster; the budget is on the LUT's layer sum,
   less the measured time of everything else in the network (adds, pools: the float network's
   measured latency minus its layers' LUT sum)
4. final: QAT fine-tune of the best policy, lowered (`codesign.compression.quant.graphlower`:
   int8 layers on the integer kernels of `codesign.tvm_backend.quantize`), compiled, checked
   against the fake-quant PyTorch twin, accuracy and latency measured on the compiled module.

`budget_ms=None`: the budget is what uniform 8-bit costs (every layer at w8a8, or w7a8 where
the int8 kernel needs it, on its fastest measured precision); the search finds a policy at
most that slow with the best accuracy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from codesign.compression.ddpg import DDPGConfig
from codesign.compression.quant.graph import GraphLayer, TracedGraph
from codesign.compression.quant.policy import QuantPolicy
from codesign.compression.quant.qat import QATConfig
from codesign.errors import CodesignError
from codesign.measurement import MeasureProtocol
from codesign.targets import Target
from codesign.tvm_backend.precision import PrecisionMenu


@dataclass(frozen=True, slots=True)
class OwnHAQSettings:
    episodes: int = 30
    min_bits: int = 2
    calib_images: int = 256
    val_images: int = 500
    search_qat: QATConfig = field(default_factory=lambda: QATConfig(images=1000))
    final_qat: QATConfig = field(default_factory=lambda: QATConfig(images=4000, epochs=2))
    ddpg: DDPGConfig = field(default_factory=lambda: DDPGConfig(warmup_episodes=10))
    protocol: MeasureProtocol = field(default_factory=MeasureProtocol)
    checkpoint: str | None = None  # the search checkpoint (re-run to resume)
    check_images: int = 4  # inputs the compiled module is compared with the fake-quant twin on

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ddpg"] = self.ddpg.to_dict()
        return d


@dataclass(frozen=True)
class OwnQuantResult:
    """What `quantize_own` returns: the policy per layer, accuracy, measured latency, module."""

    layers: tuple[GraphLayer, ...]
    policy: QuantPolicy  # one unit per layer: precisions[i], bits[i][0] of layers[i]
    accuracy: float  # top-1 % of the compiled module on `val_images`
    accuracy_fakequant: float  # of the fine-tuned PyTorch twin, same images
    float_accuracy: float  # of the float network, same images
    latency_ms: float  # measured, compiled quantised module
    float_ms: float  # measured, compiled float network (same lowering, all fp32), in
    # alternating passes with the quantised module (a ship decision compares like with like)
    lut_ms: float  # the LUT's layer sum of the policy
    budget_ms: float  # the budget the search used (whole network)
    max_abs_error: float  # compiled vs fake-quant twin, over `check_images` inputs
    output_scale: float  # max |fake-quant twin output| over the same inputs
    lut: dict[str, int]  # {"measured": n, "reused": n} LUT entries (layers + float network)
    search: dict[str, Any]  # episodes, resumed_from, best reward, history
    built: Any  # codesign.tvm_backend.build.Built: the compiled module (.export(path))
    qnet: nn.Module  # the fine-tuned fake-quant twin (reference)

    def layer_policy(self) -> dict[str, dict[str, Any]]:
        """{module path: {"precision", "w_bits", "a_bits"}}."""
        return {
            ly.path: {"precision": p, "w_bits": b[0].w, "a_bits": b[0].a}
            for ly, p, b in zip(self.layers, self.policy.precisions, self.policy.bits, strict=True)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.encode(),
            "layers": self.layer_policy(),
            "accuracy": self.accuracy,
            "accuracy_fakequant": self.accuracy_fakequant,
            "float_accuracy": self.float_accuracy,
            "latency_ms": self.latency_ms,
            "float_ms": self.float_ms,
            "lut_ms": self.lut_ms,
            "budget_ms": self.budget_ms,
            "max_abs_error": self.max_abs_error,
            "output_scale": self.output_scale,
            "lut": dict(self.lut),
            "search": {k: v for k, v in self.search.items() if k != "history"},
        }

    def save(self, out: str | Path) -> Path:
        """Write `out/model.so` (the compiled module, `tvm.runtime.load_module`; input
        `built.input_shape` float32 NCHW, then `built.params`), `out/policy.json` (the
        `QuantPolicy` record and the per-layer table) and `out/result.json`; returns `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.built.export(out / "model.so")
        policy = {**self.policy.to_dict(), "layers": self.layer_policy()}
        (out / "policy.json").write_text(json.dumps(policy, indent=2) + "\n")
        (out / "result.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out


def _lut_bits(p: str, menu: PrecisionMenu) -> tuple[int, int]:
    if p == "int8":
        return (8, 8) if menu.int8_exact(8, 8) else (7, 8)
    return (16, 16) if p == "fp16" else (32, 32)


def layer_lut(
    graph: TracedGraph,
    ranges: Sequence[Any],
    menu: PrecisionMenu,
    target: Target,
    lut_path: str | Path,
    *,
    protocol: MeasureProtocol,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, float]], dict[str, int]]:
    """Per layer {precision: ms} from the LUT file, measuring (and storing) what it lacks."""
    from codesign import interrupt
    from codesign.compression.quant.graph import export_graph_params, fake_quant_graph
    from codesign.compression.quant.graphlower import lower_layer
    from codesign.lut import LatencyTable
    from codesign.lut_build import _progress, provenance_for
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.runner import Where, run_steady

    prov = provenance_for(target, tuned=False, tuning_digest="", protocol=protocol)
    wanted = [[p for p in menu.precisions if p != "int8" or ly.int8_ok] for ly in graph.layers]
    params: dict[str, list[Any]] = {}
    out: list[dict[str, float]] = [{} for _ in graph.layers]
    counts = {"measured": 0, "reused": 0}
    runner = Where.local().runner(seed=seed)
    total = sum(len(w) for w in wanted)
    with LatencyTable(lut_path) as table, _progress(total, "layer lut", progress, "entry") as bar:
        for i, ly in enumerate(graph.layers):
            for p in wanted[i]:
                key = ly.lut_key(p)
                old = table.get(target.key, key, "untuned")
                if old is not None and old.ok and old.provenance.digest == prov.digest:
                    out[i][p] = old.median_ms
                    counts["reused"] += 1
                    bar.update()
                    continue
                interrupt.check()
                if p not in params:
                    bits = [_lut_bits(p, menu)] * len(graph.layers)
                    params[p] = export_graph_params(fake_quant_graph(graph, ranges, bits), graph)
                module = graph.module.get_submodule(ly.path)
                low = lower_layer(
                    params[p][i], module, p, menu, params_as_input=protocol.cache_flush
                )
                m = run_steady(runner, compile_module(low, target), protocol)
                interrupt.check()
                table.put(target.key, key, "untuned", m, prov)
                if not m.ok:
                    raise CodesignError(f"measuring layer {ly.path} at {p} failed: {m.error}")
                out[i][p] = m.median_ms
                counts["measured"] += 1
                bar.set_postfix_str(f"{ly.path} {p} {m.median_ms:.3f} ms")
                bar.update()
    return out, counts


def float_network_ms(
    graph: TracedGraph,
    built: Any,
    target: Target,
    lut_path: str | Path,
    *,
    protocol: MeasureProtocol,
    seed: int = 0,
    counts: dict[str, int] | None = None,
) -> float:
    """The float network (`built`: compiled as `quantize_own` lowers it), timed once into the
    LUT file's networks table (key `graph:<digest of its FX code and layers>`) and reused
    after."""
    from codesign.lut import LatencyTable
    from codesign.lut_build import provenance_for
    from codesign.tvm_backend.runner import Where, run_steady

    blob = graph.module.code + "|".join(ly.lut_key("fp32") for ly in graph.layers)
    key = "graph:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    prov = provenance_for(target, tuned=False, tuning_digest="", protocol=protocol)
    with LatencyTable(lut_path) as table:
        old = table.get_network(target.key, key, "untuned")
        if old is not None and old.ok and old.provenance.digest == prov.digest:
            if counts is not None:
                counts["reused"] += 1
            return old.median_ms
        m = run_steady(Where.local().runner(seed=seed), built, protocol)
        table.put_network(target.key, key, "untuned", m, prov)
    if not m.ok:
        raise CodesignError(f"measuring the float network failed: {m.error}")
    if counts is not None:
        counts["measured"] += 1
    return m.median_ms


def _fingerprint(graph: TracedGraph, env: Any, settings: OwnHAQSettings, seed: int) -> str:
    from codesign.compression.amc.search import weights_digest

    blob = {
        "layers": [ly.lut_key("fp32") for ly in graph.layers],
        "weights": weights_digest(graph.module),
        "menu": env.menu.to_dict(),
        "haq": env.config.to_dict(),
        "ddpg": settings.ddpg.to_dict(),
        "float_accuracy": env.float_accuracy,
        "layer_ms": env.layer_ms,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _compile(qnet: Any, graph: TracedGraph, precisions: Sequence[str], menu: Any, target: Target):
    from codesign.compression.quant.graph import export_graph_params
    from codesign.compression.quant.graphlower import lower_graph
    from codesign.tvm_backend.build import compile_module

    params = export_graph_params(qnet, graph)
    return compile_module(lower_graph(qnet, graph, params, precisions, menu), target)


def quantize_own(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    data: Any,
    target: str | Target,
    lut_path: str | Path,
    budget_ms: float | None,
    settings: OwnHAQSettings | None = None,
    seed: int = 0,
    progress: bool = True,
) -> OwnQuantResult:
    """HAQ on `model` for `target` (see the module docstring). `data` is a
    `codesign.data.Dataset` whose inputs have `input_shape[1:]`."""
    import copy
    from dataclasses import replace

    from codesign.compression.haq.env import HAQConfig
    from codesign.compression.haq.ownenv import GraphHAQEnv
    from codesign.compression.haq.pipeline import compiled_accuracy
    from codesign.compression.haq.search import haq_search
    from codesign.compression.quant.graph import (
        calibrate_graph,
        fake_quant_graph,
        set_graph_bits,
        trace_graph,
    )
    from codesign.compression.quant.graphlower import max_abs_error
    from codesign.compression.quant.qat import finetune
    from codesign.targets import parse_target
    from codesign.train import evaluate
    from codesign.tvm_backend.precision import precision_menu
    from codesign.tvm_backend.runner import Where, measure_in_passes

    s = settings or OwnHAQSettings()
    if budget_ms is not None and not budget_ms > 0:
        raise CodesignError(f"budget_ms must be positive (or None), got {budget_ms}")
    shape = tuple(getattr(getattr(data, "info", None), "input_shape", ()))
    if shape != tuple(input_shape)[1:]:
        raise CodesignError(
            f"the dataset gives inputs of shape {shape}, the model takes {tuple(input_shape)}; "
            "load the dataset for the model's input shape (load_dataset(name, input_shape[1:]))"
        )
    target = parse_target(target)
    menu = precision_menu(target)
    graph = trace_graph(model, input_shape)
    ranges = calibrate_graph(graph, [data.calibration(s.calib_images, seed)])
    layer_ms, counts = layer_lut(
        graph, ranges, menu, target, lut_path, protocol=s.protocol, seed=seed, progress=progress
    )
    # the float network, measured: what the layers' LUT sum leaves out (adds, pools, ...)
    fnet = fake_quant_graph(graph, ranges, [(32, 32)] * len(graph.layers)).eval()
    fbuilt = _compile(fnet, graph, ["fp32"] * len(graph.layers), menu, target)  # also timed last
    float_ms = float_network_ms(
        graph, fbuilt, target, lut_path, protocol=s.protocol, seed=seed, counts=counts
    )
    rest = max(0.0, float_ms - sum(m["fp32"] for m in layer_ms))
    qat = replace(s.search_qat, seed=seed)
    env = GraphHAQEnv(
        graph,
        data,
        ranges,
        menu,
        layer_ms,
        HAQConfig("latency", 1e9, s.min_bits, qat, s.val_images),
    )
    if budget_ms is None:
        eight = env.derive([_lut_bits("int8", menu) for _ in graph.layers])
        budget_ms = env.cost(eight) + rest
    env.config = replace(env.config, budget=max(budget_ms - rest, 1e-9))
    env.check_budget(f" (whole network: {budget_ms:g} ms, {rest:.4g} ms of it outside the layers)")
    ddpg = replace(s.ddpg, seed=seed)
    res = haq_search(
        env, s.episodes, ddpg, checkpoint=s.checkpoint, progress=progress,
        fingerprint_of=_fingerprint(graph, env, s, seed),
    )  # fmt: skip
    policy = res.best.policy
    qnet = copy.deepcopy(env.base)
    set_graph_bits(qnet, graph, [(lb.w, lb.a) for lb in policy.layers])
    if any(lb.w <= 8 or lb.a <= 8 for lb in policy.layers):
        finetune(qnet, data, replace(s.final_qat, seed=seed), progress=progress)
    qnet.eval()
    built = _compile(qnet, graph, policy.precisions, menu, target)
    xs = data.calibration(s.check_images, seed + 1).numpy()
    errs = [max_abs_error(built, qnet, xs[i : i + 1]) for i in range(len(xs))]
    acc, _n = compiled_accuracy(built, data, s.val_images)
    pair = measure_in_passes(Where.local().runner(seed=seed), [built, fbuilt], s.protocol)
    for m, what in zip(pair, ("quantized", "float"), strict=True):
        if not m.ok:
            raise CodesignError(f"measuring the {what} network failed: {m.error}")
    return OwnQuantResult(
        layers=graph.layers,
        policy=policy,
        accuracy=acc,
        accuracy_fakequant=evaluate(qnet, data, limit=s.val_images),
        float_accuracy=env.float_accuracy,
        latency_ms=pair[0].median_ms,
        float_ms=pair[1].median_ms,
        lut_ms=env.cost(policy),
        budget_ms=float(budget_ms),
        max_abs_error=max(e for e, _ in errs),
        output_scale=max(m for _, m in errs),
        lut=counts,
        search={
            "episodes": s.episodes,
            "resumed_from": res.resumed_from,
            "best": res.best.to_dict(),
            "rest_ms": rest,
            "layer_ms": {ly.path: dict(m) for ly, m in zip(graph.layers, layer_ms, strict=True)},
            "history": res.history,
        },
        built=built,
        qnet=qnet,
    )
