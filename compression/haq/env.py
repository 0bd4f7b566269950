"""The HAQ environment.

An episode walks the quantisable layers twice per layer (weight bits, then activation bits),
as HAQ does. The state of a step is HAQ's layer embedding

    (layer index, c_in, c_out, kernel, stride, feature size, #params, depthwise, weight/act,
     previous action)

min-max normalised per feature over the episode's steps. A continuous action in [0, 1] picks a
rung of the bit ladder (2..8 bits, then the float widths on the target's menu). At the end the
resource constraint is enforced HAQ's way: bits are lowered greedily, layer by layer from the
last, until the budget (latency in ms from the LUT, or exact size in MiB) is met; lowering that
cannot change the cost is skipped (on latency: layers of blocks already int8, or of blocks whose
int8 version is not faster). A block executes in int8 only where the LUT says int8 beats
fp32 on this target; elsewhere its layers run in float with their (possibly sub-8-bit) weights.
The reward is HAQ's: 0.1 x (accuracy after a short QAT fine-tune on
a training subset - accuracy of the float network), accuracies in percent on a validation subset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from codesign.blocks import BlockSpec
from codesign.compression.quant.fakequant import Range, quantize_network, set_policy
from codesign.compression.quant.layers import QLayer, quant_layers
from codesign.compression.quant.policy import INT_BITS, PolicyError, QuantPolicy
from codesign.compression.quant.qat import QATConfig, finetune
from codesign.data import Dataset
from codesign.errors import CodesignError
from codesign.modules import Network
from codesign.tvm_backend.precision import PrecisionMenu

BUDGETS = ("latency", "size")
STATE_DIM = 10


class BudgetError(CodesignError, ValueError):
    """A resource budget that no policy on the target's precision menu can meet."""


@dataclass(frozen=True, slots=True)
class HAQConfig:
    budget_kind: str  # "latency" (ms) or "size" (MiB)
    budget: float
    min_bits: int = 2
    qat: QATConfig = field(default_factory=QATConfig)
    val_images: int = 1000  # validation images the reward is measured on
    reward_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.budget_kind not in BUDGETS:
            raise BudgetError(f"budget kind must be one of {BUDGETS}, got {self.budget_kind!r}")
        if not self.budget > 0:
            raise BudgetError(f"the {self.budget_kind} budget must be positive, got {self.budget}")
        if self.min_bits not in INT_BITS:
            raise PolicyError(f"min_bits must be in 2..8, got {self.min_bits}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qat"] = self.qat.to_dict()
        return d


def bit_ladder(menu: PrecisionMenu, min_bits: int = 2) -> tuple[int, ...]:
    """Bit widths an action can choose: integer bits, then the menu's float widths."""
    ints = tuple(range(min_bits, 9)) if menu.has_int8 else ()
    floats = (16,) * ("fp16" in menu.precisions) + (32,)
    return ints + floats


def layer_embedding(layers: Sequence[QLayer]) -> np.ndarray:
    """HAQ's per-step state (2 steps per layer), previous action left at 0, min-max scaled."""
    rows = []
    for ly in layers:
        for is_weight in (1.0, 0.0):
            rows.append(
                [
                    ly.index,
                    ly.cin,
                    ly.cout,
                    ly.kernel,
                    ly.stride,
                    ly.h * ly.w,
                    ly.weights,
                    float(ly.depthwise),
                    is_weight,
                    0.0,
                ]
            )
    x = np.asarray(rows, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((x - lo) / span).astype(np.float32)


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    policy: QuantPolicy
    actions: tuple[float, ...]  # the enforced actions (what the policy really is)
    cost: float  # ms or MiB
    accuracy: float
    reward: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.encode(),
            "cost": self.cost,
            "accuracy": self.accuracy,
            "reward": self.reward,
        }


