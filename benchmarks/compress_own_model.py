"""AMC pruning of standard CNNs (MobileNetV2, ResNet-18) against TVM-measured latency.

    python benchmarks/compress_own_model.py [--arch mobilenet_v2 resnet18] [--episodes 6]

Per architecture (codesign.zoo, 3x64x64 inputs, mnist5k upscaled; a training subset so that
the whole run fits a loaded 2-core machine: few epochs, few episodes, recorded in the JSON):
train the original (cached), then AMC (compression/amc/own.py: torch-pruning groups, DDPG,
layer LUT measured on demand with TVM, whole-network calibration) at a budget of 0.6x the
original's measured latency, fine-tune, compile and measure. The baseline is Torch-Pruning's
magnitude pruner at one uniform ratio, chosen so that its latency matches ours (secant steps
from the unpruned and uniformly-halved networks, each candidate measured in alternating passes
with AMC's network), fine-tuned the same way and measured the same way. The original also runs
in ONNX Runtime and OpenVINO (codesign.peers).
HAQ for any CNN (compression/haq/own.py) is applied after AMC when it exists.
With --via onnx the trained original is exported to ONNX first and codesign compresses the file
(results keyed ARCH@onnx; checkpoints in WORK/ARCH/onnx), as `codesign compress --model x.onnx`.
Writes benchmarks/results/compress_own_model.json; intermediate state in out/bench/compress_own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

WORK = Path("out/bench/compress_own")
TP_MATCH, TP_ROUNDS = 0.03, 4  # Torch-Pruning's network within 3% of AMC's ms, 4 tries


def subset(data, n_train: int, n_val: int):  # type: ignore[no-untyped-def]
    from codesign.data import Dataset

    info = replace(data.info, n_train=min(n_train, data.info.n_train),
                   n_val=min(n_val, data.info.n_val))  # fmt: skip
    return Dataset(info, data.x_train[:n_train], data.y_train[:n_train], data.x_val[:n_val],
                   data.y_val[:n_val])  # fmt: skip


def tp_uniform(model, graph, kept: float):  # type: ignore[no-untyped-def]
    """Torch-Pruning's magnitude pruner, one ratio for every group (the classifier kept)."""
    import copy

    import torch
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    head = dict(net.named_modules())[graph.head]
    pruner = tp.pruner.MagnitudePruner(
        net, torch.zeros(graph.input_shape), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=max(0.0, 1.0 - kept), ignored_layers=[head], round_to=8,
    )  # fmt: skip
    pruner.step()
    return net


