"""The DDPG agent shared by the AMC (pruning) and HAQ (quantisation) environments.

As in AMC and HAQ: an actor maps a layer's state (features normalised to [0, 1] by the
environment) to one continuous action in [0, 1]; a critic scores (state, action). Each episode
walks the layers once and earns one reward, which every step of the episode shares
(`observe_episode`). The first `warmup_episodes` episodes act uniformly at random and do not
learn; afterwards actions are drawn from a normal distribution around the actor's output,
truncated to [0, 1], whose sigma decays by `sigma_decay` per episode. Each update subtracts a
moving average of the sampled rewards (the baseline AMC and HAQ use) before the TD target.

Everything random draws from the agent's own generators (numpy for exploration and replay
sampling, a torch generator for initial weights), so the same seed gives the same actions and
the same learned policy, and `state_dict()` (networks, optimisers, replay buffer, RNG states,
counters) lets an interrupted search resume exactly. `state_dict()` holds only tensors and
plain Python values, so `torch.save` / `torch.load(weights_only=True)` round-trip it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from codesign.errors import CodesignError

FORMAT = "codesign-ddpg/1"


class DDPGError(CodesignError, ValueError):
    """Bad agent configuration, inputs of the wrong shape, or a checkpoint that does not fit."""


@dataclass(frozen=True, slots=True)
class DDPGConfig:
    hidden: int = 300  # actor/critic hidden width (AMC/HAQ: 300)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01  # soft target update
    discount: float = 1.0  # episodic, reward shared by all steps (AMC/HAQ)
    batch_size: int = 64
    buffer_size: int = 2000
    warmup_episodes: int = 20  # random actions before learning
    init_sigma: float = 0.5  # truncated-normal exploration noise
    sigma_decay: float = 0.95  # per episode after warm-up
    seed: int = 0
    baseline_alpha: float = 0.5  # moving-average reward baseline (AMC: 0.5)
    updates_per_step: int = 1  # gradient steps per observed transition (AMC/HAQ: 1)

    def __post_init__(self) -> None:
        checks = {
            "hidden": self.hidden >= 1,
            "actor_lr": self.actor_lr > 0,
            "critic_lr": self.critic_lr > 0,
            "tau": 0 < self.tau <= 1,
            "discount": 0 <= self.discount <= 1,
            "batch_size": self.batch_size >= 1,
            "buffer_size": self.buffer_size >= 1,
            "warmup_episodes": self.warmup_episodes >= 0,
            "init_sigma": self.init_sigma >= 0,
            "sigma_decay": 0 < self.sigma_decay <= 1,
            "baseline_alpha": 0 <= self.baseline_alpha <= 1,
            "updates_per_step": self.updates_per_step >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise DDPGError(
                f"invalid DDPG setting {bad[0]}={getattr(self, bad[0])!r}; see DDPGConfig for "
                "the allowed ranges"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DDPGConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the small actor/critic matmuls on one thread, then restore the caller's setting.

    Batches of 64 x 300 gain nothing from intra-op threads, and on a busy machine the thread
    pool's synchronisation makes each step an order of magnitude slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Actor(nn.Module):
    """state -> action in [0, 1] (two hidden ReLU layers, sigmoid output, as AMC/HAQ)."""

    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
            nn.Sigmoid(),
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    """(state, action) -> Q: the state and action branches are summed in the first layer."""

    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.fs = nn.Linear(state_dim, hidden)
        self.fa = nn.Linear(1, hidden)
        self.out = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.out(self.fs(state) + self.fa(action))


def _init_linear(module: nn.Module, gen: torch.Generator) -> None:
    """Uniform fan-in init for hidden layers, small uniform for the output layer (DDPG paper)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, m in enumerate(linears):
            bound = 3e-3 if i == len(linears) - 1 else 1.0 / m.weight.shape[1] ** 0.5
            m.weight.uniform_(-bound, bound, generator=gen)
            m.bias.uniform_(-bound, bound, generator=gen)


