"""The HAQ search: DDPG episodes over the HAQ environment, checkpointed after every episode.

Each episode: the agent acts on every step's state (exploring; uniformly at random during its
warm-up; the first episode is the environment's uniform 8-bit probe, `HAQEnv.probe_actions`), the environment enforces the budget and scores the policy, and the agent stores the
episode with the enforced actions (what the policy really is) and learns. The best policy is the
one with the highest reward; every policy seen meets the budget. `checkpoint=PATH` saves the
agent (networks, replay buffer, RNG states), the history and the environment's accuracy cache
after every episode; calling again with the same path and settings resumes exactly. The loop
itself is `codesign.compression.episodes.run_episodes`, shared with AMC.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codesign.compression.ddpg import DDPGAgent, DDPGConfig
from codesign.compression.haq.env import STATE_DIM, EpisodeResult, HAQEnv
from codesign.compression.quant.policy import QuantPolicy
from codesign.errors import CodesignError

FORMAT = "codesign-haq-search/1"


class SearchCheckpointError(CodesignError):
    """A search checkpoint that belongs to another search."""


@dataclass
class HAQEpisodes:
    """What a HAQ search's episodes gave: the best episode, the history, where it resumed (not
    an architecture search's `codesign.search.run.SearchResult`)."""

    best: EpisodeResult
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0


def fingerprint(env: HAQEnv, ddpg: DDPGConfig) -> str:
    blob = json.dumps(
        {
            "blocks": [b.key for b in env.blocks],
            "menu": env.menu.to_dict(),
            "haq": env.config.to_dict(),
            "ddpg": ddpg.to_dict(),
            "float_accuracy": env.float_accuracy,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def haq_search(
    env: HAQEnv,
    episodes: int,
    ddpg: DDPGConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    fingerprint_of: str | None = None,
) -> HAQEpisodes:
    """`episodes` DDPG episodes over `env` (resumed from `checkpoint`; see module docstring).
    `fingerprint_of` replaces the fingerprint of a block network's env (`fingerprint`)."""
    from codesign.compression.episodes import Checkpoint, Episode, run_episodes

    if episodes < 1:
        raise CodesignError("the HAQ search ran no episode (episodes must be >= 1)")
    ck = None
    if checkpoint is not None:
        ck = Checkpoint(
            Path(checkpoint),
            FORMAT,
            fingerprint_of or fingerprint(env, ddpg),
            SearchCheckpointError,
            "holds a different HAQ search (other model, target, budget or settings); "
            "remove it or choose another output directory",
        )

    def finish(_actions: list[float]) -> Episode:
        result = env.finish()
        return Episode(result.actions, result.reward, result.to_dict())

    res = run_episodes(
        env,
        DDPGAgent(STATE_DIM, ddpg),
        episodes,
        finish=finish,
        checkpoint=ck,
        extra=lambda: {"accuracy_cache": dict(env.accuracy_cache)},
        restore=lambda state: env.accuracy_cache.update(state["accuracy_cache"]),
        postfix=lambda r, b: (
            f"acc {r['accuracy']:.2f} {r['cost']:.4g}{env.unit} best {b['accuracy']:.2f}"
        ),
        desc="haq",
        progress=progress,
        first=env.probe_actions(),
    )
    b = res.best
    policy = QuantPolicy.decode(b["policy"])
    best = EpisodeResult(policy, env.policy_actions(policy), b["cost"], b["accuracy"], b["reward"])
    return HAQEpisodes(best, res.history, res.resumed_from)