def run_arch(name: str, args: argparse.Namespace, data, target) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from codesign import zoo
    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.own import (
        OwnSettings,
        calibration_policies,
        prune_own,
        unit_options,
    )
    from codesign.compression.amc.own_latency import (
        LayerLatency,
        compile_own,
        policies_ms,
        uniform_counts,
    )
    from codesign.compression.amc.own_layers import OwnGraph
    from codesign.compression.amc.surgery import recalibrate_bn
    from codesign.compression.ddpg import DDPGConfig
    from codesign.measurement import MeasureProtocol
    from codesign.peers import time_peers
    from codesign.train import TrainConfig, evaluate, train

    t0 = time.time()
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = getattr(zoo, name)(num_classes=len(data.info.classes))
    # the trained original, cached per training recipe (a changed recipe trains anew)
    base = work / f"base-{args.size}px-{args.train_images}img-{args.train_epochs}ep-lr{args.lr}.pt"
    if base.exists():
        model.load_state_dict(torch.load(base, weights_only=True))
    else:
        cfg = TrainConfig(epochs=args.train_epochs, lr=args.lr)
        train(model, data, cfg, checkpoint=base.with_suffix(".ckpt"), desc=f"train {name}")
        torch.save(model.state_dict(), base)
    # a few hundred steps from scratch leave BatchNorm's running statistics behind the weights
    # (MobileNetV2: 12% in eval mode at 0.46 training loss); refresh them on training images
    recalibrate_bn(model, data.calibration(512, seed=0))
    if args.via == "onnx":  # what a user with an ONNX file gets: BatchNorm folded by the exporter
        from codesign.compression.compress import load_user_model
        from codesign.peers import export_onnx

        path = export_onnx(model.eval(), (1, *data.info.input_shape), work / f"{base.stem}.onnx")
        model, _ = load_user_model(str(path), weights=None, input_shape=None)
        model.restore_batchnorm(data.calibration(256, seed=0))  # as `codesign compress` does
        work = work / "onnx"
        work.mkdir(exist_ok=True)
    original_acc = evaluate(model, data)
    print(f"[{name}] original accuracy {original_acc:.2f}%", flush=True)
    protocol = MeasureProtocol()
    layers = LayerLatency(args.db, target, protocol)
    graph = OwnGraph.build(model, (1, *data.info.input_shape))
    ft = TrainConfig(epochs=args.finetune_epochs, lr=0.01)
    settings = OwnSettings(
        amc=AMCConfig(episodes=args.episodes, lbound=0.25, divisor=8, reward_images=500,
                      calib_images=128, ddpg=DDPGConfig(warmup_episodes=args.warmup)),
        levels=args.levels, finetune=ft, protocol=protocol, missing=args.missing,
    )  # fmt: skip
    # the budget from the original measured in alternating passes with the networks the
    # search calibrates on (stored: prune_own reuses them); one run alone read ResNet-18 at
    # 3.43 ms where its passes read 1.91 and set a budget above the unpruned network
    original_ms = policies_ms(layers, graph, calibration_policies(graph, settings))[0]
    budget = args.budget * original_ms
    print(f"[{name}] original {original_ms:.3f} ms (TVM); budget {budget:.3f} ms", flush=True)
    res = prune_own(model, data, budget_ms=budget, target=target, db=args.db, settings=settings,
                    out=work / "amc", log=lambda m: print(f"[{name}] {m}", flush=True))  # fmt: skip
    print(f"[{name}] AMC {res.pruned_ms:.3f} ms, {res.pruned_acc:.2f}%", flush=True)
    out_ms, out_acc = res.pruned_ms, res.pruned_acc
    quant: dict = {"skipped": "HAQ for any CNN (compression/haq/own.py) is not installed"}
    try:
        if args.haq_episodes < 1:
            raise ImportError("--haq-episodes 0")
        from codesign.compression.compress import quantize_step
        from codesign.compression.haq.own import OwnHAQSettings
        from codesign.compression.quant.qat import QATConfig

        haq = OwnHAQSettings(
            episodes=args.haq_episodes,
            val_images=500,
            search_qat=QATConfig(images=256),
            final_qat=QATConfig(images=args.train_images, epochs=1),
            ddpg=DDPGConfig(warmup_episodes=max(1, args.haq_episodes // 2)),
        )
        # budget None: at most uniform 8-bit's cost (the pruned network already fits ours)
        quant = quantize_step(res.model, data, target=target, db=args.db, budget_ms=None,
                              out=work / "haq", progress=True, haq=haq) or quant  # fmt: skip
    except ImportError as err:
        quant = {"skipped": f"HAQ not run: {err}"}
    except Exception as err:  # noqa: BLE001 - report, keep the pruned result
        quant = {"failed": f"{type(err).__name__}: {err}"[:300]}
    # The quantized network ships as the pipeline's rule says (measured faster than its input
    # by more than MIN_GAIN) and only within --max-quant-drop points of the pruned accuracy.
    from codesign.pipeline.compress import MIN_GAIN, measured_faster

    qbuilt = quant.pop("built", None)
    quant.pop("qnet", None)  # the fake-quant twin (`codesign compress` checks the artifact on it)
    q_ok = quant.get("latency_ms") is not None and (
        quant["accuracy"] >= res.pruned_acc - args.max_quant_drop
    )
    if quant.get("latency_ms") is not None and not q_ok:
        quant["not_shipped"] = (f"{quant['accuracy']:.2f}% is more than {args.max_quant_drop} pt "
                                f"below the pruned network's {res.pruned_acc:.2f}%")  # fmt: skip

    def ships(q_ms: float | None, fp32_ms: float) -> bool:
        return q_ok and q_ms is not None and measured_faster(q_ms, fp32_ms, MIN_GAIN)

    if ships(quant.get("latency_ms"), res.pruned_ms):
        out_ms, out_acc = quant["latency_ms"], quant["accuracy"]

    # Torch-Pruning at one uniform ratio, at the same latency. Every ratio is priced by its
    # network's ms over AMC's network's, the two measured in alternating passes (a slow phase
    # of the host hits both; ratios measured minutes apart are not comparable). Start between
    # the unpruned (1.0) and uniformly halved (0.5) networks; latency is neither linear nor
    # monotonic in the kept ratio (channel rounding, kernel shapes): secant steps through the
    # bracketing priced points, keeping the candidate closest to AMC's network, then fine-tune it.
    amc_built = compile_own(res.model, graph.input_shape, target)

    def over_amc(net) -> float:  # type: ignore[no-untyped-def]
        return layers.relative_ms(net, amc_built, 1.0, graph.input_shape)

    options = unit_options(graph, settings.amc, settings.levels)
    half = graph.prune(uniform_counts(graph, options, 0.5))  # one of calibration's networks
    points = [(0.5, over_amc(half)), (1.0, over_amc(model))]
    kept = 0.5 + 0.5 * (1.0 - points[0][1]) / max(points[1][1] - points[0][1], 1e-9)
    kept = min(max(kept, 0.25), 1.0)
    candidates = []
    for _ in range(TP_ROUNDS):
        net = tp_uniform(model, graph, kept)
        ratio = over_amc(net)
        candidates.append((abs(ratio - 1), kept, net))
        print(f"[{name}] torch-pruning kept {kept:.3f}: {ratio:.3f}x AMC's ms", flush=True)
        if candidates[-1][0] <= TP_MATCH:
            break
        points.append((kept, ratio))
        # the bracket in kept ratio: the most kept that is not slower than AMC's network,
        # and the least kept above it that is (ratios can fall as more is kept)
        lo = max((p for p in points if p[1] <= 1.0), default=points[0])
        hi = min((p for p in points if p[1] > 1.0 and p[0] > lo[0]), default=points[1])
        kept = lo[0] + (hi[0] - lo[0]) * (1.0 - lo[1]) / max(hi[1] - lo[1], 1e-9)
        kept = min(max(kept, 0.25), 1.0)
    _, kept, tp_net = min(candidates, key=lambda c: c[0])
    recalibrate_bn(tp_net, data.calibration(128, seed=0))
    train(tp_net, data, ft, checkpoint=work / f"tp-{base.stem}.pt", desc="fine-tune tp")
    recalibrate_bn(tp_net, data.calibration(128, seed=0))  # as prune_own does after fine-tuning
    tp_acc = evaluate(tp_net, data)
    tp_ms = layers.network_ms(tp_net, graph.input_shape)
    print(f"[{name}] torch-pruning kept {kept:.3f}: {tp_ms:.3f} ms, {tp_acc:.2f}%", flush=True)

    cached = {"original_ms": original_ms, "compressed_ms": out_ms, "torch_pruning_ms": tp_ms}
    peers = time_peers(model, graph.input_shape, target.threads, work)
    amc_ms = res.pruned_ms
    per_round: dict = {}
    if args.rounds > 0:  # time all side by side (the quantized module too, when it ships)
        extra = (qbuilt,) if qbuilt is not None and q_ok else ()
        peers, times, per_round = side_by_side((model, res.model, tp_net), graph.input_shape,
                                               target, protocol, work, args.rounds, extra)  # fmt: skip
        original_ms, amc_ms, tp_ms = times[:3]
        q_ms = times[3] if extra else None
        if q_ms is not None:
            quant["latency_ms_side_by_side"] = round(q_ms, 4)
        shipped = ships(q_ms, amc_ms)
        if shipped:
            out_ms, out_acc = cast(float, q_ms), quant["accuracy"]
        else:
            out_ms, out_acc = amc_ms, res.pruned_acc
        # the rounds as timed (original, AMC, torch-pruning[, quantized]; peers), and the
        # speedup within each round: robust to a host that drifts between rounds
        out_i = 3 if shipped else 1
        tvm_rounds = per_round["tvm"]
        round_speedups = [
            round(o / c, 3) for o, c in zip(tvm_rounds[0], tvm_rounds[out_i], strict=True)
        ]
        per_round["speedup"] = round_speedups
        print(f"[{name}] side by side: {original_ms:.3f} / {out_ms:.3f} / {tp_ms:.3f} ms, "
              f"peers {peers}", flush=True)  # fmt: skip
    quant["shipped"] = out_ms != amc_ms
    best_peer = min((v for k, v in peers.items() if k != "missing"), default=float("nan"))
    return {
        "via": args.via,
        "timing": (
            f"original, compressed, torch-pruning and the peers timed side by side in "
            f"{args.rounds} interleaved rounds at the end (medians)"
            if args.rounds > 0
            else "TVM networks timed when first built (LUT networks table); peers at the end"
        ),
        "first_timings_ms": {k: round(v, 4) for k, v in cached.items()},
        "side_by_side_rounds_ms": per_round,
        "original_ms": round(original_ms, 4),
        "original_acc": round(original_acc, 2),
        "budget_ms": round(budget, 4),
        "amc_ms": round(amc_ms, 4),
        "amc_acc": round(res.pruned_acc, 2),
        "amc_acc_before_finetune": round(res.pruned_acc_before_finetune, 2),
        "amc_predicted_ms": round(res.predicted_ms, 4),
        "amc_searched_predicted_ms": round(res.searched_ms, 4),  # before the budget fill
        "amc_verified_predicted_measured_ms": [[round(p, 4), round(m, 4)] for p, m in res.verified],
        "quantize": quant,
        "compressed_ms": round(out_ms, 4),
        "compressed_acc": round(out_acc, 2),
        "speedup": round(original_ms / out_ms, 3),
        "acc_drop": round(original_acc - out_acc, 2),
        "torch_pruning_kept_ratio": round(kept, 3),
        "torch_pruning_ms": round(tp_ms, 4),
        "torch_pruning_acc_at_same_ms": round(tp_acc, 2),
        "torch_pruning_ms_over_amc": round(tp_ms / amc_ms, 3),
        "ort_original_ms": peers.get("onnxruntime"),
        "openvino_original_ms": peers.get("openvino"),
        "peers_missing": peers["missing"],
        "speedup_vs_best_peer": round(best_peer / out_ms, 3),
        "policy": res.policy.encode(),
        "gap_model_w": [round(v, 4) for v in res.calibration],
        "gap_model_loo_error": round(res.calibration_error, 4),
        "layers_measured": res.layers_measured,
        "episodes": res.episodes,
        "base_bn_recalibrated": True,
        "bn_refreshed_after_finetune": True,
        "seconds": round(time.time() - t0, 1),
    }


def side_by_side(nets, shape, target, protocol, work, rounds, extra=()):  # type: ignore[no-untyped-def]
    """Compile the networks, then time them, the compiled modules `extra` and the peers in
    interleaved rounds (medians): on a shared host, timings taken minutes apart are not
    comparable."""
    import statistics

    from codesign.compression.amc.own_latency import compile_own
    from codesign.peers import time_peers
    from codesign.tvm_backend.runner import LocalRunner, run_steady

    builts = [compile_own(n, shape, target) for n in nets] + list(extra)
    ms: list[list[float]] = [[] for _ in builts]
    peer_ms: dict[str, list[float]] = {}
    missing: dict = {}
    for _ in range(rounds):
        for i, b in enumerate(builts):
            ms[i].append(run_steady(LocalRunner(), b, protocol).median_ms)
        p = time_peers(nets[0], shape, target.threads, work)
        missing = p.pop("missing")
        for k, v in p.items():
            peer_ms.setdefault(k, []).append(v)
    peers = {k: statistics.median(v) for k, v in peer_ms.items()}
    rounds = {"tvm": [[round(v, 4) for v in m] for m in ms],
              **{k: [round(v, 4) for v in m] for k, m in peer_ms.items()}}  # fmt: skip
    return {**peers, "missing": missing}, tuple(statistics.median(v) for v in ms), rounds


def main() -> int:
    import torch

    from codesign.data import load_dataset
    from codesign.targets import parse_target

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.02, help="training learning rate")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=60)  # about 1 s each (MobileNetV2 64x64)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="final side-by-side timing rounds (0: keep the first timings)",
    )
    ap.add_argument("--haq-episodes", type=int, default=4, help="0: no HAQ step")
    ap.add_argument("--max-quant-drop", type=float, default=0.5,
                    help="most accuracy points HAQ may lose against the pruned network to ship")  # fmt: skip
    ap.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="TVM, PyTorch and peer threads (1 on a busy shared host)",
    )
    ap.add_argument(
        "--missing",
        choices=("measure", "scale"),
        default="measure",
        help="new layer shapes during the search: measured (as `codesign compress` does), or "
        "MAC-scaled (quicker, coarser)",
    )
    ap.add_argument(
        "--merge",
        nargs="*",
        default=None,
        help="only merge these result files (one per architecture) into --result",
    )
    ap.add_argument("--via", choices=("torch", "onnx"), default="torch",
                    help="give codesign the trained PyTorch module, or its ONNX export (rebuilt "
                    "in PyTorch by codesign.compression.onnx_module; BatchNorm folded)")  # fmt: skip
    ap.add_argument("--budget", type=float, default=0.6, help="fraction of the original's ms")
    ap.add_argument("--work", default=str(WORK), help="cached models, checkpoints, the LUT")
    ap.add_argument("--db", default=None, help="layer LUT (default: WORK/lut.sqlite)")
    ap.add_argument("--result", default="compress_own_model", help="result file name")
    args = ap.parse_args()
    args.db = args.db or str(Path(args.work) / "lut.sqlite")
    torch.set_num_threads(args.threads)
    if args.merge is not None:
        return merge(args)
    host = machine()
    target = parse_target(f"x86:threads={args.threads}")
    data = subset(load_dataset("mnist5k", (3, args.size, args.size)), args.train_images,
                  args.val_images)  # fmt: skip
    results = {}
    for name in args.arch:
        results[name if args.via == "torch" else f"{name}@{args.via}"] = run_arch(
            name, args, data, target
        )
        write_result(args.result, _doc(results, args, host, target))
    return 0


