"""The pipeline's report: DIR/report.md (figures as PNG files beside it) and DIR/report.html
(self-contained: figures embedded as base64, no scripts, no network), from summary.json."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from codesign.pipeline import plots
from codesign.pipeline.compress import MAX_GAIN, MIN_GAIN
from codesign.pipeline.config import PipelineConfig


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _figures(out: Path, cfg: PipelineConfig, s: dict[str, Any]) -> dict[str, Path]:
    from codesign.search.space import get_space

    figs: dict[str, Path] = {}
    fig_dir = out / "figures"
    space = get_space(cfg.task.space)
    search = s["search"]
    figs["arch"] = plots.draw_arch(space, space.decode(search["arch"]), fig_dir / "arch.png")
    points = [
        {"label": p["label"], "acc": p["acc"], "ms": p["ms"], "kind": "baseline"}
        for p in s["baselines"]
    ]
    points.append(
        {
            "label": "searched",
            "acc": search["accuracy"],
            "ms": search["measured_ms"],
            "kind": "searched",
        }
    )
    art = s["artifact"]
    if art["latency_ms"] is not None and art["accuracy"] is not None:
        methods = "+".join(s["compress"]["methods"])
        points.append(
            {
                "label": f"artifact ({methods})" if methods else "artifact",
                "acc": art["accuracy"],
                "ms": art["latency_ms"],
                "kind": "shipped",
            }
        )
    figs["pareto"] = plots.pareto(points, fig_dir / "pareto.png", s["budget"]["budget_ms"])
    scatter = s["latency"].get("scatter")
    if scatter and Path(scatter).exists():
        figs["scatter"] = Path(scatter)
    for step in ("prune", "quantize"):
        policy = s[step].get("per_layer")
        if policy:
            figs[f"{step}_policy"] = plots.per_layer(
                policy["values"],
                policy["labels"],
                fig_dir / f"{step}_policy.png",
                policy["ylabel"],
                policy["title"],
            )
    return figs


def _markdown(cfg: PipelineConfig, s: dict[str, Any], figs: dict[str, Path], out: Path) -> str:
    search, art, budget = s["search"], s["artifact"], s["budget"]
    rel = {k: v.relative_to(out) if v.is_relative_to(out) else v for k, v in figs.items()}
    best_base = [p for p in s["baselines"] if p["ms"] <= budget["budget_ms"]]
    lines = [
        f"# codesign report: {cfg.task.space} on {cfg.task.dataset} for {search['target']}",
        "",
        "## Result",
        "",
        _table(
            ["item", "value"],
            [
                ["architecture", f"`{search['arch']}`"],
                ["latency budget (ms)", budget["budget_ms"]],
                [
                    "searched: predicted / measured (ms)",
                    f"{_f(search['predicted_ms'])} / {_f(search['measured_ms'])}",
                ],
                ["searched: validation accuracy (%)", search["accuracy"]],
                ["compression", " then ".join(s["compress"]["methods"]) or "none"],
                ["shipped artifact: measured latency (ms)", art["latency_ms"]],
                ["shipped artifact: accuracy, compiled (%)", art["accuracy"]],
                ["re-loaded with the plain runtime (ms)", s["verify"]["reloaded_ms"]],
                [
                    "per call from Python (ms; overhead over the runtime's timer)",
                    _per_call(s["verify"]),
                ],
                [
                    "best baseline within budget",
                    max(best_base, key=lambda p: p["acc"])["label"] if best_base else "none",
                ],
            ],
        ),
        "",
        _budget_note(cfg, budget),
        "",
        _accuracy_note(art),
        "",
        *_peer_lines(s),
        f"![architecture]({rel['arch']})",
        "",
        "Each bar is a searchable layer: height = expansion, colour = kernel, hatched = skipped.",
        "",
        "## Accuracy vs measured latency",
        "",
        f"![pareto]({rel['pareto']})",
        "",
        _table(
            ["network", "accuracy (%)", "measured ms", "within budget"],
            [
                [p["label"], p["acc"], p["ms"], "yes" if p["ms"] <= budget["budget_ms"] else "no"]
                for p in s["baselines"]
            ]
            + [
                [
                    "searched",
                    search["accuracy"],
                    search["measured_ms"],
                    "yes" if search["target_met"] else "no",
                ]
            ],
        ),
        "",
        "Baselines are uniform networks of the space trained with the searched network's recipe; "
        "every latency is measured on the target with the compiler and tuning records that build "
        "the artifact.",
        "",
        "## Latency model",
        "",
    ]
    lat = s["latency"]
    if lat.get("fitted"):
        rows = [
            [name, m["rmspe"] * 100, m["mape"] * 100, m["within5"] * 100, m["within10"] * 100]
            for name, m in lat["held_out"].items()
        ]
        lines += [
            f"Fitted on {lat['fit']['n_train']} measured networks, held out "
            f"{lat['fit']['n_test']} (residual form: {lat['fit']['form']}).",
            "",
            _table(["method", "RMSPE %", "MAPE %", "±5 %", "±10 %"], rows),
            "",
        ]
        noise = lat["fit"].get("noise_floor")
        if noise:
            lines += [
                f"Noise floor of this host: one network measured 7 times as the LUT's entries "
                f"are (each a pool of passes apart in time) spreads by {noise * 100:.1f}% "
                "(p90 - p10); held-out errors of that size are measurement noise as much as "
                "model error ([latency] allow_noisy = false refuses such a model).",
                "",
            ]
        nets = lat.get("networks", {})
        if nets.get("passes"):
            lines += [
                f"The networks were measured in {nets['passes']} passes over the batch: "
                f"{(nets.get('slow_share') or 0) * 100:.0f}% of the runs fell in slow phases of "
                "the host (1.3-1.7x), and a noisier host gets more passes, so that all runs of "
                "a network fall in slow ones with a chance of 5% at most.",
                "",
            ]
        if "scatter" in rel:
            lines += [f"![latency model]({rel['scatter']})", ""]
    else:
        lines += ["LUT sum only (no whole networks measured: [latency] networks = 0).", ""]
    lines += _compression_lines(s, rel)
    lines += ["## Artifacts", ""]
    rows = []
    for target, a in s["artifacts"].items():
        m = a["manifest"]
        lat_ms = (m.get("latency") or {}).get("median_ms")
        acc = (m.get("accuracy") or {}).get("top1")
        eq = m.get("equality") or {}
        rows.append(
            [target, Path(a["artifact"]).name, a["sha256"], lat_ms, acc, eq.get("max_abs_err")]
        )
    lines += [
        _table(
            ["target", "file", "sha256 (16)", "latency ms", "accuracy %", "max abs diff vs torch"],
            rows,
        ),
        "",
        "Load with `codesign.load(path)` or `codesign run`; `codesign verify` checks the hashes.",
        "",
        "## Provenance",
        "",
    ]
    first = next(iter(s["artifacts"].values()))["manifest"]
    lines += [
        _table(
            ["item", "value"],
            [
                [
                    "TVM",
                    f"{first['tvm']['version']} (ffi {first['tvm']['ffi_version']}, "
                    f"pipeline {first['tvm']['pipeline']})",
                ],
                ["target", f"`{first['target'].get('spec', search['target'])}`"],
                [
                    "tuning",
                    f"{cfg.lut.trials} MetaSchedule trials per task"
                    if cfg.lut.trials
                    else "none: analytic schedules (register tiles from the ISA, no search)",
                ],
                [
                    "measurement",
                    f"median of {cfg.lut.repeat} samples, >= {cfg.lut.min_repeat_ms} ms each",
                ],
                ["seed", cfg.task.seed],
                ["host (CPU, threads, load average 1/5/15 min)", _host(s)],
                [
                    "stages run / skipped",
                    f"{', '.join(s['stages']['ran']) or '–'} / "
                    f"{', '.join(s['stages']['skipped']) or '–'}",
                ],
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def _compression_lines(s: dict[str, Any], rel: dict[str, Path]) -> list[str]:
    """Accuracy and measured latency after each step (search, prune, quantize), the policies."""
    comp = s["compress"]
    lines = ["## Compression", ""]
    if not comp["methods"]:
        lines += ["None ([compress] methods = []): the searched network is shipped.", ""]
    by_step = {"prune (amc)": s.get("prune") or {}, "quantize (haq)": s.get("quantize") or {}}
    rows = []
    for st in comp["steps"]:
        pair = by_step.get(st["step"], {})
        before = (pair.get("before") or {}).get("measured_ms")
        after = (pair.get("after") or {}).get("measured_ms")
        change = f"{after / before - 1:+.1%}" if before and after else "–"
        rows.append([st["step"], st.get("acc"), st.get("measured_ms"), change])
    art = s["artifact"]
    rows.append(["shipped artifact (compiled)", art["accuracy"], art["latency_ms"], "–"])
    lines += [
        _table(["after step", "accuracy (%)", "measured ms", "vs the network before it"], rows),
        "",
        "Search and prune accuracies are PyTorch's on the validation split; quantize and the "
        "artifact are the compiled module's (quantize on [compress] haq_val_images images). "
        "Every latency is measured on the target, each step's at its own time (a shared "
        "host's slow phases last seconds); a step is judged by the last column: its network "
        "and the one before it measured in alternating passes.",
        "",
    ]
    # the candidates a step answered by measurement instead of prediction (the latency
    # package's uncertainty: `latency_counts` in a step's outputs, when it records them)
    for step in ("search", "prune", "quantize"):
        counts = (s.get(step) or {}).get("latency_counts")
        if counts:
            lines.append(
                f"- {step}: {counts['measured']} candidates measured on the target instead of "
                f"predicted (uncertain near the budget), {counts['cached']} reused, "
                f"{counts['predicted']} predicted, {counts['failed']} measurements failed"
            )
    if (s.get("quantize") or {}).get("method") == "haq":
        lines.append(
            "- quantize: candidates priced by the precision LUT's sum; the network found is "
            "measured in alternating passes with the float one"
        )
    lines.append("")
    for step in ("prune", "quantize"):
        out = s[step]
        if not out.get("method"):
            continue
        lines.append(
            f"- {step} ({out['method']}): policy `{out.get('policy', '')}`, budget "
            f"{_f(out.get('budget_ms'))} ms (asked {_f(out.get('budget_asked_ms'))} ms; "
            + ("the latency model's prediction)" if step == "prune" else "the LUT sum)")
        )
        kept = {"float": ("quantized", "float"), "searched": ("pruned", "searched")}
        if out.get("held_back_for") == "accuracy":
            new, old = kept[out["shipped"]]
            b_acc = out.get("float_acc_same_images") or out["before"]["acc"]
            lines.append(
                f"  The {new} network measured faster ({_f(out['after']['measured_ms'])} against "
                f"{_f(out['before']['measured_ms'])} ms) but lost "
                f"{b_acc - out['after']['acc']:.1f} points ({_f(b_acc)} -> "
                f"{_f(out['after']['acc'])}% on the same images), more than [compress] "
                f"max_acc_drop = {out['max_acc_drop']:g}: the {old} network ships."
            )
        elif out.get("shipped") in kept:
            new, old = kept[out["shipped"]]
            gain = out.get("min_gain")
            by = (
                f" by more than {gain:.1%} (the host's noise floor, within {MIN_GAIN:.0%}-{MAX_GAIN:.0%})"
                if gain
                else ""
            )
            lines.append(
                f"  The {new} network measured {_f(out['after']['measured_ms'])} ms, not "
                f"faster than the {old} network's {_f(out['before']['measured_ms'])} ms{by}: "
                f"the {old} network ships."
            )
        elif out.get("shipped") in ("pruned", "quantized"):
            before, after = out["before"]["measured_ms"], out["after"]["measured_ms"]
            lines.append(
                f"  The {out['shipped']} network measured {_f(after)} ms against "
                f"{_f(before)} ms for the network before it, in alternating passes: it ships."
            )
        if f"{step}_policy" in rel:
            lines += ["", f"![{step} policy]({rel[f'{step}_policy']})", ""]
    lines.append("")
    return lines


def _budget_note(cfg: PipelineConfig, b: dict[str, Any]) -> str:
    if cfg.target.latency_ms is not None:
        return f"The budget is [target] latency_ms = {_f(b['budget_ms'])} ms."
    return (
        f"The budget is {cfg.target.budget_fraction:g} of the way from the fastest network of the "
        f"space ({_f(b['smallest_ms'])} ms, predicted) to the slowest ({_f(b['largest_ms'])} ms): "
        f"{_f(b['smallest_ms'])} + {cfg.target.budget_fraction:g} x "
        f"({_f(b['largest_ms'])} - {_f(b['smallest_ms'])}) = {_f(b['budget_ms'])} ms "
        "([target] budget_fraction; set [target] latency_ms for a budget in ms)."
    )


def _per_call(ver: dict[str, Any]) -> str:
    if ver.get("per_call_ms") is None:
        return "–"
    over = ver.get("per_call_overhead")
    return f"{_f(ver['per_call_ms'])}" + (f" ({100 * over:+.1f}%)" if over is not None else "")


def wilson(pct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval (in %) of an accuracy of `pct` % measured on `n` images."""
    if n <= 0:
        return (0.0, 100.0)
    p = pct / 100.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def _accuracy_note(art: dict[str, Any]) -> str:
    n = art.get("accuracy_n")
    if art.get("accuracy") is None or not n:
        return ""
    lo, hi = wilson(art["accuracy"], n)
    return (
        f"Accuracies are measured on {n} validation images: the shipped artifact's "
        f"{_f(art['accuracy'])}% has a 95% interval of {lo:.1f}-{hi:.1f}% (one image is "
        f"{100 / n:.2g} points), so differences smaller than that are not evidence."
    )


