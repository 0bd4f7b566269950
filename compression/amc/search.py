"""The AMC search loop: DDPG episodes over `AMCEnv`, checkpointed after every episode.

The checkpoint (`search.pt`) holds the agent (networks, optimisers, replay buffer, RNG states),
the episode history and the best policy so far. Re-running with the same network, budget,
latency model and settings continues after the last finished episode and gives exactly what an
uninterrupted run gives; asking for more episodes extends a finished search. A checkpoint
written for anything else is refused (never overwritten). `episodes.jsonl` mirrors the history
one JSON line per episode for people and plots.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codesign.compression.amc.env import AMCConfig, AMCEnv
from codesign.compression.amc.policy import PruneError, PrunePolicy
from codesign.compression.ddpg import DDPGAgent

FORMAT = "codesign-amc-search/1"


@dataclass
class AMCEpisodes:
    """What an AMC search's episodes gave: the best episode, the history, where it resumed (not
    an architecture search's `codesign.search.run.SearchResult`)."""

    best: dict[str, Any]  # the best episode: policy, reward, acc, latency_ms, ...
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # episodes already done when this call started
    seconds: float = 0.0

    @property
    def policy(self) -> PrunePolicy:
        return PrunePolicy.decode(self.best["policy"])


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(env: AMCEnv, config: AMCConfig, latency_id: str) -> str:
    blob = {
        "blocks": [s.key for s in env.network.specs],
        "weights": weights_digest(env.network),
        "budget_ms": round(env.budget_ms, 9),
        "base_ms": round(env.base_ms, 9),
        "latency": latency_id,
        "data": env.data.info.to_dict(),
        "config": config.search_key(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def amc_search(
    env: AMCEnv,
    config: AMCConfig,
    *,
    out: str | Path | None = None,
    latency_id: str = "",
    progress: bool = True,
) -> AMCEpisodes:
    """Run (or resume) `config.episodes` episodes; checkpoints go to `out`/search.pt if given
    (the loop is `codesign.compression.episodes.run_episodes`, shared with HAQ)."""
    from codesign.compression.episodes import Checkpoint, Episode, run_episodes

    if config.episodes < 1:
        raise PruneError("the search ran no episodes; ask for at least one (--episodes)")
    agent = DDPGAgent(env.state_dim, config.ddpg)
    ck = jsonl = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "episodes.jsonl"
        ck = Checkpoint(
            out / "search.pt",
            FORMAT,
            fingerprint(env, config, latency_id),
            PruneError,
            "belongs to a search of another model, budget, latency model or settings; use "
            "another output directory (or delete it to start over)",
        )

    def finish(actions: list[float]) -> Episode:
        policy = env.policy()
        score = env.score(policy)
        record = {"policy": policy.encode(), **{k: float(v) for k, v in score.items()}}
        return Episode(actions, score["reward"], record)

    def annotate(rec: dict[str, Any], stats: dict[str, float], ep: int, sec: float):
        return {
            **rec,
            "sigma": agent.sigma(ep) if ep >= config.ddpg.warmup_episodes else None,
            "critic_loss": stats.get("critic_loss"),
            "seconds": round(sec, 3),
        }

    def restore(state: dict[str, Any]) -> None:
        if jsonl is not None:  # the mirror follows the checkpoint it resumes
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in state["history"]))

    def on_record(rec: dict[str, Any]) -> None:
        if jsonl is not None:
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")

    res = run_episodes(
        env,
        agent,
        config.episodes,
        finish=finish,
        checkpoint=ck,
        restore=restore,
        on_record=on_record,
        annotate=annotate,
        postfix=lambda r, b: f"acc {r['acc']:.1f}% {r['latency_ms']:.3f} ms | best {b['acc']:.1f}%",
        desc="amc search",
        progress=progress,
    )
    return AMCEpisodes(res.best, res.history, res.resumed_from, res.seconds)
