"""`codesign prune`: AMC channel pruning of a model directory under a latency budget."""

from __future__ import annotations

import argparse

from codesign.cli.argtypes import non_negative_int, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune channels (AMC, DDPG) under a latency budget, fine-tune, compile and measure",
        description="Search per-layer kept-channel ratios with the DDPG agent so that the "
        "latency model's prediction meets --latency-ms, prune, fine-tune, save OUT as a model "
        "directory, time the compiled network against the original and compile OUT into the "
        "artifact OUT/model.tar (as `codesign compile` does). Re-run the same command to resume.",
    )
    p.add_argument("--model", required=True, help="model directory (model.json + weights.pt)")
    p.add_argument("--target", required=True, help="target spec, e.g. x86")
    p.add_argument("--latency-ms", type=positive_float, required=True, help="latency budget in ms")
    p.add_argument("--dataset", required=True, help="mnist5k, digits, or a dataset path")
    p.add_argument("--out", required=True, help="output model directory (also holds checkpoints)")
    p.add_argument(
        "--episodes", type=positive_int, default=300, help="search episodes (default 300)"
    )
    p.add_argument("--db", default=None, help="latency table (LUT) file of the target")
    p.add_argument("--latency-model", default=None, help="fitted latency model (JSON)")
    p.add_argument(
        "--missing",
        choices=("measure", "predict"),
        default=None,  # PruneJob's default (measure): one home for it
        help="pruned block shapes absent from the LUT: measure them through TVM and store them "
        "in the LUT (default), or predict them with a per-block XGBoost model",
    )
    p.add_argument(
        "--trials",
        type=non_negative_int,
        default=0,
        help="tuned LUTs: MetaSchedule trials per task for new block shapes (with --db)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warmup", type=non_negative_int, default=20, help="random episodes before learning"
    )
    p.add_argument("--lbound", type=float, default=0.2, help="smallest kept ratio per unit")
    p.add_argument(
        "--divisor", type=positive_int, default=4, help="kept channels are multiples of this"
    )
    p.add_argument(
        "--mid-only",
        action="store_true",
        help="prune only expanded channels, not block outputs (shortcut groups)",
    )
    p.add_argument("--reward", choices=("acc", "error_log_latency"), default="acc")
    p.add_argument(
        "--reward-images", type=positive_int, default=1000, help="training images per reward"
    )
    p.add_argument(
        "--reconstruct", action="store_true", help="least-squares refit of the next layer"
    )
    p.add_argument("--finetune-epochs", type=non_negative_int, default=5)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--repeat", type=positive_int, default=10, help="timed samples per network")
    p.add_argument("--min-repeat-ms", type=non_negative_int, default=50)
    p.add_argument(
        "--no-measure",
        action="store_true",
        help="do not time the networks (the artifact is checked on a host build for remote "
        "targets)",
    )
    p.add_argument(
        "--no-artifact",
        action="store_true",
        help="do not compile OUT into OUT/model.tar (`codesign compile --model OUT` does it later)",
    )
    p.add_argument("--torch-threads", type=positive_int, default=None, help="PyTorch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    import torch

    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.pipeline import PruneJob, prune_model
    from codesign.compression.ddpg import DDPGConfig
    from codesign.measurement import MeasureProtocol
    from codesign.train import TrainConfig

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    job = PruneJob(
        model=args.model,
        target=args.target,
        budget_ms=args.latency_ms,
        dataset=args.dataset,
        out=args.out,
        db=args.db,
        latency_model=args.latency_model,
        **({} if args.missing is None else {"missing": args.missing}),
        trials=args.trials,
        measure=not args.no_measure,
        artifact=not args.no_artifact,
        protocol=MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
    )
    config = AMCConfig(
        episodes=args.episodes,
        lbound=args.lbound,
        divisor=args.divisor,
        prune_outputs=not args.mid_only,
        reward=args.reward,
        reward_images=args.reward_images,
        reconstruct=args.reconstruct,
        seed=args.seed,
        ddpg=DDPGConfig(warmup_episodes=args.warmup, seed=args.seed),
    )
    finetune = TrainConfig(
        epochs=args.finetune_epochs,
        lr=args.finetune_lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    r = prune_model(job, config, finetune, progress=not args.no_progress)
    print(f"policy: {r['policy']}")
    print(
        f"predicted latency {r['predicted_ms']:.4f} ms (budget {r['budget_ms']:.4f}, unpruned "
        f"{r['base_predicted_ms']:.4f}); best of {r['episodes']} episodes"
    )
    if "measured_ms" in r:
        print(
            f"measured latency {r['measured_ms']:.4f} ms vs {r['base_measured_ms']:.4f} ms "
            f"unpruned: {r['speedup']:.2f}x faster"
        )
    print(
        f"accuracy {r['acc']:.2f}% (unpruned {r['base_acc']:.2f}%, {r['acc_before_finetune']:.2f}% "
        f"before fine-tuning); wrote {args.out}"
    )
    if "artifact" in r:
        a = r["artifact"]
        lat = "" if a["latency_ms"] is None else f", {a['latency_ms']:.4f} ms"
        print(
            f"artifact {args.out}/{a['path']}: equal to PyTorch (max abs error "
            f"{a['max_abs_err']:.2g}){lat}; check it with `codesign verify`"
        )
    return 0