def _peer_lines(s: dict[str, Any]) -> list[str]:
    """The artifact beside ONNX Runtime and OpenVINO on the same network and on the baseline."""
    ver = s["verify"]
    peers = ver.get("peers")
    if not peers:
        return []
    shipped, base = peers["shipped_network"], peers.get("baseline")
    engines = [e for e in ("onnxruntime", "openvino") if e in shipped]
    rows = [["codesign artifact (TVM), per call from Python", ver.get("per_call_ms"), "–"]]
    for e in engines:
        rows.append([e, shipped[e], base.get(e) if base else "–"])
    lines = [
        "### Against the engines you would otherwise ship (same threads, per call, ms)",
        "",
        _table(["engine", "shipped network", f"baseline {base['label']}" if base else "–"], rows),
        "",
    ]
    for e, why in {**shipped.get("missing", {})}.items():
        lines += [f"- {e}: {why}"]
    fastest = [base[e] for e in engines if base and e in base]
    if fastest and ver.get("per_call_ms"):
        lines += [
            f"Without codesign: baseline {base['label']} ({_f(base['acc'])}%) on the fastest "
            f"engine runs {_f(min(fastest))} ms; the shipped artifact runs "
            f"{_f(ver['per_call_ms'])} ms ({min(fastest) / ver['per_call_ms']:.2f}x).",
            "",
        ]
    return lines


