"""The AMC environment: one step per prunable unit, action = preserve ratio, latency-bounded.

An episode walks the units of `policy.structure` in network order. At each step the agent sees
the unit's embedding (AMC's layer embedding, latency instead of FLOPs; every feature min-max
normalised over the units, so each lies in [0, 1]):

    static  index, kind (mid/out), channels, owning block's cin, cout, stride, kernel, input
            height, MACs and LUT latency of the blocks the unit shapes, share of the base
            latency in blocks after the unit
    dynamic floor: the predicted latency with the decisions so far and every later unit at its
            smallest width, over the base latency; the previous action

and answers a in [0, 1]: the kept ratio lbound + a * (rbound - lbound), rounded to an allowed
channel count (multiples of `divisor`, or all channels). The resource-constrained mode (AMC's
"action wall") then lowers the count until the predicted latency of the network (decisions so
far, this count, every later unit at its smallest width) fits the budget; the first step checks
that the smallest network fits at all. So every episode's policy meets the budget *by the
latency model's prediction*, whatever the agent does. The reward is the accuracy on a fixed
image subset of the pruned network without fine-tuning (`acc`, in [0, 1]), or AMC's
-error * log(latency in microseconds) (`error_log_latency`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from codesign.blocks import BlockSpec
from codesign.compression.amc.policy import (
    PruneError,
    PrunePolicy,
    Structure,
    pruned_specs,
    structure,
)
from codesign.compression.amc.surgery import prune_network, recalibrate_bn
from codesign.compression.ddpg import DDPGConfig
from codesign.data import Dataset
from codesign.modules import Network
from codesign.train import evaluate

REWARDS = ("acc", "error_log_latency")


class LatencySource(Protocol):
    """What the environment asks of a latency model (`codesign.latency.LatencyModel` fits)."""

    def predict_blocks(self, specs: Sequence[BlockSpec]) -> float: ...

    def block_ms(self, spec: BlockSpec) -> float: ...


@dataclass(frozen=True, slots=True)
class AMCConfig:
    episodes: int = 300
    lbound: float = 0.2  # smallest kept ratio an action can ask for
    rbound: float = 1.0
    divisor: int = 4  # kept channel counts are multiples of this (or the full count)
    prune_outputs: bool = True  # block outputs too (shortcut groups pruned together)
    reward: str = "acc"
    reward_split: str = "train"  # images the reward is measured on (AMC: training images)
    reward_images: int = 1000
    reconstruct: bool = False  # least-squares refit of the next layer (AMC's option)
    calib_images: int = 128  # training images for the refit and the BN statistics
    bn_recalibrate: bool = True  # refresh BatchNorm statistics of the pruned network
    seed: int = 0
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.lbound <= self.rbound <= 1.0:
            raise PruneError(
                f"need 0 < lbound <= rbound <= 1, got lbound={self.lbound}, rbound={self.rbound}"
            )
        if self.episodes < 0 or self.divisor < 1 or self.reward_images < 1:
            raise PruneError("episodes >= 0, divisor >= 1 and reward_images >= 1 are required")
        if self.reward not in REWARDS:
            raise PruneError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.reward_split not in ("train", "val"):
            raise PruneError(f"reward_split must be 'train' or 'val', got {self.reward_split!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ddpg"] = self.ddpg.to_dict()
        return d

    def search_key(self) -> dict[str, Any]:
        """What a resumed search must share with the checkpoint (not the episode count)."""
        d = self.to_dict()
        d.pop("episodes")
        return d


def allowed_counts(channels: int, lbound: float, divisor: int) -> tuple[int, ...]:
    """Kept-channel counts an action may choose, ascending (always includes `channels`)."""
    low = max(1, math.ceil(lbound * channels - 1e-9))
    first = max(divisor, math.ceil(low / divisor) * divisor)
    return tuple(sorted({*range(first, channels, divisor), channels}))


def reachable_ms(
    network: Network, data: Dataset, latency: LatencySource, config: AMCConfig
) -> tuple[float, float]:
    """(floor, unpruned): the predicted latency with every unit at its smallest allowed width,
    and without pruning: the budgets AMC can meet lie between them."""
    env = AMCEnv(network, data, latency, math.inf, config)
    return env.floor_ms, env.base_ms


def normalized(rows: list[list[float]]) -> np.ndarray:
    """Each column of a unit embedding scaled to [0, 1] (constant columns to 0)."""
    x = np.asarray(rows, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    return ((x - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def wanted_width(action: float, channels: int, options: tuple[int, ...], c: AMCConfig) -> int:
    """The allowed width nearest the agent's `action` in [0, 1] (mapped to [lbound, rbound])."""
    ratio = c.lbound + float(np.clip(action, 0.0, 1.0)) * (c.rbound - c.lbound)
    return min(options, key=lambda o: (abs(o - ratio * channels), o))


