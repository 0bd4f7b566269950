"""`codesign lut build|show`."""

from __future__ import annotations

import argparse
import json
import math

from codesign.cli.argtypes import add_rpc_timeout, non_negative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    lut = sub.add_parser("lut", help="build and inspect latency lookup tables")
    lsub = lut.add_subparsers(dest="lut_command", metavar="ACTION", required=True)

    p = lsub.add_parser("build", help="measure every block of a space on a target into a LUT")
    p.add_argument("--space", required=True, help="search space name (see `codesign spaces`)")
    p.add_argument("--target", required=True, help="target spec (see `codesign targets`)")
    p.add_argument("--db", required=True, help="LUT file (SQLite); created if missing")
    p.add_argument(
        "--trials",
        type=non_negative_int,
        default=0,
        help="MetaSchedule trials per unique tuning task (default 0: untuned)",
    )
    p.add_argument(
        "--repeat", type=positive_int, default=10, help="timed samples per block (default 10)"
    )
    p.add_argument(
        "--min-repeat-ms",
        type=non_negative_int,
        default=50,
        help="minimum duration of one sample in ms (default 50)",
    )
    p.add_argument(
        "--cache-flush",
        action="store_true",
        help="flush CPU caches before every timed run (weights passed as inputs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and tuning")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N blocks")
    add_rpc_timeout(p, default=None)  # remote targets: the farm jobs' phases
    p.add_argument("--json", action="store_true", help="print the build report as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_build)

    p = lsub.add_parser("show", help="print the entries of a LUT")
    p.add_argument("--db", required=True, help="LUT file")
    p.add_argument("--target", default=None, help="only this target key")
    p.add_argument("--mode", choices=("untuned", "tuned"), default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    from codesign.errors import CodesignError
    from codesign.lut_build import build_lut
    from codesign.measurement import MeasureProtocol
    from codesign.search.space import get_space

    if args.trials < 0:
        raise CodesignError("--trials must be >= 0")
    space = get_space(args.space)
    blocks = space.blocks()[: args.limit] if args.limit else None
    protocol = MeasureProtocol(
        repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, cache_flush=args.cache_flush
    )
    farm = None
    if args.rpc_timeout is not None:
        from codesign.farm.config import load_config
        from codesign.targets import parse_target
        from codesign.tvm_backend.runner import Where

        target = parse_target(args.target)
        if target.is_remote:  # local targets talk to no RPC server: nothing to bound
            cfg = load_config().with_rpc_timeout(args.rpc_timeout)
            farm = Where.of_target(target).farm(config=cfg)
    report = build_lut(
        space,
        args.target,
        args.db,
        trials=args.trials,
        protocol=protocol,
        seed=args.seed,
        blocks=blocks,
        progress=not args.no_progress,
        farm=farm,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"LUT {args.db}: {report.blocks} blocks of {report.space} on {report.target} "
            f"({report.mode}): {report.measured} measured, {report.reused} already valid, "
            f"{len(report.failed)} failed in {report.seconds.get('total', 0):.1f} s"
        )
        if report.mode == "tuned":
            print(
                f"tuning: {report.unique_tasks} unique tasks (of {report.total_tasks} in all "
                f"blocks), {report.tuned_tasks} tuned now, {report.trials_per_task} trials "
                f"each, {report.valid_records} new valid records"
            )
        for f in report.failed:
            print(f"  failed: {f}")
    return 1 if report.failed else 0


def _show(args: argparse.Namespace) -> int:
    from codesign.lut import LatencyTable

    with LatencyTable(args.db, readonly=True) as table:
        entries = table.entries(args.target, args.mode)
        summary = table.summary()
    if args.json:
        print(json.dumps({"summary": summary, "entries": [e.to_dict() for e in entries]}, indent=2))
        return 0
    for s in summary:
        failed = f", {s['failed']} failed" if s["failed"] else ""
        print(f"# {s['table']}: {s['target']} {s['mode']}: {s['count']} entries{failed}")
    if not entries:
        print("(no entries)")
        return 0
    width = max(len(e.key) for e in entries)
    print(f"{'target':<22} {'mode':<8} {'block':<{width}} {'median ms':>10} {'std ms':>8} {'n':>3}")
    for e in entries:
        m = e.measurement
        med = "failed" if not m.ok or math.isnan(m.median_ms) else f"{m.median_ms:10.4f}"
        std = "" if not m.ok else f"{m.std_ms:8.4f}"
        print(f"{e.target:<22} {e.mode:<8} {e.key:<{width}} {med:>10} {std:>8} {m.repeats:>3}")
    return 0
