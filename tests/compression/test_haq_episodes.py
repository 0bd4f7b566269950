"""The episode loop shared by HAQ and AMC (`codesign.compression.episodes`) on a toy env:
seeded, resumable exactly, a foreign checkpoint refused and left untouched."""

from __future__ import annotations

import numpy as np
import pytest

from codesign.compression.ddpg import DDPGAgent, DDPGConfig
from codesign.compression.episodes import Checkpoint, Episode, run_episodes
from codesign.errors import CodesignError

CONFIG = DDPGConfig(hidden=16, warmup_episodes=2, batch_size=8, seed=5)


class ToyEnv:
    """Three steps; the reward prefers actions near 0.7; counts the episodes it scored."""

    def __init__(self) -> None:
        self.t = 0
        self.scored: dict[str, float] = {}

    def reset(self) -> np.ndarray:
        self.t = 0
        return np.array([0.0, 1.0], dtype=np.float32)

    def step(self, action: float) -> np.ndarray | None:
        self.t += 1
        return None if self.t == 3 else np.array([self.t / 3, action], dtype=np.float32)


class ToyError(CodesignError):
    pass


def _run(episodes: int, path=None, fingerprint: str = "fp-a", first=None):
    env = ToyEnv()

    def finish(actions: list[float]) -> Episode:
        reward = -float(np.mean([(a - 0.7) ** 2 for a in actions]))
        env.scored[f"{len(env.scored)}"] = reward
        return Episode(actions, reward, {"mean_action": float(np.mean(actions))})

    ck = None
    if path is not None:
        ck = Checkpoint(path, "toy/1", fingerprint, ToyError, "belongs to another toy search")
    res = run_episodes(
        env,
        DDPGAgent(2, CONFIG),
        episodes,
        finish=finish,
        checkpoint=ck,
        extra=lambda: {"scored": dict(env.scored)},
        restore=lambda state: env.scored.update(state["scored"]),
        progress=False,
        first=first,
    )
    return res, env


def test_resume_gives_the_uninterrupted_run(tmp_path) -> None:
    whole, _ = _run(5)
    assert [r["episode"] for r in whole.history] == list(range(5))
    assert whole.best["reward"] == max(r["reward"] for r in whole.history)
    ck = tmp_path / "search.pt"
    part, _ = _run(3, ck)
    resumed, env = _run(5, ck)
    assert (part.resumed_from, resumed.resumed_from) == (0, 3)
    assert [r["mean_action"] for r in resumed.history] == [r["mean_action"] for r in whole.history]
    assert [r["reward"] for r in resumed.history] == [r["reward"] for r in whole.history]
    assert len(env.scored) == 5  # the caller's state came back with the checkpoint
    done, _ = _run(5, ck)  # a finished search runs nothing more
    assert done.resumed_from == 5 and done.history == resumed.history


def test_a_scripted_first_episode_replaces_the_agents_actions_once() -> None:
    plain, _ = _run(3)
    probed, _ = _run(3, first=(0.7, 0.7, 0.7))
    assert probed.history[0]["mean_action"] == pytest.approx(0.7)
    assert probed.best["reward"] == pytest.approx(0.0)  # the probe is the optimum here
    assert plain.history[0]["mean_action"] != pytest.approx(0.7)
    assert probed.history[1]["mean_action"] != pytest.approx(0.7)


def test_foreign_checkpoints_are_refused_and_kept(tmp_path) -> None:
    ck = tmp_path / "search.pt"
    _run(2, ck)
    before = ck.read_bytes()
    with pytest.raises(ToyError, match="belongs to another toy search"):
        _run(3, ck, fingerprint="fp-b")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ToyError, match="not a readable search checkpoint"):
        _run(3, junk)
    assert ck.read_bytes() == before and junk.read_bytes() == b"not a checkpoint"
    with pytest.raises(CodesignError, match="no episode"):
        _run(0)
