"""The main job: LUT -> latency model -> search -> baselines -> prune (AMC) -> quantize (HAQ) ->
compile -> verify, then the report.

    from codesign.pipeline import load_config, run
    result = run(load_config("codesign.toml"), "out/")   # or run(None, "out/"): embedded default
    print(result.summary["artifact"]["latency_ms"], result.report_html)

Each stage (`codesign.pipeline.stages`) is a function of (config, upstream outputs) run through
the stage cache (`codesign.pipeline.cache.StageRunner`), so a re-run skips what is done, resumes
what was interrupted, and redoes what a changed input invalidates. The search runs for the first
target; the shipped artifact (the quantised network when [compress] methods has haq) is
compiled, checked and measured on every target in [target] targets (remote ones through their
RPC tracker). Layout of OUT:

    lut.sqlite           LUT + whole-network measurements + MetaSchedule records (shared)
    stages/<name>.json   each stage's inputs digest and outputs;  stages/<name>/  its files
    model.tar            the artifact of the first target (model-<target key>.tar for others)
    report.md, report.html, summary.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from codesign.pipeline.cache import StageRunner, digest_of
from codesign.pipeline.config import PipelineConfig, compress_compat
from codesign.pipeline.stages import (
    db_path,
    latency_budget,
    stage_baselines,
    stage_compile,
    stage_latency,
    stage_lut,
    stage_prune,
    stage_quantize,
    stage_search,
    stage_verify,
)

STAGES = (
    "lut", "latency", "search", "baselines", "prune", "quantize", "compile", "verify"
)  # fmt: skip


@dataclass(frozen=True)
class PipelineResult:
    out: Path
    artifact: Path
    report_md: Path
    report_html: Path
    summary: dict[str, Any]


def run(
    config: PipelineConfig | None = None, out: str | Path = "out", *, progress: bool = True
) -> PipelineResult:
    """Run (or resume) the whole pipeline into `out`; see the module docstring."""
    from codesign.pipeline.report import write_report

    cfg = (config or PipelineConfig()).validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    db = db_path(cfg, out)
    runner = StageRunner(out, total=len(STAGES) - 1 + len(cfg.target.targets))
    with runner.stop_on_signals():
        summary = _stages(cfg, out, db, runner, progress)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md, html = write_report(out, cfg, summary)
    return PipelineResult(out, Path(summary["artifact"]["path"]), md, html, summary)


def _stages(
    cfg: PipelineConfig, out: Path, db: Path, runner: StageRunner, progress: bool
) -> dict[str, Any]:
    """The DAG: each stage's cache inputs are the config keys it reads and the digests of the
    upstream outputs it uses."""
    from codesign.targets import parse_target

    main_target = cfg.target.targets[0]
    lut = runner.run(
        "lut",
        {"cfg": cfg.digest("task", "lut"), "target": main_target, "db": str(db)},
        lambda work: stage_lut(cfg, db, progress),
    )
    lat = runner.run(
        "latency",
        {"lut": digest_of(lut), "cfg": cfg.digest("latency")},
        lambda work: stage_latency(cfg, db, work, progress),
    )
    budget = latency_budget(cfg, lat["model"], db)
    up = {"latency": lat["digest"], "budget": budget["budget_ms"]}
    srch = runner.run(
        "search",
        {**up, "cfg": cfg.digest("search", "task"), "measure": cfg.latency.measure_uncertain},
        lambda work: stage_search(cfg, db, lat["model"], budget["budget_ms"], work, progress),
    )
    base = runner.run(
        "baselines",
        {
            "lut": digest_of(lut),
            "task": cfg.digest("task"),
            "recipe": [cfg.search.retrain_epochs, cfg.search.batch_size, cfg.search.baselines],
        },
        lambda work: stage_baselines(cfg, db, work, progress),
    )
    pruned = runner.run(
        "prune",
        {
            **up,
            "search": digest_of(srch),
            "amc": cfg.compress.amc_keys(),
            "measure": cfg.latency.measure_uncertain,
        },
        lambda work: stage_prune(cfg, srch, db, lat["model"], work, progress),
    )
    quant = runner.run(
        "quantize",
        {
            "prune": digest_of(pruned),
            "target": main_target,
            "lut": cfg.digest("lut"),
            "haq": cfg.compress.haq_keys(),
        },
        lambda work: stage_quantize(cfg, pruned, db, work, progress),
    )
    shipped: dict[str, Any] = {}
    for i, target in enumerate(cfg.target.targets):
        key = parse_target(target).key
        name = "compile" if i == 0 else f"compile-{key}"
        path = out / ("model.tar" if i == 0 else f"model-{key}.tar")
        shipped[target] = runner.run(
            name,
            {"model": digest_of(quant), "target": target, "cfg": cfg.digest("compile", "lut")},
            lambda work, t=target, p=path: stage_compile(
                cfg, quant["model_dir"], db, t, p, progress
            ),
        )
    first = shipped[main_target]
    ver = runner.run(
        "verify",
        {"artifact": first["sha256"], "baselines": digest_of(base)},
        lambda work: stage_verify(
            first["artifact"],
            quant["float_model_dir"],  # peers run the float network (what ships without HAQ)
            base["points"],
            budget["budget_ms"],
            work,
            space=cfg.task.space,
            seed=cfg.task.seed,
        ),
    )
    return {
        "config": cfg.to_dict(),
        "budget": budget,
        "lut": lut["report"],
        "latency": {k: v for k, v in lat.items() if k != "digest"},
        "search": {**srch["report"], "latency_counts": srch.get("latency_counts")},
        "baselines": base["points"],
        "compress": {"methods": list(cfg.compress.methods), "steps": _steps(srch, pruned, quant)},
        "prune": pruned,
        "quantize": quant,
        "artifacts": shipped,
        "artifact": {
            "path": first["artifact"],
            "latency_ms": (first["manifest"]["latency"] or {}).get("median_ms"),
            "accuracy": (first["manifest"]["accuracy"] or {}).get("top1"),
            "accuracy_n": (first["manifest"]["accuracy"] or {}).get("n"),
        },
        "verify": ver,
        "stages": {"ran": runner.ran, "skipped": runner.skipped},
    }


def _steps(srch: dict[str, Any], pruned: dict[str, Any], quant: dict[str, Any]) -> list[dict]:
    """Accuracy (%) and measured latency (ms) after each step that ran, the searched network
    first; `measured_by` says where the latency comes from."""
    rep = srch["report"]
    steps = [
        {
            "step": "search",
            "acc": rep["accuracy"],
            "measured_ms": rep["measured_ms"],
            "measured_by": "compiled like the LUT's networks, timed on the target",
        }
    ]
    for name, out in (("prune (amc)", pruned), ("quantize (haq)", quant)):
        if out.get("method"):
            steps.append({"step": name, **out["after"], "policy": out.get("policy")})
    return steps


def with_overrides(cfg: PipelineConfig, **sections: dict[str, Any]) -> PipelineConfig:
    """`cfg` with some keys of some sections replaced, e.g. search={"epochs": 1} (the old
    compress={"method": ...} is mapped onto `methods`, as in a TOML file)."""
    for name, values in sections.items():
        if name == "compress":
            values = compress_compat(values)
            if "methods" in values:
                values = {**values, "methods": tuple(values["methods"])}
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg.validate()
