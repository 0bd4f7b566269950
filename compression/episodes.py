"""One episode loop for the DDPG searches (AMC pruning, HAQ quantisation, on any network).

    run_episodes(env, agent, episodes, finish=..., checkpoint=Checkpoint(...), ...)

Each episode: the agent acts on every state the environment gives (`env.reset()`, then
`env.step(action)` until it returns None), `finish(actions)` turns the episode into an
`Episode` (the actions the agent learns from, e.g. HAQ's budget-enforced ones; the reward; a
JSON-able history record), the agent stores it and learns. The best episode is the one with the
highest reward (the first of equals).

With a `Checkpoint`, the agent (networks, optimisers, replay buffer, RNG states), the history
and the best record are saved after every episode (written to a temporary file, then renamed,
so a crash leaves the previous checkpoint whole); `extra()` adds the caller's own state (e.g.
a cache of scored policies) and `restore(state)` takes it back. Calling again with the same
path and fingerprint continues after the last finished episode and gives exactly what an
uninterrupted run gives; more episodes extend a finished search. A checkpoint of another
format or fingerprint (other model, budget, settings) is refused with the caller's message,
never overwritten. Everything is seeded through the agent's config.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from codesign.compression.ddpg import DDPGAgent
from codesign.errors import CodesignError


class EpisodeEnv(Protocol):
    def reset(self) -> np.ndarray: ...

    def step(self, action: float) -> np.ndarray | None: ...


@dataclass(frozen=True, slots=True)
class Episode:
    """What one finished episode gives the loop."""

    actions: Sequence[float]  # what the agent stores (one per state)
    reward: float
    record: dict[str, Any]  # the history row (JSON-able; "episode" and "reward" are added)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where and as what a search is saved, and how a foreign checkpoint is refused."""

    path: Path
    format: str
    fingerprint: str
    error: type[CodesignError] = CodesignError
    mismatch: str = "belongs to another search; use another output directory or delete it"
    weights_only: bool = True


@dataclass
class EpisodesResult:
    best: dict[str, Any]  # the best episode's record
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # episodes already done when this call started
    seconds: float = 0.0


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file and a rename (never a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(ck: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's state if the file exists and belongs to this search (else raise)."""
    if not ck.path.exists():
        return None
    try:
        state = torch.load(ck.path, map_location="cpu", weights_only=ck.weights_only)
    except Exception as err:
        raise ck.error(
            f"{ck.path} is not a readable search checkpoint ({err}); move it away to start "
            "a fresh search"
        ) from None
    if not isinstance(state, dict) or state.get("format") != ck.format:
        raise ck.error(f"{ck.path} is not a {ck.format} search checkpoint; {ck.mismatch}")
    if state.get("fingerprint") != ck.fingerprint:
        raise ck.error(f"{ck.path} {ck.mismatch}")
    return state


def run_episodes(
    env: EpisodeEnv,
    agent: DDPGAgent,
    episodes: int,
    *,
    finish: Callable[[list[float]], Episode],
    checkpoint: Checkpoint | None = None,
    extra: Callable[[], dict[str, Any]] | None = None,
    restore: Callable[[dict[str, Any]], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    postfix: Callable[[dict[str, Any], dict[str, Any]], str] | None = None,
    annotate: Callable[[dict[str, Any], dict[str, float], int, float], dict[str, Any]]
    | None = None,
    desc: str = "search",
    progress: bool = True,
    first: Sequence[float] | None = None,
) -> EpisodesResult:
    """Run (or resume) episodes 0..`episodes`-1 (see the module docstring). `on_record(rec)`
    sees every new record after it is checkpointed; `postfix(rec, best)` is the progress text;
    `annotate(rec, losses, episode, seconds)` gives the stored record (default: the record with
    the agent's losses). `first`: the actions of episode 0 in place of the agent's (a scripted
    probe, e.g. HAQ's uniform 8-bit policy), learned from like any other episode."""
    from tqdm import tqdm

    t0 = time.time()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    state = load_state(checkpoint) if checkpoint is not None else None
    if state is not None:
        agent.load_state_dict(state["agent"])
        history, best = list(state["history"]), state["best"]
        if restore is not None:
            restore(state)
    start = len(history)
    bar = tqdm(
        total=episodes,
        initial=min(start, episodes),
        desc=desc,
        unit="ep",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for ep in range(start, episodes):
            te = time.time()
            s = env.reset()
            states, actions = [], []
            while s is not None:
                a = first[len(actions)] if ep == 0 and first else agent.act(s, ep)
                states.append(s)
                actions.append(a)
                s = env.step(a)
            done = finish(actions)
            agent.observe_episode(states, list(done.actions), done.reward)
            losses = agent.update()
            rec = {"episode": ep, **done.record, "reward": float(done.reward)}
            if annotate is None:
                rec.update(losses)
            else:
                rec = annotate(rec, losses, ep, time.time() - te)
            history.append(rec)
            if best is None or rec["reward"] > best["reward"]:
                best = rec
            if checkpoint is not None:
                save_state(
                    checkpoint.path,
                    {
                        "format": checkpoint.format,
                        "fingerprint": checkpoint.fingerprint,
                        "episode": ep + 1,
                        "agent": agent.state_dict(),
                        "history": history,
                        "best": best,
                        **(extra() if extra is not None else {}),
                    },
                )
            if on_record is not None:
                on_record(rec)
            bar.update()
            if postfix is not None:
                bar.set_postfix_str(postfix(rec, best))
    finally:
        bar.close()
    if best is None:
        raise CodesignError(f"the {desc} ran no episode; ask for at least one")
    return EpisodesResult(best, history, start, time.time() - t0)
