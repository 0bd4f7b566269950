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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codesign.compression.amc.env import AMCConfig, AMCEnv
from codesign.compression.amc.policy import PruneError, PrunePolicy
from codesign.compression.ddpg import DDPGAgent

FORMAT = "codesign-amc-search/1"


@dataclass
class SearchResult:
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


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run_search(
    env: AMCEnv,
    config: AMCConfig,
    *,
    out: str | Path | None = None,
    latency_id: str = "",
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) `config.episodes` episodes; checkpoints go to `out`/search.pt if given."""
    from tqdm import tqdm

    t0 = time.time()
    agent = DDPGAgent(env.state_dim, config.ddpg)
    fp = fingerprint(env, config, latency_id)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    ckpt = jsonl = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ckpt, jsonl = out / "search.pt", out / "episodes.jsonl"
        if ckpt.exists():
            try:
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as err:
                raise PruneError(
                    f"{ckpt} is not a readable search checkpoint ({err}); move it away to start "
                    "a fresh search"
                ) from None
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise PruneError(f"{ckpt} is not an AMC search checkpoint; move it away")
            if state["fingerprint"] != fp:
                raise PruneError(
                    f"{ckpt} belongs to a search of another model, budget, latency model or "
                    "settings; use another output directory (or delete it to start over)"
                )
            agent.load_state_dict(state["agent"])
            history, best = list(state["history"]), state["best"]
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in history))
    start = len(history)
    bar = tqdm(
        total=config.episodes,
        initial=min(start, config.episodes),
        desc="amc search",
        unit="ep",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for ep in range(start, config.episodes):
            te = time.time()
            state_t = env.reset()
            states, actions = [], []
            while state_t is not None:
                a = agent.act(state_t, ep)
                states.append(state_t)
                actions.append(a)
                state_t = env.step(a)
            policy = env.policy()
            score = env.score(policy)
            agent.observe_episode(states, actions, score["reward"])
            stats = agent.update()
            rec = {
                "episode": ep,
                "policy": policy.encode(),
                **{k: float(v) for k, v in score.items()},
                "sigma": agent.sigma(ep) if ep >= config.ddpg.warmup_episodes else None,
                "critic_loss": stats.get("critic_loss"),
                "seconds": round(time.time() - te, 3),
            }
            history.append(rec)
            if best is None or rec["reward"] > best["reward"]:
                best = rec
            if ckpt is not None:
                _save(
                    ckpt,
                    {
                        "format": FORMAT,
                        "fingerprint": fp,
                        "agent": agent.state_dict(),
                        "history": history,
                        "best": best,
                    },
                )
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            bar.update()
            bar.set_postfix_str(
                f"acc {rec['acc']:.1f}% {rec['latency_ms']:.3f} ms | best {best['acc']:.1f}%"
            )
    finally:
        bar.close()
    if best is None:
        raise PruneError("the search ran no episodes; ask for at least one (--episodes)")
    return SearchResult(best, history, start, time.time() - t0)
