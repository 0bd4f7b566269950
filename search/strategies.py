"""The stages of `search_arch`: search (proxyless | evolution), derive + measure, retrain.

Each stage keeps its state in the output directory and resumes from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.arch import Arch
from codesign.data import Dataset
from codesign.search.objective import LatencyObjective
from codesign.search.space import SearchSpace
from codesign.targets import Target

if TYPE_CHECKING:
    from codesign.search.run import SearchSettings


def run_strategy(
    settings: SearchSettings,
    latency_ms: float,
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

    evolution = settings.strategy == "evolution"
    warmup = settings.epochs if evolution else settings.warmup_epochs
    cfg = ProxylessConfig(
        epochs=settings.epochs,
        warmup_epochs=settings.epochs // 4 if warmup is None else warmup,
        batch_size=settings.batch_size,
        weight_lr=settings.lr,
        arch_lr=settings.arch_lr,
        estimator=settings.estimator,
        seed=settings.seed,
    )
    supernet = Supernet(space, seed=settings.seed)
    search = ProxylessSearch(supernet, data, model, objective, cfg)
    outcome = search.run(out / "search.pt", progress=progress)
    found: dict[str, Any] = {
        "strategy": settings.strategy,
        "argmax_arch": outcome.arch.encode(),
        "probs": outcome.probs,
        "history": outcome.history,
        "seconds": outcome.seconds,
    }
    if not evolution:
        return found
    ecfg = EvolutionConfig(
        population=settings.population,
        generations=settings.generations,
        parents=min(settings.population, max(2, settings.population // 3)),
        mutations=settings.population // 3,
        crossovers=settings.population // 3,
        seed=settings.seed,
    )
    scorer = SupernetScorer(supernet, data, batch_size=settings.batch_size)
    t0 = time.time()
    evo = evolve(
        space,
        model,
        latency_ms,
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


def next_budget(budget: float, predicted: float, target: float, measured: float) -> float:
    """The derivation budget after an arch predicted at `predicted` measured `measured` ms:
    scaled from its prediction (not from the budget it was under), so that the next arch is
    predicted faster even when the model under-estimates the network by a wide margin."""
    return min(budget, predicted) * target / measured * 0.98


def derive_and_measure(
    settings: SearchSettings,
    latency_ms: float,
    space: SearchSpace,
    found: dict[str, Any],
    model: Any,
    target: Target,
    db: Path | None,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Derive the final Arch within the latency budget and measure it on the target; tighten
    the budget by target/measured and retry (bounded) while it misses the target."""
    from codesign.measurement import MeasureProtocol
    from codesign.search.hardware import log, measure_arch, tuning_database
    from codesign.search.run import _write_json

    protocol = MeasureProtocol(repeat=settings.repeat, min_repeat_ms=settings.min_repeat_ms)
    database = tuning_database(model, db, target)

    path = out / "derive.json"
    state = json.loads(path.read_text()) if path.exists() else {"rounds": [], "seconds": 0.0}
    rounds = state["rounds"]
    budget = rounds[-1]["next_budget_ms"] if rounds else latency_ms
    while not (rounds and rounds[-1]["done"]):
        t0 = time.time()
        arch = _choose(space, found, model, budget)
        again = any(r["arch"] == arch.encode() for r in rounds)
        m = measure_arch(
            space,
            arch,
            target,
            protocol,
            database=database,
            trials=model.trials,
            seed=settings.seed,
        )
        met = m.median_ms <= latency_ms
        predicted = float(model.predict(arch))
        rounds.append(
            {
                "budget_ms": budget,
                "arch": arch.encode(),
                "predicted_ms": predicted,
                "measured_ms": m.median_ms,
                "measurement": {
                    "median_ms": m.median_ms,
                    "mean_ms": m.mean_ms,
                    "std_ms": m.std_ms,
                    "repeats": m.repeats,
                },
                "met": met,
                "next_budget_ms": next_budget(budget, predicted, latency_ms, m.median_ms),
                "done": met or again or len(rounds) + 1 >= settings.measure_rounds,
            }
        )
        state["seconds"] += time.time() - t0
        _write_json(path, state)
        r = rounds[-1]
        log(
            f"derived {r['arch']}: {r['predicted_ms']:.4g} ms predicted, {r['measured_ms']:.4g} "
            f"ms measured ({'meets' if met else 'misses'} {latency_ms:g} ms)",
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
    settings: SearchSettings,
    space: SearchSpace,
    arch: Arch,
    data: Dataset,
    out: Path,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Train `arch` from scratch on the whole training split; accuracy on the validation split."""
    from codesign.modules import build_network
    from codesign.train import TrainConfig, evaluate, train

    cfg = TrainConfig(
        epochs=settings.retrain_for,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
    )
    net = build_network(space, arch, seed=settings.seed)
    history = train(
        net, data, cfg, checkpoint=out / "retrain.pt", progress=progress, desc="retrain"
    )
    return net, {
        "accuracy": evaluate(net, data),
        "history": history,
        "seconds": sum(h["seconds"] for h in history),
    }