def merge(args: argparse.Namespace) -> int:
    """Join per-architecture result files (runs started side by side) into one."""
    import json

    from common import RESULTS

    docs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.merge]
    doc = dict(docs[0])
    doc["results"] = {k: v for d in docs for k, v in d["results"].items()}
    doc["goals_met"] = {k: goals_of(v) for k, v in doc["results"].items()}  # by today's rule
    doc["runs"] = {n: {"settings": d["settings"], "machine": d["machine"]}
                   for n, d in zip(args.merge, docs, strict=True)}  # fmt: skip
    write_result(args.result, doc)
    return 0


def goals_of(r: dict) -> dict[str, bool]:
    """The issue's goals for one architecture's result."""
    return {
        "speedup>=1.5": r["speedup"] >= 1.5,
        "acc_drop<=0.5": r["acc_drop"] <= 0.5,
        # Torch-Pruning is matched to the pruning step's latency (the budget), so it is the
        # pruned network's accuracy it competes with, before HAQ changes the latency again
        "beats_torch_pruning": r["amc_acc"] > r["torch_pruning_acc_at_same_ms"],
        "vs_best_peer>=1.5": r["speedup_vs_best_peer"] >= 1.5,
    }


def _doc(results: dict, args: argparse.Namespace, host: dict, target) -> dict:  # type: ignore[no-untyped-def]
    goals = {name: goals_of(r) for name, r in results.items()}
    return {
        "results": results,
        "goals_met": goals,
        "target": target.key,
        "budget": (
            f"reduced for a shared, loaded 2-core host: {args.train_images} training images, "
            f"{args.train_epochs} training epochs, {args.finetune_epochs} fine-tuning epoch(s), "
            f"{args.episodes} DDPG episodes ({args.warmup} random), {args.levels} widths per "
            "group; a full run would use 300 episodes and several fine-tuning epochs"
        ),
        "settings": vars(args),
        "machine": host,
    }


if __name__ == "__main__":
    raise SystemExit(main())