def truncated_normal(
    rng: np.random.Generator, mu: float, sigma: float, low: float = 0.0, high: float = 1.0
) -> float:
    """One draw of N(mu, sigma) truncated to [low, high], by inverting the CDF (no rejection)."""
    from scipy.special import ndtr, ndtri

    mu = float(np.clip(mu, low, high))
    if sigma <= 1e-8:
        return mu
    a, b = ndtr((low - mu) / sigma), ndtr((high - mu) / sigma)
    u = a + (b - a) * rng.random()
    x = mu + sigma * float(ndtri(min(max(u, 1e-300), 1.0 - 1e-16)))
    return float(np.clip(x, low, high))


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, s', done) in fixed-size tensors."""

    def __init__(self, state_dim: int, size: int) -> None:
        self.size = size
        self.states = torch.zeros(size, state_dim)
        self.actions = torch.zeros(size, 1)
        self.rewards = torch.zeros(size, 1)
        self.next_states = torch.zeros(size, state_dim)
        self.dones = torch.zeros(size, 1)
        self.count = 0  # transitions ever added
        self.pos = 0

    def __len__(self) -> int:
        return min(self.count, self.size)

    def add(self, s: np.ndarray, a: float, r: float, s1: np.ndarray, done: bool) -> None:
        i = self.pos
        self.states[i] = torch.as_tensor(s, dtype=torch.float32)
        self.actions[i, 0] = float(a)
        self.rewards[i, 0] = float(r)
        self.next_states[i] = torch.as_tensor(s1, dtype=torch.float32)
        self.dones[i, 0] = float(done)
        self.pos = (self.pos + 1) % self.size
        self.count += 1

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(rng.integers(0, len(self), size=n))
        return (
            self.states[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_states[idx],
            self.dones[idx],
        )

    def state_dict(self) -> dict[str, Any]:
        n = len(self)
        return {
            "size": self.size,
            "count": self.count,
            "pos": self.pos,
            "states": self.states[:n].clone(),
            "actions": self.actions[:n].clone(),
            "rewards": self.rewards[:n].clone(),
            "next_states": self.next_states[:n].clone(),
            "dones": self.dones[:n].clone(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d["size"] != self.size or d["states"].shape[1:] != self.states.shape[1:]:
            raise DDPGError(
                f"replay buffer of the checkpoint (size {d['size']}, state dim "
                f"{tuple(d['states'].shape[1:])}) does not fit this agent"
            )
        n = d["states"].shape[0]
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, name)[:n] = d[name]
        self.count, self.pos = int(d["count"]), int(d["pos"])


class DDPGAgent:
    """DDPG over one continuous action in [0, 1] per step (see the module docstring)."""

    def __init__(self, state_dim: int, config: DDPGConfig | None = None) -> None:
        if not isinstance(state_dim, int) or state_dim < 1:
            raise DDPGError(f"state_dim must be a positive integer, got {state_dim!r}")
        self.config = config = config or DDPGConfig()
        self.state_dim = state_dim
        gen = torch.Generator().manual_seed(config.seed)
        self.actor = Actor(state_dim, config.hidden)
        self.critic = Critic(state_dim, config.hidden)
        _init_linear(self.actor, gen)
        _init_linear(self.critic, gen)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.buffer = ReplayBuffer(state_dim, config.buffer_size)
        self.rng = np.random.default_rng(config.seed)
        self.baseline: float | None = None
        self.episodes = 0  # episodes observed
        self.updates = 0  # gradient steps taken
        self._last_steps = 0

    # ------------------------------------------------------------------ acting
    def sigma(self, episode: int) -> float:
        """Exploration sigma for `episode` (0-based): init_sigma decayed after warm-up."""
        c = self.config
        return c.init_sigma * c.sigma_decay ** max(0, episode - c.warmup_episodes)

    def _state(self, state: np.ndarray | Sequence[float] | torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(np.asarray(state, dtype=np.float32))
        if s.shape != (self.state_dim,):
            raise DDPGError(f"expected a state of shape ({self.state_dim},), got {tuple(s.shape)}")
        return s

    def greedy(self, state: np.ndarray | Sequence[float] | torch.Tensor) -> float:
        """The actor's action for `state`, without exploration."""
        with torch.no_grad(), _one_thread():
            return float(self.actor(self._state(state)[None])[0, 0])

    def act(self, state: np.ndarray | Sequence[float], episode: int, explore: bool = True) -> float:
        """Action in [0, 1]: uniform in warm-up, else the actor's output plus truncated noise."""
        s = self._state(state)
        if not explore:
            return self.greedy(s)
        if episode < self.config.warmup_episodes:
            return float(self.rng.random())
        return truncated_normal(self.rng, self.greedy(s), self.sigma(episode))

    # ------------------------------------------------------------------ learning
    def observe_episode(
        self,
        states: Sequence[np.ndarray] | np.ndarray,
        actions: Sequence[float] | np.ndarray,
        reward: float,
    ) -> None:
        """Store the episode's transitions (s_t, a_t, reward, s_{t+1}, done) with one reward."""
        states = [self._state(s).numpy() for s in states]
        actions = [float(a) for a in actions]
        if not states or len(states) != len(actions):
            raise DDPGError(
                f"an episode needs one action per state (got {len(states)} states, "
                f"{len(actions)} actions)"
            )
        if not np.isfinite(reward):
            raise DDPGError(f"reward must be finite, got {reward!r}")
        if any(not 0.0 <= a <= 1.0 for a in actions):
            raise DDPGError("actions must lie in [0, 1] (the agent's action range)")
        n = len(states)
        for t in range(n):
            done = t == n - 1
            nxt = states[t] if done else states[t + 1]
            self.buffer.add(states[t], actions[t], float(reward), nxt, done)
        self.episodes += 1
        self._last_steps = n

    def update(self, steps: int | None = None) -> dict[str, float]:
        """Gradient steps (default: updates_per_step per step of the last episode).

        A no-op (returns {}) while the agent has observed no more than `warmup_episodes`.
        """
        c = self.config
        if self.episodes <= c.warmup_episodes or len(self.buffer) == 0:
            return {}
        steps = c.updates_per_step * self._last_steps if steps is None else steps
        with _one_thread():
            return self._learn(steps)

    def _learn(self, steps: int) -> dict[str, float]:
        c = self.config
        critic_losses, actor_losses = [], []
        for _ in range(steps):
            s, a, r, s1, done = self.buffer.sample(self.rng, c.batch_size)
            mean_r = float(r.mean())
            if self.baseline is None:
                self.baseline = mean_r
            else:
                self.baseline += c.baseline_alpha * (mean_r - self.baseline)
            r = r - self.baseline
            with torch.no_grad():
                q_next = self.critic_target(s1, self.actor_target(s1))
                target = r + c.discount * (1.0 - done) * q_next
            q = self.critic(s, a)
            critic_loss = nn.functional.mse_loss(q, target)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_opt.step()
            actor_loss = -self.critic(s, self.actor(s)).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self._soft_update(self.actor_target, self.actor)
            self._soft_update(self.critic_target, self.critic)
            critic_losses.append(float(critic_loss.detach()))
            actor_losses.append(float(actor_loss.detach()))
            self.updates += 1
        if not critic_losses:
            return {}
        return {
            "critic_loss": float(np.mean(critic_losses)),
            "actor_loss": float(np.mean(actor_losses)),
            "baseline": float(self.baseline or 0.0),
            "steps": float(len(critic_losses)),
        }

    def _soft_update(self, target: nn.Module, source: nn.Module) -> None:
        tau = self.config.tau
        with torch.no_grad():
            for t, s in zip(target.parameters(), source.parameters(), strict=True):
                t.mul_(1.0 - tau).add_(s, alpha=tau)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: networks, optimisers, buffer, RNG, counters."""
        return {
            "format": FORMAT,
            "state_dim": self.state_dim,
            "config": self.config.to_dict(),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "buffer": self.buffer.state_dict(),
            "rng": _rng_state(self.rng),
            "baseline": self.baseline,
            "episodes": self.episodes,
            "updates": self.updates,
            "last_steps": self._last_steps,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DDPGError(f"not a DDPG agent checkpoint ({FORMAT})")
        if d["state_dim"] != self.state_dim or d["config"] != self.config.to_dict():
            raise DDPGError(
                "the checkpoint was written by an agent with another state size or config "
                f"(state_dim {d['state_dim']} vs {self.state_dim}); start a fresh search or use "
                "the same settings"
            )
        self.actor.load_state_dict(d["actor"])
        self.critic.load_state_dict(d["critic"])
        self.actor_target.load_state_dict(d["actor_target"])
        self.critic_target.load_state_dict(d["critic_target"])
        self.actor_opt.load_state_dict(d["actor_opt"])
        self.critic_opt.load_state_dict(d["critic_opt"])
        self.buffer.load_state_dict(d["buffer"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = _rng_restore(d["rng"])
        self.baseline = d["baseline"]
        self.episodes, self.updates = int(d["episodes"]), int(d["updates"])
        self._last_steps = int(d["last_steps"])


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The PCG64 state as plain Python values (128-bit ints as decimal strings)."""
    st = rng.bit_generator.state
    return {
        "bit_generator": st["bit_generator"],
        "state": str(st["state"]["state"]),
        "inc": str(st["state"]["inc"]),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def _rng_restore(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("bit_generator") != "PCG64":
        raise DDPGError(f"unsupported RNG {d.get('bit_generator')!r} in checkpoint")
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(d["state"]), "inc": int(d["inc"])},
        "has_uint32": d["has_uint32"],
        "uinteger": d["uinteger"],
    }
