"""`codesign search` (hardware-aware architecture search) and `codesign netconfig`."""

from __future__ import annotations

import argparse
import json

from codesign.cli.argtypes import non_negative_int, positive_float, positive_int
from codesign.search.settings import ESTIMATORS, FORMS, STRATEGIES, SearchSettings, default

# flags that are `SearchSettings` fields: their defaults come from there (one home)
_SETTINGS = {
    "strategy", "epochs", "warmup_epochs", "retrain_epochs", "estimator", "loss", "batch_size",
    "lr", "arch_lr", "population", "generations", "repeat", "min_repeat_ms", "seed",
}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search an architecture for a target under a latency budget, retrain it, measure it",
        description="ProxylessNAS (or evolutionary) search on a dataset with a latency loss from "
        "the LUT, then the final network is measured through TVM and retrained from scratch. "
        "Re-running the same command resumes; OUT gets arch.json, model.json + weights.pt and "
        "report.json.",
    )
    p.add_argument("--space", required=True, help="search space (see `codesign spaces`)")
    p.add_argument("--target", required=True, help="target spec, e.g. x86 or x86:threads=1")
    p.add_argument("--latency-ms", type=positive_float, required=True, help="latency target in ms")
    p.add_argument(
        "--dataset",
        default="mnist5k",
        help="mnist5k, digits, an image folder ROOT/<class>/*.png or a CIFAR-10 batch directory",
    )
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--strategy", choices=STRATEGIES, default=default("strategy"))
    p.add_argument(
        "--epochs", type=positive_int, default=default("epochs"), help="supernet training epochs"
    )
    p.add_argument(
        "--warmup-epochs",
        type=non_negative_int,
        default=default("warmup_epochs"),
        help="default: epochs // 4",
    )
    p.add_argument(
        "--retrain-epochs",
        type=non_negative_int,
        default=default("retrain_epochs"),
        help="default: --epochs; 0: no retraining",
    )
    p.add_argument("--db", default=None, help="LUT file (default OUT/lut.sqlite; built if needed)")
    p.add_argument(
        "--latency-model", default=None, help="fitted model (`codesign latency fit`); default: LUT"
    )
    p.add_argument("--estimator", choices=ESTIMATORS, default=default("estimator"))
    p.add_argument(
        "--loss",
        choices=FORMS,
        default=default("loss"),
        help="mul: 0.2*CE*(log E/log T)^0.3 (ProxylessNAS); add: CE + 0.5*(E/T - 1); "
        "hinge: CE + 0.5*max(E/T - 1, 0) (only latency over the target costs)",
    )
    p.add_argument("--batch-size", type=positive_int, default=default("batch_size"))
    p.add_argument("--lr", type=float, default=default("lr"), help="weight learning rate")
    p.add_argument(
        "--arch-lr", type=float, default=default("arch_lr"), help="architecture learning rate"
    )
    p.add_argument(
        "--population",
        type=positive_int,
        default=default("population"),
        help="evolution population",
    )
    p.add_argument(
        "--generations",
        type=positive_int,
        default=default("generations"),
        help="evolution generations",
    )
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=default("repeat"),
        help="timed samples per measurement",
    )
    p.add_argument(
        "--min-repeat-ms",
        type=non_negative_int,
        default=default("min_repeat_ms"),
        help="minimum ms per sample",
    )
    p.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="PyTorch threads for training (default: PyTorch's; 1 is faster on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "netconfig",
        help="convert between ProxylessNAS net.config JSON and architecture strings",
    )
    p.add_argument(
        "source",
        help="a net.config JSON file, a published net (proxyless_mobile, proxyless_cpu, "
        "proxyless_gpu; reconstructed from the published tables), or an architecture string",
    )
    p.add_argument("--space", default=None, help="space to import into (default: the one it fits)")
    p.add_argument("--out", default=None, help="write the net.config of the architecture here")
    p.set_defaults(func=_netconfig)


def _search(args: argparse.Namespace) -> int:
    from codesign.cli.argtypes import check_out_dir, check_text_file

    check_out_dir(args.out)
    check_text_file(args.latency_model, "latency model")
    from codesign.search.run import SearchJob, run_search_job

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    job = SearchJob(
        space=args.space,
        target=args.target,
        latency_ms=args.latency_ms,
        dataset=args.dataset,
        db=args.db,
        latency_model=args.latency_model,
        settings=SearchSettings(**{name: getattr(args, name) for name in _SETTINGS}),
    )
    report = run_search_job(job, args.out, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        acc = report["accuracy"]
        files = "arch.json, model.json, weights.pt" if acc is not None else "arch.json"
        print(
            f"{report['arch']}\n  accuracy "
            f"{'not retrained' if acc is None else f'{acc:.2f}%'}  predicted "
            f"{report['predicted_ms']:.4g} ms  measured {report['measured_ms']:.4g} ms  target "
            f"{report['latency_target_ms']:g} ms {'met' if report['target_met'] else 'MISSED'}\n"
            f"  wrote {args.out}/{files}, report.json"
        )
    return 0


def _no_space_message(body: str) -> str:
    """An architecture string given without its space: say what a valid one looks like."""
    from codesign.arch import Arch
    from codesign.search.space import list_spaces

    fits = []
    for space in list_spaces():
        try:
            space.validate(Arch.decode(f"{space.name}:{body}"))
            fits.append(space.name)
        except Exception:  # noqa: BLE001 - this space does not take it
            continue
    example = f"{fits[0] if fits else 'tiny'}:{body}"
    hint = (
        f"it fits space(s) {', '.join(fits)}: "
        if fits
        else "it fits no registered space (`codesign spaces` lists their layers): "
    )
    return (
        f"{body!r} is neither a file nor a published net; an architecture string starts with "
        f"its space, SPACE:OPS with blocks joined by '-' and stages by '_', e.g. {example}; "
        f"{hint}give that, or add --space SPACE"
    )


def _netconfig(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from codesign.arch import Arch
    from codesign.cli.argtypes import check_text_file
    from codesign.errors import ArchError
    from codesign.search.netconfig import PUBLISHED, export_netconfig, load_netconfig
    from codesign.search.space import get_space

    src = args.source
    if src not in PUBLISHED:
        check_text_file(src, "net.config")
    if src not in PUBLISHED and ":" not in src and not Path(src).exists():
        if args.space:
            src = f"{args.space}:{src}"
        elif re.fullmatch(r"[A-Za-z0-9]+([-_][A-Za-z0-9]+)+", src):
            raise ArchError(_no_space_message(src))
    if src not in PUBLISHED and ":" in src and not Path(src).exists():
        arch = Arch.decode(src)
        space = get_space(args.space or arch.space)
        space.validate(arch)
    else:
        space, arch = load_netconfig(src, args.space)
    print(arch.encode())
    if args.out:
        Path(args.out).write_text(json.dumps(export_netconfig(space, arch), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