def _host(s: dict[str, Any]) -> str:
    h = s["verify"].get("host") or {}
    load = "/".join(f"{v:g}" for v in h.get("loadavg", []))
    return f"{h.get('cpu', '?')}, {h.get('threads', '?')} threads of {h.get('cpus', '?')}, {load}"


def _inline(md: str) -> str:
    out = html.escape(md)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return out


def _html(md: str, figs: dict[str, Path], out: Path, title: str) -> str:
    """A small Markdown subset (headings, tables, images, lists, paragraphs) to HTML."""
    by_rel = {}
    for p in figs.values():
        key = str(p.relative_to(out) if p.is_relative_to(out) else p)
        by_rel[key] = base64.b64encode(p.read_bytes()).decode()
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            match = re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line)
            assert match is not None  # the report writes its images as ![alt](src)
            alt, src = match.groups()
            data = by_rel.get(src)
            if data:
                body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *rest = rows
            body.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest
                )
                + "</table>"
            )
            continue
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:14px;text-align:left}img{max-width:100%;margin:0.5em 0}"
        "code{background:#f3f3f3;padding:1px 3px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(out: Path, cfg: PipelineConfig, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write OUT/report.md and OUT/report.html; returns their paths."""
    figs = _figures(out, cfg, summary)
    md = _markdown(cfg, summary, figs, out)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(md)
    html_path.write_text(_html(md, figs, out, md.splitlines()[0].lstrip("# ")))
    return md_path, html_path