def taken_action(chosen: int, channels: int, c: AMCConfig) -> float:
    """The action that `chosen` channels correspond to (the next state's previous action)."""
    span = max(c.rbound - c.lbound, 1e-9)
    return float(np.clip((chosen / channels - c.lbound) / span, 0.0, 1.0))


def reward_of(acc: float, ms: float, c: AMCConfig) -> float:
    """AMC's reward: accuracy, or the error weighted by log latency (in microseconds)."""
    if c.reward == "acc":
        return acc / 100.0
    return -(1.0 - acc / 100.0) * math.log(max(ms * 1000.0, 1.0 + 1e-9))


class EpisodeState:
    """The DDPG state of an AMC episode: the current unit's static embedding (`_static`, one
    row per unit) plus the latency floor reached and the previous action."""

    _static: np.ndarray
    t: int
    floor_ms: float
    base_ms: float
    prev_action: float

    @property
    def state_dim(self) -> int:
        return self._static.shape[1] + 2

    def _state(self) -> np.ndarray:
        dyn = [min(1.0, self.floor_ms / self.base_ms), self.prev_action]
        return np.concatenate([self._static[self.t], np.asarray(dyn, dtype=np.float32)])


class AMCEnv(EpisodeState):
    """Prune `network` under `budget_ms` as predicted by the latency model `latency`."""

    def __init__(
        self,
        network: Network,
        data: Dataset,
        latency: LatencySource,
        budget_ms: float,
        config: AMCConfig,
    ) -> None:
        self.network = network.eval()
        self.data = data
        self.config = config
        self.budget_ms = float(budget_ms)
        self.st: Structure = structure(network.specs, prune_outputs=config.prune_outputs)
        if not self.st.units:
            raise PruneError("the network has no prunable channels")
        self._latency = latency
        self._cache: dict[tuple[str, ...], float] = {}
        self.options = {
            u.name: allowed_counts(u.channels, config.lbound, config.divisor) for u in self.st.units
        }
        self.base_ms = self.latency({})
        self._static = self._embed()
        self.calibration = data.calibration(config.calib_images, seed=config.seed)
        self.reset()
        if self.floor_ms > self.budget_ms:
            raise PruneError(
                f"the latency budget {self.budget_ms:.4g} ms is below the smallest latency this "
                f"pruning can reach ({self.floor_ms:.4g} ms with every unit at its smallest "
                f"width; unpruned: {self.base_ms:.4g} ms). Raise the budget or lower lbound."
            )

    # ---------------------------------------------------------------- latency
    def specs(self, counts: dict[str, int]) -> tuple[BlockSpec, ...]:
        return pruned_specs(self.st, counts)

    def latency(self, counts: dict[str, int]) -> float:
        """Predicted ms of the network with `counts` (cached; the prediction is deterministic)."""
        specs = self.specs(counts)
        key = tuple(s.key for s in specs)
        if key not in self._cache:
            self._cache[key] = float(self._latency.predict_blocks(specs))
        return self._cache[key]

    def complete(self, decided: dict[str, int]) -> dict[str, int] | None:
        """`decided` plus every other unit as small as possible without adding a shortcut."""
        return self._assign(decided, self.options)

    def _assign(
        self, decided: dict[str, int], prefs: Mapping[str, Sequence[int]]
    ) -> dict[str, int] | None:
        """Fill the undecided units in network order, each with its first width in `prefs`
        that adds no shortcut; where that leaves a later unit no width (e.g. an 8-channel
        group whose only option equals its neighbour's), a depth-first search backtracks.
        None if no assignment exists."""
        todo = [u.name for u in self.st.units if u.name not in decided]
        counts = dict(decided)
        budget = [20000]  # visited nodes: the pairwise constraints keep this tiny in practice

        def fill(k: int) -> bool:
            if k == len(todo):
                return True
            budget[0] -= 1
            if budget[0] < 0:
                return False
            name = todo[k]
            for c in prefs[name]:
                if self._shortcut_free(counts, name, c):
                    counts[name] = c
                    if fill(k + 1):
                        return True
                    del counts[name]
            return False

        return counts if fill(0) else None

    def _shortcut_free(self, counts: dict[str, int], unit: str, c: int) -> bool:
        for i, u_in, u_out in self.st.no_shortcut:
            s = self.st.specs[i]
            if unit == u_in:
                other = counts.get(u_out, s.cout) if u_out else s.cout
            elif unit == u_out:
                other = counts.get(u_in, s.cin) if u_in else s.cin
            else:
                continue
            # a side not yet decided may still change: only fixed or decided sides constrain
            side = u_out if unit == u_in else u_in
            if (side is None or side in counts) and other == c:
                return False
        return True

    # ---------------------------------------------------------------- embedding
    def _embed(self) -> np.ndarray:
        rows = []
        block_ms = [self._latency.block_ms(s) for s in self.st.specs]
        total = sum(block_ms) or 1.0
        for t, u in enumerate(self.st.units):
            owner = self.st.specs[u.block]
            after = sum(block_ms[i] for i in range(max(u.blocks) + 1, len(block_ms)))
            rows.append(
                [
                    t,
                    float(u.kind == "out"),
                    u.channels,
                    owner.cin,
                    owner.cout,
                    owner.stride,
                    owner.kernel,
                    owner.h,
                    sum(self.st.specs[i].macs() for i in u.blocks),
                    sum(block_ms[i] for i in u.blocks),
                    after / total,
                ]
            )
        return normalized(rows)

    # ---------------------------------------------------------------- episode
    def reset(self) -> np.ndarray:
        self.t = 0
        self.decided: dict[str, int] = {}
        self.prev_action = 1.0
        self.completion = self.complete({})
        if self.completion is None:
            raise PruneError("no unit widths avoid adding a shortcut; lower --divisor")
        self.floor_ms = self.latency(self.completion)
        return self._state()

    @property
    def done(self) -> bool:
        return self.t >= len(self.st.units)

    def step(self, action: float) -> np.ndarray | None:
        """Decide the current unit from `action` in [0, 1]; the next state, or None at the end."""
        if self.done:
            raise PruneError("the episode is over; call reset()")
        u = self.st.units[self.t]
        c = self.config
        opts = self.options[u.name]
        want = wanted_width(action, u.channels, opts, c)
        chosen, completion = None, None
        for cand in sorted((o for o in opts if o <= want), reverse=True):
            if not self._shortcut_free(self.decided, u.name, cand):
                continue
            full = self.complete({**self.decided, u.name: cand})
            if full is not None and self.latency(full) <= self.budget_ms:
                chosen, completion = cand, full
                break
        if chosen is None:  # the previous step's completion always fits
            assert self.completion is not None
            chosen, completion = self.completion[u.name], self.completion
        assert completion is not None  # set together with `chosen`
        self.decided[u.name] = chosen
        self.completion = completion
        self.floor_ms = self.latency(completion)
        self.prev_action = taken_action(chosen, u.channels, c)
        self.t += 1
        return None if self.done else self._state()

    def policy(self) -> PrunePolicy:
        return PrunePolicy.from_counts(self.st, self.decided)

    # ---------------------------------------------------------------- baseline
    def uniform_counts(self, ratio: float) -> dict[str, int] | None:
        """Every unit at the allowed width nearest below ratio x its channels (no new shortcut:
        where a width would add one, the next smaller, else the next larger)."""
        prefs = {}
        for u in self.st.units:
            opts = self.options[u.name]
            below = [o for o in opts if o <= max(ratio * u.channels, opts[0]) + 1e-9]
            prefs[u.name] = sorted(below, reverse=True) + [o for o in opts if o not in below]
        return self._assign({}, prefs)

    def uniform_policy(self, step: float = 0.01) -> tuple[PrunePolicy, float]:
        """Uniform pruning to the budget: the largest ratio (on a `step` grid) that fits.

        Bisection on the grid (latency grows with the ratio, up to measurement noise), then a
        downward walk if the found ratio does not fit. Returns the policy and its ratio.
        """
        grid = [round(self.config.lbound + i * step, 6) for i in range(int(1 / step) + 1)]
        grid = [r for r in grid if r <= 1.0]

        def fits(r: float) -> bool:
            c = self.uniform_counts(r)
            return c is not None and self.latency(c) <= self.budget_ms

        lo, hi = 0, len(grid) - 1
        if fits(grid[hi]):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(grid[mid]) else (lo, mid)
        for i in range(lo, -1, -1):
            if fits(grid[i]):
                counts = self.uniform_counts(grid[i])
                assert counts is not None
                return PrunePolicy.from_counts(self.st, counts), grid[i]
        raise PruneError(
            f"no uniform ratio >= lbound {self.config.lbound} meets {self.budget_ms:.4g} ms"
        )

    # ---------------------------------------------------------------- reward
    def score(self, policy: PrunePolicy) -> dict[str, float]:
        """Accuracy (percent) of the pruned network without fine-tuning, latency and reward."""
        counts = policy.counts(self.st)
        pruned, _ = prune_network(
            self.network,
            policy,
            prune_outputs=self.config.prune_outputs,
            calibration=self.calibration if self.config.reconstruct else None,
            seed=self.config.seed,
        )
        if self.config.bn_recalibrate:
            recalibrate_bn(pruned, self.calibration)
        acc = evaluate(pruned, self.data, self.config.reward_split, limit=self.config.reward_images)
        ms = self.latency(counts)
        return {"acc": acc, "latency_ms": ms, "reward": reward_of(acc, ms, self.config)}
