"""`codesign quantize`: HAQ mixed-precision quantisation compiled to a real TVM module."""

from __future__ import annotations

import argparse
import json

from codesign.cli.argtypes import non_negative_int, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="HAQ: per-layer bits chosen by a DDPG agent under a latency or size budget, "
        "compiled to a mixed-precision TVM module",
    )
    p.add_argument("--model", required=True, help="model directory (model.json + weights.pt)")
    p.add_argument("--target", required=True, help="target spec (see `codesign targets`)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--latency-ms", type=positive_float, help="latency budget (ms, from the LUT)"
    )
    budget.add_argument("--size-mb", type=positive_float, help="model size budget (MiB, exact)")
    p.add_argument("--dataset", required=True, help="mnist5k | digits | PATH (fine-tune, reward)")
    p.add_argument("--out", required=True, help="output directory (re-run to resume)")
    p.add_argument("--episodes", type=positive_int, default=60, help="search episodes (default 60)")
    p.add_argument(
        "--warmup", type=non_negative_int, default=20, help="random warm-up episodes (default 20)"
    )
    p.add_argument(
        "--trials",
        type=non_negative_int,
        default=0,
        help="MetaSchedule trials per task for the LUT and the module (default 0: untuned)",
    )
    p.add_argument(
        "--qat-images", type=positive_int, default=1000, help="fine-tune images per episode"
    )
    p.add_argument(
        "--final-qat-images", type=positive_int, default=4000, help="final fine-tune images"
    )
    p.add_argument(
        "--val-images", type=positive_int, default=500, help="validation images for rewards"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from codesign.compression.ddpg import DDPGConfig
    from codesign.compression.haq.pipeline import QuantizeConfig, quantize_model
    from codesign.compression.quant.qat import QATConfig
    from codesign.errors import CodesignError

    for name in ("episodes", "qat_images", "val_images"):
        if getattr(args, name) < 1:
            raise CodesignError(f"--{name.replace('_', '-')} must be >= 1")
    if args.trials < 0 or args.warmup < 0:
        raise CodesignError("--trials and --warmup must be >= 0")
    kind, budget = (
        ("latency", args.latency_ms) if args.latency_ms is not None else ("size", args.size_mb)
    )
    if budget is None or not budget > 0:
        raise CodesignError(f"the {kind} budget must be positive, got {budget}")
    cfg = QuantizeConfig(
        kind,
        budget,
        episodes=args.episodes,
        trials=args.trials,
        seed=args.seed,
        val_images=args.val_images,
        search_qat=QATConfig(images=args.qat_images, seed=args.seed),
        final_qat=QATConfig(images=args.final_qat_images, epochs=2, seed=args.seed),
        ddpg=DDPGConfig(warmup_episodes=min(args.warmup, args.episodes), seed=args.seed),
    )
    res = quantize_model(
        args.model, args.out, args.target, args.dataset, cfg, progress=not args.no_progress
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    unit = res["search"]["unit"]
    print(f"policy   {res['policy']}")
    print(
        f"accuracy {res['acc']:.2f}% compiled on {res['val_images']} images "
        f"(fake-quant {res['acc_fakequant']:.2f}%)"
    )
    print(
        f"latency  {res['ms']:.4f} ms measured ({res['lut_ms']:.4f} ms LUT sum); "
        f"size {res['size_mb']:.4f} MiB; budget {res['search']['budget']:g} {unit}"
    )
    art = res["artifact"]
    if art["ms"] is not None:
        print(f"artifact {art['path']}: {art['ms']:.4f} ms, {art['acc']:.2f}% (verified)")
    print(f"wrote    {args.out}/model.tar, model/, policy.json, result.json")
    return 0
