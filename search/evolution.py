"""Evolutionary search under a hard latency constraint, scored by a weight-sharing supernet.

    population  seeded random architectures with predicted latency <= budget
    repeat `generations` times:
        score every new member (accuracy of the supernet with that path fixed, BN re-estimated)
        keep the best `parents` (ties: faster first)
        children = mutations of parents + crossovers of parent pairs, each redrawn until it is
                   new and predicted within budget (at most `max_tries` draws per child)

Latency comes from `LatencyModel.predict_many` (LUT sum + residual); no candidate over budget
is ever scored or returned. Every loop is bounded, every draw comes from a generator seeded by
(seed, generation), and the state is saved after each generation (resumable).
"""

from __future__ import annotations

import abc
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codesign.arch import Arch
from codesign.data import Dataset
from codesign.search.objective import SearchError
from codesign.search.space import SearchSpace
from codesign.search.supernet import Supernet, recalibrate_bn
from codesign.train import evaluate


@dataclass(frozen=True, slots=True)
class EvolutionConfig:
    population: int = 24
    generations: int = 8
    parents: int = 8
    mutations: int = 8
    crossovers: int = 8
    mutate_prob: float = 0.25
    max_tries: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.population, self.generations, self.parents, self.max_tries) < 1:
            raise SearchError("population, generations, parents and max_tries must be >= 1")
        if self.parents > self.population or min(self.mutations, self.crossovers) < 0:
            raise SearchError("need parents <= population and mutations, crossovers >= 0")
        if not 0.0 < self.mutate_prob <= 1.0:
            raise SearchError(f"mutate_prob must be in (0, 1], got {self.mutate_prob}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scorer(abc.ABC):
    """Scores an architecture (higher is better)."""

    @abc.abstractmethod
    def __call__(self, arch: Arch) -> float: ...


class SupernetScorer(Scorer):
    """Accuracy (%) on the search split's held-out part of the supernet with `arch`'s path
    fixed, after re-estimating BatchNorm statistics on `bn_batches` training batches."""

    def __init__(
        self,
        supernet: Supernet,
        data: Dataset,
        *,
        eval_images: int = 1000,
        bn_batches: int = 4,
        batch_size: int = 64,
    ) -> None:
        self.supernet, self.data = supernet, data
        self.eval_images, self.bn_batches, self.batch_size = eval_images, bn_batches, batch_size

    def __call__(self, arch: Arch) -> float:
        net = self.supernet.subnet(self.supernet.path_of(arch))
        limit = self.bn_batches * self.batch_size
        recalibrate_bn(
            net, (x for x, _ in self.data.batches("train", self.batch_size, limit=limit))
        )
        return evaluate(net, self.data, "val", limit=self.eval_images)


@dataclass
class EvolutionOutcome:
    arch: Arch
    score: float
    predicted_ms: float
    history: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # every scored arch -> score
    seconds: float = 0.0


def _feasible(
    draw: Callable[[], Arch], model: Any, budget_ms: float, seen: set[str], tries: int
) -> Arch | None:
    """Up to `tries` draws; the first new architecture predicted within budget."""
    for _ in range(tries):
        arch = draw()
        if arch.encode() not in seen and float(model.predict(arch)) <= budget_ms:
            return arch
    return None


def evolve(
    space: SearchSpace,
    model: Any,
    budget_ms: float,
    score: Scorer | Callable[[Arch], float],
    config: EvolutionConfig,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> EvolutionOutcome:
    """Run the evolution (see module docstring); resumes from `checkpoint` if it exists."""
    from tqdm import tqdm

    cfg = config
    meta = {"config": cfg.to_dict(), "budget_ms": budget_ms, "space": space.digest}
    state: dict[str, Any] = {"generation": 0, "population": [], "scores": {}, "history": []}
    state["seconds"] = 0.0
    if checkpoint is not None and checkpoint.exists():
        saved = json.loads(checkpoint.read_text())
        if saved.get("meta") != meta:
            raise SearchError(
                f"{checkpoint} holds an evolution with other settings; use another output "
                "directory or delete it to start over"
            )
        state = saved["state"]
    scores: dict[str, float] = state["scores"]
    latency: dict[str, float] = {}

    def ms(a: Arch) -> float:
        key = a.encode()
        if key not in latency:
            latency[key] = float(model.predict(a))
        return latency[key]

    if not state["population"]:
        rng = random.Random(cfg.seed * 1_000_003)
        pop: list[Arch] = []
        seen: set[str] = set()
        for _ in range(cfg.population):
            arch = _feasible(lambda: space.sample(rng), model, budget_ms, seen, cfg.max_tries)
            if arch is not None:
                pop.append(arch)
                seen.add(arch.encode())
        if not pop:
            raise SearchError(
                f"no architecture of {space.name!r} predicted within {budget_ms:.4g} ms in "
                f"{cfg.population * cfg.max_tries} random draws; raise the latency target"
            )
        state["population"] = [a.encode() for a in pop]

    bar = tqdm(
        total=cfg.generations,
        initial=state["generation"],
        desc="evolution",
        unit="gen",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    while state["generation"] < cfg.generations:
        t0, gen = time.time(), state["generation"]
        pop = [space.decode(s) for s in state["population"]]
        for a in pop:
            if a.encode() not in scores:
                scores[a.encode()] = float(score(a))
        ranked = sorted(pop, key=lambda a: (-scores[a.encode()], ms(a), a.encode()))
        parents = ranked[: cfg.parents]
        best = parents[0]
        state["history"].append(
            {
                "generation": gen + 1,
                "best_arch": best.encode(),
                "best_score": scores[best.encode()],
                "best_predicted_ms": ms(best),
                "mean_score": sum(scores[a.encode()] for a in pop) / len(pop),
                "evaluated": len(scores),
            }
        )
        rng = random.Random(cfg.seed * 1_000_003 + gen + 1)
        seen = set(scores) | {a.encode() for a in pop}
        children: list[Arch] = []
        for _ in range(cfg.mutations):
            child = _feasible(
                lambda r=rng, ps=parents: space.mutate(r.choice(ps), r, cfg.mutate_prob),
                model,
                budget_ms,
                seen,
                cfg.max_tries,
            )
            if child is not None:
                children.append(child)
                seen.add(child.encode())
        for _ in range(cfg.crossovers if len(parents) > 1 else 0):

            def cross(r: random.Random = rng, ps: list[Arch] = parents) -> Arch:
                a, b = r.sample(ps, 2)
                return space.crossover(a, b, r)

            child = _feasible(
                cross,
                model,
                budget_ms,
                seen,
                cfg.max_tries,
            )
            if child is not None:
                children.append(child)
                seen.add(child.encode())
        state["population"] = [a.encode() for a in parents + children]
        state["generation"] = gen + 1
        state["seconds"] += time.time() - t0
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            tmp.write_text(json.dumps({"meta": meta, "state": state}, indent=1))
            tmp.replace(checkpoint)
        bar.set_postfix_str(f"best {scores[best.encode()]:.2f}% at {ms(best):.3f} ms")
        bar.update()
    bar.close()
    # the last generation's children are scored too, so the answer reflects all the work
    final = [space.decode(s) for s in state["population"]]
    for a in final:
        if a.encode() not in scores:
            scores[a.encode()] = float(score(a))
    best = sorted(final, key=lambda a: (-scores[a.encode()], ms(a), a.encode()))[0]
    return EvolutionOutcome(
        best, scores[best.encode()], ms(best), state["history"], dict(scores), state["seconds"]
    )
