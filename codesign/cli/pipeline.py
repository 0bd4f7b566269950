"""`codesign pipeline`: the main job, end to end (see codesign.pipeline)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="LUT -> latency model -> search -> prune -> quantize -> compile -> verified "
        "artifact + report",
        description="Run (or resume) the whole co-design job into OUT: every stage is cached, a "
        "re-run skips finished stages and redoes those whose inputs changed. Without --config "
        "the embedded default runs: the tiny space on mnist5k for this machine's x86 CPU, searched, "
        "pruned (AMC) and quantised (HAQ) (9-16 minutes on 2 cores: a noisy host gets more passes).",
    )
    p.add_argument("--config", default=None, help="TOML file (see --show-config for the keys)")
    p.add_argument("--out", default=None, help="output directory (artifact, report, caches)")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the effective configuration as TOML and exit (a starting point for a file)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pipeline)


def _pipeline(args: argparse.Namespace) -> int:
    from codesign.cli.argtypes import check_out_dir, check_text_file
    from codesign.pipeline.config import ConfigError, load_config, to_toml

    check_text_file(args.config, "config file")
    if args.out:
        check_out_dir(args.out)
    cfg = load_config(args.config)
    if args.show_config:
        print(to_toml(cfg), end="")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required (where the artifact and the report go)")
    from codesign.pipeline.run import run

    res = run(cfg, args.out, progress=not args.no_progress)
    art, search = res.summary["artifact"], res.summary["search"]
    print(f"architecture  {search['arch']}")
    print(
        f"budget        {res.summary['budget']['budget_ms']:.4g} ms; searched network "
        f"{search['measured_ms']:.4g} ms measured, {search['accuracy']:.2f}% val"
    )
    for step in res.summary["compress"]["steps"][1:]:
        acc = "–" if step.get("acc") is None else f"{step['acc']:.2f}%"
        ms = "–" if step.get("measured_ms") is None else f"{step['measured_ms']:.4g} ms"
        print(f"{step['step']:<14} {ms} measured, {acc} val")
    lat = f"{art['latency_ms']:.4g} ms" if art["latency_ms"] is not None else "not measured"
    acc = f"{art['accuracy']:.2f}%" if art["accuracy"] is not None else "–"
    print(f"artifact      {res.artifact}: {lat}, {acc} (compiled, val)")
    print(f"report        {res.report_html}")
    return 0
