"""`codesign compress`: prune, quantize and compile your own trained CNN under a latency budget."""

from __future__ import annotations

import argparse

from codesign.cli.argtypes import non_negative_int, positive_float, positive_int


def _chw(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x64x64, got {text!r}")
    return shape  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="prune (AMC), quantize (HAQ) and compile your own trained CNN under a latency budget",
        description="Prune the channel groups torch-pruning finds in MODEL (AMC with the DDPG "
        "agent; layers measured with TVM into the LUT file on demand, the whole network "
        "measured to calibrate), fine-tune, quantize (HAQ for any CNN, when installed), and "
        "compile the result into the verified artifact OUT/model.tar. OUT/compress.json and "
        "OUT/compress.md list accuracy and measured latency after each step. Re-run the same "
        "command to resume.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="an ONNX file (its CNN is rebuilt in PyTorch for pruning) or "
        "'importable.module:factory' (with --weights state_dict.pt)",
    )
    p.add_argument("--weights", default=None, help="state_dict (.pt) for a module:factory model")
    p.add_argument(
        "--input-shape",
        type=_chw,
        default=None,
        help="CxHxW, e.g. 3x64x64 (default: the ONNX file's; required for module:factory)",
    )
    p.add_argument(
        "--latency-ms",
        type=positive_float,
        required=True,
        help="latency budget in ms, measured with TVM on --target",
    )
    p.add_argument("--dataset", required=True, help="mnist5k, digits, or a dataset path")
    p.add_argument("--target", default="x86", help="target spec")
    p.add_argument("--out", required=True, help="output directory (reports, artifact, checkpoints)")
    p.add_argument("--db", default=None, help="LUT file (default: OUT/lut.sqlite)")
    p.add_argument("--episodes", type=positive_int, default=30, help="AMC search episodes")
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=10,
        help="random episodes before the agent learns",
    )
    p.add_argument("--levels", type=positive_int, default=8, help="widths per channel group")
    p.add_argument("--lbound", type=float, default=0.25, help="smallest kept ratio per group")
    p.add_argument("--reward-images", type=positive_int, default=1000)
    p.add_argument("--finetune-epochs", type=non_negative_int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--missing", choices=("measure", "scale"), default="measure",
                   help="layer shapes the LUT lacks: measure them with TVM, or scale the "
                   "unpruned layer's time by MACs")  # fmt: skip
    p.add_argument("--no-quantize", action="store_true", help="skip the HAQ step")
    p.add_argument("--max-quant-drop", type=float, default=0.5,
                   help="most accuracy points the quantized network may lose against the pruned "
                   "one and still ship (it must also measure faster)")  # fmt: skip
    p.add_argument(
        "--device",
        default=None,
        help="fine-tuning device, e.g. cpu or cuda (default: cuda when present)",
    )
    p.add_argument("--repeat", type=positive_int, default=10, help="timed samples per network")
    p.add_argument("--min-repeat-ms", type=non_negative_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    import sys

    from codesign.compression.compress import CompressSettings, compress
    from codesign.measurement import MeasureProtocol

    settings = CompressSettings(
        latency_ms=args.latency_ms, dataset=args.dataset, out=args.out, target=args.target,
        input_shape=args.input_shape, weights=args.weights, db=args.db, episodes=args.episodes,
        warmup=args.warmup, levels=args.levels, lbound=args.lbound,
        reward_images=args.reward_images, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, missing=args.missing, quantize=not args.no_quantize,
        device=args.device, seed=args.seed, max_quant_drop=args.max_quant_drop,
        protocol=MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
    )  # fmt: skip
    rep = compress(args.model, settings=settings, progress=not args.no_progress,
                   log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    print(rep.markdown())
    print(f"wrote {args.out}/compress.json and {args.out}/compress.md")
    return 0
