"""`codesign latency fit|eval|predict`."""

from __future__ import annotations

import argparse
import json

from codesign.cli.argtypes import (
    add_rpc_timeout,
    check_text_file,
    non_negative_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    lat = sub.add_parser("latency", help="fit and evaluate whole-network latency models")
    lsub = lat.add_subparsers(dest="latency_command", metavar="ACTION", required=True)

    p = lsub.add_parser("fit", help="measure sampled networks and fit LUT + XGBoost residual")
    p.add_argument("--db", required=True, help="LUT file holding the space's blocks")
    p.add_argument("--space", required=True)
    p.add_argument("--target", required=True)
    p.add_argument(
        "--networks",
        type=positive_int,
        required=True,
        help="sampled networks to measure (already measured ones are reused)",
    )
    p.add_argument("--out", required=True, help="model file to write (JSON)")
    add_rpc_timeout(p, default=None)  # remote targets: the farm jobs' phases
    p.add_argument(
        "--mode",
        choices=("auto", "tuned", "untuned"),
        default="auto",
        help="which LUT entries to use (auto: tuned if complete)",
    )
    p.add_argument(
        "--trials",
        type=non_negative_int,
        default=0,
        help="tuned mode: trials per task for tasks the records lack",
    )
    p.add_argument("--repeat", type=positive_int, default=10, help="timed samples per network")
    p.add_argument(
        "--min-repeat-ms", type=non_negative_int, default=50, help="minimum ms per sample"
    )
    p.add_argument("--test-fraction", type=float, default=0.33)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--adapt",
        metavar="FROM_MODEL",
        default=None,
        help="adapt this model (another target or space) to --target from the --networks "
        "measured there: 5 or more, 10 recommended (without --adapt: 16 or more recommended)",
    )
    p.add_argument(
        "--allow-noisy",
        action="store_true",
        help="keep a model whose held-out error the host's measurement noise explains",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_fit)

    p = lsub.add_parser("eval", help="error figures and a scatter plot on held-out networks")
    p.add_argument("--model", required=True)
    p.add_argument("--db", default=None, help="LUT file (checks the model still matches it)")
    p.add_argument("--plot", default=None, help="PNG path (default: MODEL with .png)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = lsub.add_parser("predict", help="predicted latency of architectures")
    p.add_argument("--model", required=True)
    p.add_argument("arch", nargs="+", help="architecture strings")
    p.set_defaults(func=_predict)


def _fit(args: argparse.Namespace) -> int:
    from codesign.latency.fit import fit_latency_model
    from codesign.latency.model import LatencyModel, resolve_mode
    from codesign.latency.networks import measure_networks, sample_archs
    from codesign.lut import LatencyTable
    from codesign.measurement import MeasureProtocol
    from codesign.search.space import get_space
    from codesign.targets import parse_target

    if args.adapt is not None:
        return _adapt(args)
    space, target = get_space(args.space), parse_target(args.target)
    LatencyModel.from_lut(args.db, space, target, mode=args.mode)  # fails early if LUT lacks blocks
    with LatencyTable(args.db) as table:
        mode = resolve_mode(table, space, target.key, args.mode)
    archs = sample_archs(space, args.networks, args.seed)
    runner = None
    if target.is_remote and args.rpc_timeout is not None:  # the farm jobs' phases, bounded
        from codesign.farm.config import load_config
        from codesign.tvm_backend.runner import Where

        cfg = load_config().with_rpc_timeout(args.rpc_timeout)
        runner = Where.of_target(target).runner(seed=args.seed, config=cfg)
    rep = measure_networks(
        space,
        target,
        args.db,
        archs,
        mode=mode,
        trials=args.trials,
        protocol=MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
        seed=args.seed,
        runner=runner,
        progress=not args.no_progress,
    )
    print(
        f"networks: {rep.measured} measured, {rep.reused} reused, {len(rep.failed)} failed "
        f"({rep.seconds:.0f} s)"
    )
    model, report = fit_latency_model(
        args.db,
        space,
        target,
        mode=mode,
        archs=archs,
        test_fraction=args.test_fraction,
        seed=args.seed,
        trials=args.trials,
        allow_noisy=args.allow_noisy,
    )
    model.save(args.out)
    print(
        f"fitted on {report.n_train} networks ({mode} LUT, residual form {report.form}); "
        f"held out {report.n_test}: wrote {args.out}"
    )
    _print_table(report.test)
    _print_noise(report.noise_floor, report.test["lut_xgb"]["rmspe"])
    return 0


def _print_noise(noise_floor: float | None, rmspe: float) -> None:
    floor = "unknown (the LUT records none)" if noise_floor is None else f"{noise_floor:.2%}"
    print(f"held-out RMSPE {rmspe:.2%}; host noise floor {floor}")


def _adapt(args: argparse.Namespace) -> int:
    from codesign.latency.adapt import adapt_latency_model
    from codesign.measurement import MeasureProtocol

    check_text_file(args.adapt, "latency model")
    res = adapt_latency_model(
        source=args.adapt,
        db=args.db,
        target=args.target,
        space=args.space,
        networks=args.networks,
        mode=args.mode,
        trials=args.trials,
        seed=args.seed,
        protocol=MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
        allow_noisy=args.allow_noisy,
        progress=not args.no_progress,
    )
    res.model.save(args.out)
    print(
        f"adapted {res.source} to {res.target_key} from {res.n_target} networks "
        f"({'prior kept' if res.used_prior else 'prior rejected by leave-one-out'}): "
        f"wrote {args.out}"
    )
    if res.held_out:
        _print_table(res.held_out)
        _print_noise(res.noise_floor, res.held_out["adapted"]["rmspe"])
    else:
        print("no other networks measured on this target: nothing held out to score")
    return 0


def _print_table(results: dict) -> None:
    print(f"{'method':<14}{'RMSPE':>8}{'MAPE':>8}{'±5%':>8}{'±10%':>8}")
    for name, m in results.items():
        print(
            f"{name:<14}{m['rmspe'] * 100:>7.2f}%{m['mape'] * 100:>7.2f}%"
            f"{m['within5'] * 100:>7.1f}%{m['within10'] * 100:>7.1f}%"
        )


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from codesign.latency.fit import held_out
    from codesign.latency.model import LatencyModel
    from codesign.latency.plot import scatter
    from codesign.latency.regress import metrics

    check_text_file(args.model, "latency model")
    model = LatencyModel.load(args.model, args.db)
    archs, meas, preds = held_out(model, args.db)
    results = {k: metrics(v, meas) for k, v in preds.items()}
    plot = Path(args.plot) if args.plot else Path(args.model).with_suffix(".png")
    scatter(
        plot,
        meas,
        {k: preds[k] for k in ("lut_only", "lut_xgb")},
        f"{model.space.name} on {model.target_key} ({model.mode}), {len(archs)} held-out nets",
    )
    if args.json:
        out = {"n_test": len(archs), "results": results, "plot": str(plot)}
        print(json.dumps({**out, "noise_floor": model.noise_floor}, indent=2))
    else:
        print(f"{len(archs)} held-out networks of {model.space.name} on {model.target_key}")
        _print_table(results)
        _print_noise(model.noise_floor, results["lut_xgb"]["rmspe"])
        print(f"scatter plot: {plot}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from codesign.latency.model import LatencyModel

    check_text_file(args.model, "latency model")
    model = LatencyModel.load(args.model)
    for text in args.arch:
        arch = model.space.decode(text)
        print(f"{model.predict(arch):.4f} ms  (LUT sum {model.lut_sum(arch):.4f})  {arch}")
    return 0
