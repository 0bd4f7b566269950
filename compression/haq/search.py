"""The HAQ search: DDPG episodes over the HAQ environment, checkpointed after every episode.

Each episode: the agent acts on every step's state (exploring; uniformly at random during its
warm-up), the environment enforces the budget and scores the policy, and the agent stores the
episode with the enforced actions (what the policy really is) and learns. The best policy is the
one with the highest reward; every policy seen meets the budget. `checkpoint=PATH` saves the
agent (networks, replay buffer, RNG states), the history and the environment's accuracy cache
after every episode; calling again with the same path and settings resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codesign.compression.ddpg import DDPGAgent, DDPGConfig
from codesign.compression.haq.env import STATE_DIM, EpisodeResult, HAQEnv
from codesign.compression.quant.policy import QuantPolicy
from codesign.errors import CodesignError

FORMAT = "codesign-haq-search/1"


class SearchCheckpointError(CodesignError):
    """A search checkpoint that belongs to another search."""


@dataclass
class SearchResult:
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


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def haq_search(
    env: HAQEnv,
    episodes: int,
    ddpg: DDPGConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    from tqdm import tqdm

    agent = DDPGAgent(STATE_DIM, ddpg)
    fp = fingerprint(env, ddpg)
    history: list[dict[str, Any]] = []
    best: EpisodeResult | None = None
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("format") != FORMAT or state.get("fingerprint") != fp:
            raise SearchCheckpointError(
                f"{ckpt} holds a different HAQ search (other model, target, budget or settings); "
                "remove it or choose another output directory"
            )
        agent.load_state_dict(state["agent"])
        history, start = state["history"], state["episode"]
        env.accuracy_cache.update(state["accuracy_cache"])
        if state["best"] is not None:
            b = state["best"]
            best = EpisodeResult(
                QuantPolicy.decode(b["policy"]),
                tuple(b["actions"]),
                b["cost"],
                b["accuracy"],
                b["reward"],
            )
    bar = tqdm(
        total=episodes,
        initial=min(start, episodes),
        desc="haq",
        unit="ep",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for ep in range(start, episodes):
        states = []
        s = env.reset()
        while s is not None:
            states.append(s)
            s = env.step(agent.act(s, ep))
        result = env.finish()
        agent.observe_episode(states, result.actions, result.reward)
        losses = agent.update()
        if best is None or result.reward > best.reward:
            best = result
        history.append({"episode": ep, **result.to_dict(), **losses})
        bar.set_postfix_str(
            f"acc {result.accuracy:.2f} {result.cost:.4g}{env.unit} best {best.accuracy:.2f}"
        )
        bar.update()
        if ckpt is not None:
            _save(
                ckpt,
                {
                    "format": FORMAT,
                    "fingerprint": fp,
                    "episode": ep + 1,
                    "agent": agent.state_dict(),
                    "history": history,
                    "accuracy_cache": dict(env.accuracy_cache),
                    "best": {**best.to_dict(), "actions": list(best.actions)},
                },
            )
    bar.close()
    if best is None:
        raise CodesignError("the HAQ search ran no episode (episodes must be >= 1)")
    return SearchResult(best, history, start)
