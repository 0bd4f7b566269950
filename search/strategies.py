"""The stages of `run_search`: search (proxyless | evolution), derive + measure, retrain.

Each stage keeps its state in the output directory and resumes from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from codesign.arch import Arch
from codesign.data import Dataset
from codesign.search.objective import LatencyObjective
from codesign.search.space import SearchSpace
from codesign.targets import Target


def run_strategy(
    job: Any,
    space: SearchSpace,
    data: Dataset,
    model: Any,
    objective: LatencyObjective,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Train the supernet (and architecture parameters or an evolution) on the search split."""
    from codesign.search.evolution import EvolutionConfig, SupernetScorer, evolve
    from codesign.search.proxyless import ProxylessConfig, ProxylessSearch
    from codesign.search.supernet import Supernet

    evolution = job.strategy == "evolution"
    warmup = job.epochs if evolution else job.warmup_epochs
    cfg = ProxylessConfig(
        epochs=job.epochs,
        warmup_epochs=job.epochs // 4 if warmup is None else warmup,
        batch_size=job.batch_size,
        weight_lr=job.lr,
        arch_lr=job.arch_lr,
        estimator=job.estimator,
        seed=job.seed,
    )
    supernet = Supernet(space, seed=job.seed)
    search = ProxylessSearch(supernet, data, model, objective, cfg)
    outcome = search.run(out / "search.pt", progress=progress)
    found: dict[str, Any] = {
        "strategy": job.strategy,
        "argmax_arch": outcome.arch.encode(),
        "probs": outcome.probs,
        "history": outcome.history,
        "seconds": outcome.seconds,
    }
    if not evolution:
        return found
    ecfg = EvolutionConfig(
        population=job.population,
        generations=job.generations,
        parents=max(2, job.population // 3),
        mutations=job.population // 3,
        crossovers=job.population // 3,
        seed=job.seed,
    )
    scorer = SupernetScorer(supernet, data, batch_size=job.batch_size)
    t0 = time.time()
    evo = evolve(
        space,
        model,
        job.latency_ms,
        scorer,
        ecfg,
        checkpoint=out / "evolution.json",
        progress=progress,
    )
    found["history"] = {"supernet": outcome.history, "evolution": evo.history}
    found["scores"] = dict(sorted(evo.scores.items()))
    found["seconds"] = outcome.seconds + evo.seconds + (time.time() - t0)
    return found


def _choose(space: SearchSpace, found: dict[str, Any], model: Any, budget: float) -> Arch:
    from codesign.search.proxyless import derive_arch

    if found["strategy"] == "proxyless":
        return derive_arch(space, found["probs"], model, budget)[0]
    scored = [(space.decode(a), s) for a, s in found["scores"].items()]
    ms = {a.encode(): float(model.predict(a)) for a, _ in scored}
    fits = [(a, s) for a, s in scored if ms[a.encode()] <= budget]
    if not fits:  # nothing scored is that fast: the fastest scored one
        return min(scored, key=lambda t: (ms[t[0].encode()], t[0].encode()))[0]
    return sorted(fits, key=lambda t: (-t[1], ms[t[0].encode()], t[0].encode()))[0][0]


def derive_and_measure(
    job: Any,
    space: SearchSpace,
    found: dict[str, Any],
    model: Any,
    target: Target,
    db: Path,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Derive the final Arch within the latency budget and measure it on the target; tighten
    the budget by target/measured and retry (bounded) while it misses the target."""
    from codesign.measurement import MeasureProtocol
    from codesign.search.run import _log, _write_json, measure_arch, tuning_database

    protocol = MeasureProtocol(repeat=job.repeat, min_repeat_ms=job.min_repeat_ms)
    database = tuning_database(model, db, target)

    path = out / "derive.json"
    state = json.loads(path.read_text()) if path.exists() else {"rounds": [], "seconds": 0.0}
    rounds = state["rounds"]
    budget = rounds[-1]["next_budget_ms"] if rounds else job.latency_ms
    while not (rounds and rounds[-1]["done"]):
        t0 = time.time()
        arch = _choose(space, found, model, budget)
        again = any(r["arch"] == arch.encode() for r in rounds)
        m = measure_arch(
            space, arch, target, protocol, database=database, trials=model.trials, seed=job.seed
        )
        met = m.median_ms <= job.latency_ms
        rounds.append(
            {
                "budget_ms": budget,
                "arch": arch.encode(),
                "predicted_ms": float(model.predict(arch)),
                "measured_ms": m.median_ms,
                "measurement": {
                    "median_ms": m.median_ms,
                    "mean_ms": m.mean_ms,
                    "std_ms": m.std_ms,
                    "repeats": m.repeats,
                },
                "met": met,
                "next_budget_ms": budget * job.latency_ms / m.median_ms * 0.98,
                "done": met or again or len(rounds) + 1 >= job.measure_rounds,
            }
        )
        state["seconds"] += time.time() - t0
        _write_json(path, state)
        r = rounds[-1]
        _log(
            f"derived {r['arch']}: {r['predicted_ms']:.4g} ms predicted, {r['measured_ms']:.4g} "
            f"ms measured ({'meets' if met else 'misses'} {job.latency_ms:g} ms)",
            progress,
        )
        budget = r["next_budget_ms"]
    met = [r for r in rounds if r["met"]]
    # the first that met the target had the largest budget; else the fastest measured
    final = met[0] if met else min(rounds, key=lambda r: r["measured_ms"])
    return {
        "arch": final["arch"],
        "predicted_ms": final["predicted_ms"],
        "measured_ms": final["measured_ms"],
        "measurement": final["measurement"],
        "rounds": rounds,
        "seconds": state["seconds"],
    }


def retrain(
    job: Any, space: SearchSpace, arch: Arch, data: Dataset, out: Path, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """Train `arch` from scratch on the whole training split; accuracy on the validation split."""
    from codesign.modules import build_network
    from codesign.train import TrainConfig, evaluate, train

    cfg = TrainConfig(
        epochs=job.retrain_epochs or job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed,
    )
    net = build_network(space, arch, seed=job.seed)
    history = train(
        net, data, cfg, checkpoint=out / "retrain.pt", progress=progress, desc="retrain"
    )
    return net, {
        "accuracy": evaluate(net, data),
        "history": history,
        "seconds": sum(h["seconds"] for h in history),
    }