class HAQEnv:
    """One network, one target menu, one budget. `latency(blocks)` prices blocks in ms."""

    def __init__(
        self,
        net: Network,
        data: Dataset,
        ranges: Sequence[Range],
        menu: PrecisionMenu,
        latency: Callable[[Sequence[BlockSpec]], float],
        config: HAQConfig,
    ) -> None:
        from codesign.train import evaluate

        self.blocks = tuple(net.specs)
        self.layers = quant_layers(self.blocks)
        self.data, self.menu, self.latency, self.config = data, menu, latency, config
        self.ladder = bit_ladder(menu, config.min_bits)
        self.base = quantize_network(net, ranges)  # float until a policy is set
        self.states = layer_embedding(self.layers)
        self.float_accuracy = evaluate(self.base, data, limit=config.val_images)
        self.accuracy_cache: dict[str, float] = {}
        self._actions: list[float] = []
        self.float_policy = QuantPolicy.uniform(self.blocks, 32, 32, menu)
        self.fastest_float = tuple(self._fastest_float(b) for b in self.blocks)
        self.fp16_blocks = tuple(p == "fp16" for p in self.fastest_float)
        self.int8_blocks = self._faster_blocks()
        self.cheapest = tuple(
            "int8" if fast else fp
            for fast, fp in zip(self.int8_blocks, self.fastest_float, strict=True)
        )  # per block: the precision with the lowest LUT latency that lowering bits can reach
        self._useful = self._useful_blocks()
        low = self.min_cost_policy()
        if self.cost(low) > config.budget:
            raise BudgetError(
                f"no policy meets the {config.budget_kind} budget {config.budget:g} "
                f"{self.unit} on {menu.target_key}: the cheapest reachable policy costs "
                f"{self.cost(low):.4g} {self.unit} (float: {self.cost(self.float_policy):.4g}). "
                "Raise the budget."
            )

    # ------------------------------------------------------------ costs
    @property
    def unit(self) -> str:
        return "ms" if self.config.budget_kind == "latency" else "MiB"

    @property
    def steps(self) -> int:
        return 2 * len(self.layers)

    def cost(self, policy: QuantPolicy) -> float:
        if self.config.budget_kind == "size":
            return policy.size_mb(self.blocks)
        return float(self.latency(policy.apply(self.blocks)))

    def _fastest_float(self, b: BlockSpec) -> str:
        """The float precision a block runs fastest in on the menu (fp16 only if measured faster)."""
        floats = self.menu.float_precisions  # narrowest first
        return min(floats, key=lambda p: (self.latency([b.with_precision(p)]), -floats.index(p)))

    def _faster_blocks(self) -> tuple[bool, ...]:
        """Per block: does the LUT say int8 runs it faster than any float on the menu? (Only then
        is a block executed in int8; otherwise its sub-8-bit weights are stored low and it runs
        in float: fp16 where the menu has it, as `QuantPolicy.derive` does for bits <= 16.)"""
        if not self.menu.has_int8:
            return (False,) * len(self.blocks)
        return tuple(
            self.latency([b.with_precision("int8")]) < self.latency([b.with_precision(fp)])
            for b, fp in zip(self.blocks, self.fastest_float, strict=True)
        )

    def _useful_blocks(self) -> tuple[bool, ...]:
        """Per block: can lowering its bits lower the cost?"""
        if self.config.budget_kind == "size":
            return (True,) * len(self.blocks)
        return tuple(p != "fp32" for p in self.cheapest)

    def derive(self, bits: Sequence[Sequence[int]]) -> QuantPolicy:
        """What the target executes for raw per-layer bits (int8 and fp16 only where faster)."""
        return QuantPolicy.derive(
            self.blocks,
            [cast(tuple[int, int], tuple(b)) for b in bits],
            self.menu,
            self.int8_blocks,
            self.fp16_blocks,
        )

    def min_cost_policy(self) -> QuantPolicy:
        """Where greedy lowering ends: every useful layer at the lowest bits."""
        lo = self.config.min_bits
        if self.config.budget_kind == "size":
            return self.derive([(lo, 32) for _ in self.layers])
        return self.derive([(lo, lo) if self._useful[ly.block] else (32, 32) for ly in self.layers])

    # ------------------------------------------------------------ actions
    def bits_of(self, action: float) -> int:
        i = int(np.clip(action, 0.0, 1.0) * len(self.ladder))
        return self.ladder[min(i, len(self.ladder) - 1)]

    def action_of(self, bits: int) -> float:
        return (self.ladder.index(bits) + 0.5) / len(self.ladder)

    def reset(self) -> np.ndarray:
        self._actions = []
        return self.state(0)

    def state(self, t: int) -> np.ndarray:
        s = self.states[t].copy()
        s[-1] = self._actions[-1] if self._actions and t > 0 else 0.0
        return s

    def step(self, action: float) -> np.ndarray | None:
        """Record the action of the current step; the next state, or None when done."""
        if len(self._actions) >= self.steps:
            raise CodesignError("episode is over; call finish() and reset()")
        self._actions.append(float(np.clip(action, 0.0, 1.0)))
        t = len(self._actions)
        return None if t == self.steps else self.state(t)

    # ------------------------------------------------------------ budget
    def _lower(self, bits: int) -> int:
        i = self.ladder.index(bits)
        return self.ladder[i - 1] if i > 0 else bits

    def enforce(self, bits: Sequence[tuple[int, int]]) -> QuantPolicy:
        """HAQ's greedy wall: lower bits layer by layer (from the last) until within budget."""
        cur = [list(b) for b in bits]
        policy = self.derive(cur)
        budget, size = self.config.budget, self.config.budget_kind == "size"
        while self.cost(policy) > budget:
            changed = False
            for ly in reversed(self.layers):
                if not self._useful[ly.block]:
                    continue
                if not size and policy.precisions[ly.block] == self.cheapest[ly.block]:
                    continue  # already at its fastest precision: fewer bits would not help
                w, a = cur[ly.index]
                cur[ly.index] = [self._lower(w), a if size else self._lower(a)]
                changed |= cur[ly.index] != [w, a]
                policy = self.derive(cur)
                if self.cost(policy) <= budget:
                    break
            if not changed:
                raise BudgetError(
                    f"cannot meet the {self.config.budget_kind} budget {budget:g} {self.unit}"
                )
        return policy

    def probe_actions(self) -> tuple[float, ...]:
        """HAQ's reference point, the search's first episode: every layer at the widest bits the
        menu runs exactly in int8 (w8a8, or w7a8 where the kernel's pair sums saturate), so in
        int8 wherever the LUT measured that faster, else in its fastest float. Random warm-up
        episodes alone chose 2-bit weights somewhere in every policy (a MobileNetV2 search of 4
        episodes kept 44% of 96% accuracy); with the probe, the search returns nothing less
        accurate than uniform 8-bit quantization within the budget."""
        if not self.menu.has_int8:
            return (self.action_of(self.ladder[0]),) * self.steps
        w = 8 if self.menu.int8_exact(8, 8) else 7
        return (self.action_of(w), self.action_of(8)) * len(self.layers)

    def policy_actions(self, policy: QuantPolicy) -> tuple[float, ...]:
        out = []
        for lb in policy.layers:
            out += [self.action_of(lb.w), self.action_of(lb.a)]
        return tuple(out)

    # ------------------------------------------------------------ reward
    def accuracy(self, policy: QuantPolicy) -> float:
        """Validation accuracy after a short seeded QAT fine-tune (cached per policy)."""
        from codesign.compression.quant.fakequant import copy_network
        from codesign.train import evaluate

        key = policy.encode()
        if key not in self.accuracy_cache:
            qnet = set_policy(copy_network(self.base), policy)
            finetune(qnet, self.data, self.config.qat)
            self.accuracy_cache[key] = evaluate(qnet, self.data, limit=self.config.val_images)
        return self.accuracy_cache[key]

    def finish(self) -> EpisodeResult:
        """Enforce the budget on the episode's actions, fine-tune, score."""
        if len(self._actions) != self.steps:
            raise CodesignError(f"episode has {len(self._actions)} of {self.steps} actions")
        acts = self._actions
        raw = [
            (self.bits_of(acts[2 * i]), self.bits_of(acts[2 * i + 1]))
            for i in range(len(self.layers))
        ]
        policy = self.enforce(raw)
        acc = self.accuracy(policy)
        reward = self.config.reward_scale * (acc - self.float_accuracy)
        return EpisodeResult(policy, self.policy_actions(policy), self.cost(policy), acc, reward)
