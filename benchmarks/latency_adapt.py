"""`latency_model.py --adapt`: few-network latency models, adaptation and uncertainty.

    source (default: tiny on x86, the demo's target) and new (space, target) (default: tiny-w2
    on x86), analytic (trials = 0) LUTs, the default protocol (quiet-window medians and a second
    pass, as `codesign pipeline` measures); each is measured in its own process (TVM sizes its
    thread pool once per process) into one LUT file. Run it on an otherwise idle host: on a
    loaded 2-core host a 2-thread pool stalls at every barrier (then use x86:threads=1 for both;
    the quick protocol's 1 ms windows gave noise floors of 36-47% here, see the history).
    demo      the pipeline's own model: 24 networks of the source (16 fit / 8 held out), scored
              on its 8 and on every other measured network
    adapt     the source model adapted to the new target with N = 5, 10, 20 of its networks,
              scored on all the others (>= 50), beside the LUT sum, the source prior unchanged
              and the same fit without the prior
    uncertainty  of held-out predictions: the share of misses (> +-10%) flagged not confident,
              and the share of confident predictions within +-10%
Writes benchmarks/results/latency_model_adapt.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from codesign.measurement import MeasureProtocol


def measure_target(spec: str, space_name: str, db: Path, n: int, seed: int, out: Path) -> None:
    """In this process: the LUT, `n` sampled networks and the noise floor of `spec`."""
    from codesign.latency.networks import measure_networks, sample_archs
    from codesign.lut_build import build_lut
    from codesign.search.space import get_space
    from codesign.targets import parse_target

    space, target, protocol = get_space(space_name), parse_target(spec), MeasureProtocol()
    t0 = time.time()
    build_lut(space, target, db, protocol=protocol)
    t1 = time.time()
    archs = sample_archs(space, n, seed)
    rep = measure_networks(space, target, db, archs, protocol=protocol, seed=seed)
    t2 = time.time()
    out.write_text(
        json.dumps(
            {
                **noise(space, target, archs[0]),
                "measured": rep.measured,
                "reused": rep.reused,
                "failed": len(rep.failed),
                "seconds": {"lut": round(t1 - t0, 1), "networks": round(t2 - t1, 1)},
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


def noise(space: Any, target: Any, arch: Any) -> dict[str, Any]:
    """One network's repeat spread on `target` (`latency_model.noise_floor`, the LUT's statistic)."""
    from latency_model import noise_floor

    floor = noise_floor(space, target, None, arch, "untuned", MeasureProtocol())
    return {
        "target": target.key,
        "space": space.name,
        "noise_floor": floor["spread"],
        "noise_samples_ms": floor["samples_ms"],
    }


def _measure_in_child(spec: str, space: str, n: int, args: Any, side: Path) -> dict[str, Any]:
    from codesign.targets import parse_target

    env = {**os.environ, "TVM_NUM_THREADS": str(parse_target(spec).threads)}
    cmd = [sys.executable, str(Path(__file__).with_name("latency_model.py")), "--measure", spec]
    cmd += ["--space", space, "--networks", str(n)]
    cmd += ["--db", str(args.db_path), "--seed", str(args.seed), "--side", str(side)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(side.read_text())


def uncertainty(model: Any, archs: list, meas: np.ndarray) -> dict[str, Any]:
    if not archs:
        return {"n": 0}
    preds = [model.predict_with_uncertainty(a) for a in archs]
    rel = np.array([p.ms for p in preds]) / meas - 1
    conf = np.array([p.confident for p in preds])
    miss = np.abs(rel) > 0.10
    return {
        "n": len(archs),
        "misses": int(miss.sum()),
        "flagged_share_of_misses": float(np.mean(~conf[miss])) if miss.any() else 1.0,
        "confident_share": float(conf.mean()),
        "confident_within10": float(np.mean(~miss[conf])) if conf.any() else None,
        "mean_rel_uncertainty": float(np.mean([p.rel_uncertainty for p in preds])),
    }


def _r(d: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:  # JSON has no NaN: None
        if isinstance(v, float):
            return round(v, 4) if np.isfinite(v) else None
        return v

    return {k: one(v) for k, v in d.items()}


def run_adapt(args: Any, machine: dict[str, Any]) -> dict[str, Any]:
    from codesign.latency.adapt import adapt_latency_model, spearman
    from codesign.latency.calibrate import fit_ridge, space_scales, z_features
    from codesign.latency.fit import (
        fit_latency_model,
        host_noise_floor,
        measured_networks,
        space_features,
    )
    from codesign.latency.model import LatencyModel
    from codesign.latency.networks import sample_archs
    from codesign.latency.regress import metrics
    from codesign.search.space import get_space
    from codesign.targets import parse_target

    space, dspace = get_space(args.space or "tiny"), get_space(args.adapt_space)
    n, dn = args.networks or 40, args.adapt_networks
    src, dst = parse_target(args.source), parse_target(args.adapt_to)
    db = args.db_path
    if args.no_measure:  # networks measured earlier: only the noise floors now (same threads)
        side = {
            "source": noise(space, src, sample_archs(space, 1, args.seed)[0]),
            "new": noise(dspace, dst, sample_archs(dspace, 1, args.seed)[0]),
        }
    else:
        side = {
            "source": _measure_in_child(src.spec, space.name, n, args, Path(f"{db}.src.json")),
            "new": _measure_in_child(dst.spec, dspace.name, dn, args, Path(f"{db}.new.json")),
        }
    side["lut_noise_floor"] = host_noise_floor(db, dst.key, "untuned")

    def data(sp, target, count):
        want = [a.encode() for a in sample_archs(sp, count, args.seed)]
        archs, meas = measured_networks(db, sp, target.key, "untuned")
        idx = {a.encode(): i for i, a in enumerate(archs)}
        keep = [idx[k] for k in want if k in idx]
        return [archs[i] for i in keep], meas[keep]

    s_archs, s_meas = data(space, src, n)
    d_archs, d_meas = data(dspace, dst, dn)
    floor = side["source"]["noise_floor"]
    # the source model on all its networks (today's fields), and the demo's 24-network model
    source, rep = fit_latency_model(
        db, space, src, archs=s_archs, seed=args.seed, allow_noisy=True, noise_floor=floor
    )
    demo, demo_rep = fit_latency_model(
        db, space, src, archs=s_archs[:24], seed=args.seed, allow_noisy=True, noise_floor=floor
    )
    rest = s_archs[24:]
    demo_all = metrics(demo.predict_many(rest), s_meas[24:])
    lut_all = metrics(np.array([demo.lut_sum(a) for a in rest]), s_meas[24:])
    result: dict[str, Any] = {
        "space": space.name,
        "mode": "untuned",
        "protocol": MeasureProtocol().to_dict(),
        "networks": {"source": len(s_archs), "new": len(d_archs)},
        "n_train": rep.n_train,
        "n_test": rep.n_test,
        "residual_form": rep.form,
        "cv_rmspe": rep.cv_rmspe,
        **{k: _r({m: v for m, v in rep.test[k].items() if m != "n"}) for k in rep.test},
        "noise_floor": floor,
        "noise_floor_new": side["new"]["noise_floor"],
        "measurement": side,
        "demo": {
            "networks": 24,
            "n_train": demo_rep.n_train,
            "form": demo_rep.form,
            "held_out": {k: _r(v) for k, v in demo_rep.test.items()},
            "other_networks": {"n": len(rest), "model": _r(demo_all), "lut_only": _r(lut_all)},
            "uncertainty": _r(uncertainty(demo, rest, s_meas[24:])),
        },
    }
    base = LatencyModel.from_lut(db, dspace, dst)
    scale = space_scales(base.schema, space_features(base, dspace))
    adapt = []
    for k in (5, 10, 20):
        if len(d_archs) < k + 3:
            adapt.append({"n_target": k, "skipped": f"{len(d_archs)} networks on the new target"})
            continue
        res = adapt_latency_model(
            source=source, db=db, target=dst, space=dspace, archs=d_archs[:k], measure=False,
            noise_floor=side["new"]["noise_floor"], allow_noisy=True,
        )  # fmt: skip
        test = [a for a in d_archs if a.encode() not in {b.encode() for b in d_archs[:k]}]
        meas = d_meas[k:]
        x = np.stack([base.features(dspace.arch_blocks(a)) for a in d_archs])
        scratch = fit_ridge(base.schema, x[:k], d_meas[:k], scale)
        p_scratch = x[k:, 0] * np.exp(scratch.log_ratio(z_features(base.schema, x[k:])))
        h = res.held_out
        adapt.append(
            {
                "from": f"{space.name} on {src.key}",
                "to": f"{dspace.name} on {dst.key}",
                "n_target": k,
                "n_test": len(test),
                "used_prior": res.used_prior,
                "within10": round(h["adapted"]["within10"], 4),
                "rmspe": round(h["adapted"]["rmspe"], 4),
                "spearman": round(h["adapted"]["spearman"], 4),
                "lut_only": _r(h["lut_only"]),
                "prior_only": _r(h["prior"]),
                "no_prior": _r({**metrics(p_scratch, meas), "spearman": spearman(p_scratch, meas)}),
                "uncertainty": _r(uncertainty(res.model, test, meas)),
            }
        )
    result["adapt"] = adapt
    ten = next(a for a in adapt if a["n_target"] == 10)
    if "skipped" in ten:
        result["machine"] = machine
        return result
    result["uncertainty"] = {
        "of": "adapted model, N = 10, held-out networks of the new target",
        "flagged_share_of_misses": ten["uncertainty"]["flagged_share_of_misses"],
        "confident_within10": ten["uncertainty"]["confident_within10"],
        "confident_share": ten["uncertainty"]["confident_share"],
    }
    result["goals"] = {
        "adapt10_within10>=0.95": ten["within10"] >= 0.95,
        "adapt10_spearman>=0.95": ten["spearman"] >= 0.95,
        "adapt10_n_test>=50": ten["n_test"] >= 50,
        "flagged_share_of_misses>=0.8": ten["uncertainty"]["flagged_share_of_misses"] >= 0.8,
        "confident_within10>=0.98": (ten["uncertainty"]["confident_within10"] or 0) >= 0.98,
        "demo_within10>=0.9": demo_all["within10"] >= 0.9,
        "demo_rmspe<=0.05": demo_all["rmspe"] <= 0.05,
    }
    result["machine"] = machine
    return result
