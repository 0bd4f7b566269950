"""The shared DDPG agent: learns a toy optimum, is seeded, and resumes exactly from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from codesign.compression.ddpg import (
    DDPGAgent,
    DDPGConfig,
    DDPGError,
    truncated_normal,
)

STEPS = 4
OPTIMUM = 0.7


def toy_state(t: int, prev: float) -> np.ndarray:
    return np.array([t / (STEPS - 1), prev, 1.0], dtype=np.float32)


def toy_episode(agent: DDPGAgent, episode: int, explore: bool = True) -> tuple[list[float], float]:
    """One episode of the toy task: reward peaks when every step's action is OPTIMUM."""
    states, actions, prev = [], [], 0.0
    for t in range(STEPS):
        s = toy_state(t, prev)
        a = agent.act(s, episode, explore=explore)
        states.append(s)
        actions.append(a)
        prev = a
    reward = -float(np.mean((np.array(actions) - OPTIMUM) ** 2))
    if explore:
        agent.observe_episode(states, actions, reward)
        agent.update()
    return actions, reward


def run(agent: DDPGAgent, start: int, stop: int) -> list[list[float]]:
    return [toy_episode(agent, ep)[0] for ep in range(start, stop)]


def test_learns_toy_optimum() -> None:
    agent = DDPGAgent(3, DDPGConfig(warmup_episodes=10, seed=0))
    random_reward = np.mean([toy_episode(agent, ep)[1] for ep in range(10)])
    run(agent, 10, 120)
    greedy, reward = toy_episode(agent, 120, explore=False)
    # a uniform random action is off by 0.29 on average; seeds 0-4 all end within 0.14
    assert np.mean(np.abs(np.array(greedy) - OPTIMUM)) < 0.15, greedy
    assert reward > 0.2 * random_reward  # mean squared error cut by more than 5x


def test_same_seed_same_policy() -> None:
    cfg = DDPGConfig(hidden=32, warmup_episodes=5, batch_size=16, seed=3)
    a, b = DDPGAgent(3, cfg), DDPGAgent(3, cfg)
    assert run(a, 0, 20) == run(b, 0, 20)
    for (na, pa), (nb, pb) in zip(
        a.actor.state_dict().items(), b.actor.state_dict().items(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb)
    c = DDPGAgent(3, DDPGConfig(hidden=32, warmup_episodes=5, batch_size=16, seed=4))
    assert run(c, 0, 20) != run(DDPGAgent(3, cfg), 0, 20)


def test_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    cfg = DDPGConfig(hidden=32, warmup_episodes=4, batch_size=16, buffer_size=40, seed=1)
    whole = DDPGAgent(3, cfg)
    expected = run(whole, 0, 24)
    first = DDPGAgent(3, cfg)
    assert run(first, 0, 12) == expected[:12]
    torch.save(first.state_dict(), tmp_path / "agent.pt")
    del first
    resumed = DDPGAgent(3, cfg)
    resumed.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    assert run(resumed, 12, 24) == expected[12:]  # buffer wrapped around (40 < 24 * 4)
    assert resumed.episodes == whole.episodes == 24 and resumed.updates == whole.updates
    for pa, pb in zip(whole.critic.parameters(), resumed.critic.parameters(), strict=True):
        assert torch.equal(pa, pb)
    other = DDPGAgent(3, DDPGConfig(hidden=32, seed=1))
    with pytest.raises(DDPGError, match="another state size or config"):
        other.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    with pytest.raises(DDPGError, match="not a DDPG agent checkpoint"):
        other.load_state_dict({"actor": {}})


def test_warmup_is_random_and_does_not_learn() -> None:
    agent = DDPGAgent(3, DDPGConfig(hidden=16, warmup_episodes=3, seed=0))
    before = [p.clone() for p in agent.actor.parameters()]
    for ep in range(3):
        toy_episode(agent, ep)
        assert agent.update() == {}
    assert all(torch.equal(p, q) for p, q in zip(before, agent.actor.parameters(), strict=True))
    toy_episode(agent, 3)  # the 4th episode: learning starts
    stats = agent.update(steps=2)
    assert stats["steps"] == 2 and np.isfinite(stats["critic_loss"])
    assert not all(torch.equal(p, q) for p, q in zip(before, agent.actor.parameters(), strict=True))
    assert agent.sigma(3) == pytest.approx(0.5) and agent.sigma(13) < agent.sigma(4)


def test_truncated_normal_stays_in_range() -> None:
    rng = np.random.default_rng(0)
    for mu in (0.0, 0.3, 1.0):
        xs = np.array([truncated_normal(rng, mu, 0.5) for _ in range(2000)])
        assert xs.min() >= 0.0 and xs.max() <= 1.0
    xs = np.array([truncated_normal(rng, 0.5, 0.05) for _ in range(2000)])
    assert abs(xs.mean() - 0.5) < 0.01 and abs(xs.std() - 0.05) < 0.01
    assert truncated_normal(rng, 0.4, 0.0) == 0.4


def test_bad_input_is_refused() -> None:
    with pytest.raises(DDPGError, match="tau"):
        DDPGConfig(tau=0.0)
    agent = DDPGAgent(3, DDPGConfig(hidden=8))
    with pytest.raises(DDPGError, match=r"shape \(3,\)"):
        agent.act(np.zeros(4), 0)
    with pytest.raises(DDPGError, match="one action per state"):
        agent.observe_episode([np.zeros(3)], [0.1, 0.2], 1.0)
    with pytest.raises(DDPGError, match=r"\[0, 1\]"):
        agent.observe_episode([np.zeros(3)], [1.5], 1.0)
    with pytest.raises(DDPGError, match="finite"):
        agent.observe_episode([np.zeros(3)], [0.5], float("nan"))
