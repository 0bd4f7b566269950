"""AMC channel pruning of a user's own CNN against TVM-measured latency.

    graph = OwnGraph.build(model)      torch-pruning dependency groups + layer shapes
    latency(counts) = LUT sum * exp(w . (1, weight MiB, 1 / LUT sum))
                                       layers measured on demand with TVM into the LUT file
                                       (`layer:` keys); w a ridge fit (`fit_log_ratio`, as for
                                       the project's spaces) on whole networks measured with
                                       TVM in alternating passes (unpruned, uniformly and
                                       randomly pruned; `networks` table)
    DDPG search (codesign.compression.ddpg via amc.search.amc_search): one step per group,
        action = kept ratio, AMC's action wall keeps every episode within the budget, reward =
        accuracy on training images after a BatchNorm refresh (no fine-tuning)
    -> widen into the budget left (`fill_budget`); measure the policy's network beside the
       unpruned one and move it onto the budget (`to_budget`, `LayerLatency.relative_ms`)
    -> prune the best policy (torch-pruning) -> fine-tune (codesign.train) -> compile, measure

`prune_own(model, data, budget_ms=..., target=..., db=...)` returns a frozen `OwnPruneResult`.
The search checkpoints into `out` and resumes; layers and networks measured once are reused.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn

from codesign.compression.amc.budget import fill_budget, to_budget
from codesign.compression.amc.env import (
    AMCConfig,
    EpisodeState,
    allowed_counts,
    normalized,
    reward_of,
    taken_action,
    wanted_width,
)
from codesign.compression.amc.own_latency import (
    LayerLatency,
    OwnLatency,
    calibrate,
    calibration_counts,
    compile_own,
)
from codesign.compression.amc.own_layers import OwnGraph
from codesign.compression.amc.policy import PruneError
from codesign.compression.amc.surgery import recalibrate_bn
from codesign.data import Dataset
from codesign.latency.calibrate import Ridge
from codesign.measurement import MeasureProtocol
from codesign.targets import Target, parse_target
from codesign.train import TrainConfig, evaluate, train


@dataclass(frozen=True, slots=True)
class OwnSettings:
    amc: AMCConfig = field(default_factory=lambda: AMCConfig(episodes=30, lbound=0.25, divisor=8))
    levels: int = 8  # at most this many widths per group (bounds the layer shapes to measure)
    # layer shapes the LUT lacks: "measure" them with TVM (stored for every later run), or
    # "scale" the unpruned layer's measured ms by the MAC ratio (no compile: loaded machines)
    missing: str = "measure"
    # whole networks measured to fit the LUT sum's gap (`OwnLatency.fit`): the unpruned one,
    # uniformly pruned ones at these kept ratios and this many seeded random policies
    calibration_ratios: tuple[float, ...] = (0.75, 0.5, 0.25)
    calibration_random: int = 2
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.01))
    protocol: MeasureProtocol = field(default_factory=MeasureProtocol)
    device: str | None = None  # fine-tuning device (default: CUDA when present)
    # widen the searched policy's groups while the prediction stays within the budget
    # (`fill_budget`): a short search's best episode can leave a third of the budget unused
    fill: bool = True
    # then measure the policy's network whole and correct it towards the budget (`to_budget`),
    # at most this many times, each correction measured (a LUT sum scaled by a line through
    # two networks missed MobileNetV2's 0.6x policy by 30%, ResNet-18's by 20-45%)
    verify_rounds: int = 2

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise PruneError(f"levels must be >= 2, got {self.levels}")
        if self.verify_rounds < 0:
            raise PruneError(f"verify_rounds must be >= 0, got {self.verify_rounds}")
        if self.missing not in ("measure", "scale"):
            raise PruneError(f"missing must be 'measure' or 'scale', got {self.missing!r}")


@dataclass(frozen=True, slots=True)
class OwnPolicy:
    """Kept channels per group, in network order."""

    counts: tuple[tuple[str, int], ...]

    def encode(self) -> str:
        return ",".join(f"{n}={k}" for n, k in self.counts)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class OwnPruneResult:
    model: nn.Module  # pruned and fine-tuned (eval mode)
    policy: OwnPolicy
    budget_ms: float
    original_ms: float  # measured, TVM
    pruned_ms: float  # measured, TVM
    predicted_ms: float
    searched_ms: float  # predicted, the search's best policy before `fill_budget`
    verified: tuple[tuple[float, float], ...]  # (predicted, measured) ms of `to_budget`'s networks
    original_acc: float
    pruned_acc_before_finetune: float
    pruned_acc: float
    calibration: tuple[float, ...]  # w of `OwnLatency`: (1, weight MiB, 1 / LUT ms)
    calibration_error: float  # its leave-one-out RMS error of log(measured / predicted)
    layers_measured: int
    episodes: int
    seconds: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "model"}
        d["policy"] = self.policy.encode()
        d["speedup"] = self.speedup
        return d


def unit_options(graph: OwnGraph, config: AMCConfig, levels: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for u in graph.units:
        step = config.divisor * max(1, math.ceil(u.channels / levels / config.divisor))
        out[u.name] = allowed_counts(u.channels, config.lbound, min(step, u.channels))
    return out


def calibration_policies(graph: OwnGraph, settings: OwnSettings) -> list[dict[str, int]]:
    """The policies whose whole networks fit the latency model (`OwnSettings.calibration_*`,
    `calibration_counts`), over the widths the search may choose."""
    options = unit_options(graph, settings.amc, settings.levels)
    return calibration_counts(graph, options, settings.calibration_ratios,
                              settings.calibration_random, settings.amc.seed)  # fmt: skip


class _Fingerprint:
    """What amc.search.fingerprint reads of `env.network`: layer keys and weights."""

    def __init__(self, graph: OwnGraph) -> None:
        self.specs = tuple(graph.layers.values())
        self.state_dict = graph.model.state_dict


class OwnEnv(EpisodeState):
    """AMC's environment over torch-pruning groups; the interface amc.search.amc_search drives."""

    def __init__(self, graph: OwnGraph, data: Dataset, latency: OwnLatency, budget_ms: float,
                 config: AMCConfig, levels: int) -> None:  # fmt: skip
        self.graph, self.data, self.config = graph, data, config
        self.network = _Fingerprint(graph)
        self.budget_ms = float(budget_ms)
        self.latency = latency
        self.options = unit_options(graph, config, levels)
        self.base_ms = latency({})
        self.floor_ms = latency(self.smallest())
        if self.floor_ms > self.budget_ms:
            raise PruneError(
                f"the latency budget {self.budget_ms:.4g} ms is below the smallest latency this "
                f"pruning reaches ({self.floor_ms:.4g} ms with every group at its smallest width; "
                f"unpruned {self.base_ms:.4g} ms). Raise the budget or lower lbound."
            )
        self.calibration = data.calibration(config.calib_images, seed=config.seed)
        self._static = self._embed()
        self.reset()

    def smallest(self, decided: dict[str, int] | None = None) -> dict[str, int]:
        return {u.name: self.options[u.name][0] for u in self.graph.units} | (decided or {})

    def _embed(self) -> np.ndarray:
        specs = self.graph.layers
        ms = {n: self.latency.layers.layer_ms(s) for n, s in specs.items()}
        order = list(specs)
        total = sum(ms.values()) or 1.0
        rows = []
        for t, u in enumerate(self.graph.units):
            root, touched = specs[u.name], {*u.outs, *u.ins}
            last = max(order.index(n) for n in touched)
            rows.append([t, u.channels, root.cin, root.kernel[0], root.stride[0], root.h,
                         sum(specs[n].macs() for n in touched), sum(ms[n] for n in touched),
                         sum(ms[n] for n in order[last + 1:]) / total])  # fmt: skip
        return normalized(rows)

    def reset(self) -> np.ndarray:
        self.t, self.decided, self.prev_action = 0, {}, 1.0
        self.floor_ms = self.latency(self.smallest())
        return self._state()

    def step(self, action: float) -> np.ndarray | None:
        u, c = self.graph.units[self.t], self.config
        opts = self.options[u.name]
        want = wanted_width(action, u.channels, opts, c)
        chosen = opts[0]
        for cand in sorted((o for o in opts if o <= want), reverse=True):  # the action wall
            if self.latency(self.smallest({**self.decided, u.name: cand})) <= self.budget_ms:
                chosen = cand
                break
        self.decided[u.name] = chosen
        self.floor_ms = self.latency(self.smallest(self.decided))
        self.prev_action = taken_action(chosen, u.channels, c)
        self.t += 1
        return None if self.t >= len(self.graph.units) else self._state()

    def policy(self) -> OwnPolicy:
        return OwnPolicy(tuple((u.name, self.decided.get(u.name, u.channels))
                               for u in self.graph.units))  # fmt: skip

    def pruned(self, policy: OwnPolicy) -> nn.Module:
        net = self.graph.prune(policy.as_dict())
        if self.config.bn_recalibrate:
            recalibrate_bn(net, self.calibration)
        return net

    def score(self, policy: OwnPolicy) -> dict[str, float]:
        acc = evaluate(self.pruned(policy), self.data, self.config.reward_split,
                       limit=self.config.reward_images)  # fmt: skip
        ms = self.latency(policy.as_dict())
        return {"acc": acc, "latency_ms": ms, "reward": reward_of(acc, ms, self.config)}


def prune_own(
    model: nn.Module,
    data: Dataset,
    *,
    budget_ms: float,
    target: str | Target,
    db: str | Path,
    settings: OwnSettings | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> OwnPruneResult:
    """Prune `model` (trained on `data`) to `budget_ms` measured with TVM on `target`."""
    from codesign.compression.amc.search import amc_search

    t0 = time.time()
    settings = settings or OwnSettings()
    target, say = parse_target(target), log or (lambda _m: None)
    if not budget_ms > 0:
        raise PruneError(f"the latency budget must be positive, got {budget_ms!r} ms")
    model = copy.deepcopy(model).eval()
    graph = OwnGraph.build(model, (1, *data.info.input_shape))
    say(f"{len(graph.units)} channel groups, {len(graph.layers)} layers")
    layers = LayerLatency(db, target, settings.protocol)
    latency = OwnLatency(graph, layers, settings.missing)
    points = calibrate(latency, graph, calibration_policies(graph, settings))
    ridge = cast(Ridge, latency.ridge)
    seen = ", ".join(f"{latency.lut_sum(c):.4g} / {ms:.4g}" for c, ms in points)
    w = ", ".join(f"{v:.3g}" for v in ridge.w)
    say(f"whole networks (LUT sum / measured ms): {seen}; gap model w=({w}), "
        f"leave-one-out error {ridge.sigma:.1%}")  # fmt: skip
    original_ms = points[0][1]
    env = OwnEnv(graph, data, latency, budget_ms, settings.amc, settings.levels)
    search_dir = Path(out) / "search" if out is not None else None
    lat_id = f"{target.key}|{latency.fingerprint()}"
    # OwnEnv offers what amc_search uses of AMCEnv (reset/step/policy/score, the fingerprint)
    result = amc_search(cast(Any, env), settings.amc, out=search_dir, latency_id=lat_id,
                        progress=progress)  # fmt: skip
    searched = OwnPolicy(tuple((n, int(k)) for n, k in
                               (kv.split("=") for kv in result.best["policy"].split(","))))  # fmt: skip
    best, channels = searched, {u.name: u.channels for u in graph.units}
    if settings.fill:
        scaled = OwnLatency(graph, layers, "scale")  # ranks widenings without compiling
        scaled.ridge = latency.ridge
        filled = fill_budget(searched.as_dict(), env.options, channels, latency, budget_ms,
                             estimate=scaled)  # fmt: skip
        best = OwnPolicy(tuple((u.name, filled[u.name]) for u in graph.units))
        say(f"budget fill: {latency(searched.as_dict()):.4g} -> {latency(filled):.4g} ms "
            f"predicted (budget {budget_ms:.4g} ms)")  # fmt: skip
    verified: list[tuple[float, float]] = []
    if settings.verify_rounds > 0:
        # each policy's network measured beside the unpruned one, as a ratio to it (a slow
        # phase of the host between the calibration and now would read as a miss)
        unpruned = compile_own(graph.model, graph.input_shape, target)
        counts, verified = to_budget(
            best.as_dict(),
            lambda c: layers.relative_ms(graph.prune(c), unpruned, original_ms, graph.input_shape),
            latency,
            budget_ms,
            options=env.options,
            channels=channels,
            rounds=settings.verify_rounds,
            fill=settings.fill,
        )
        best = OwnPolicy(tuple((u.name, counts[u.name]) for u in graph.units))
        seen = ", ".join(f"{p:.4g} / {m:.4g}" for p, m in verified)
        say(f"policies measured whole (predicted / measured ms): {seen}; budget {budget_ms:.4g}")
    pruned = env.pruned(best)
    acc_before = evaluate(pruned, data)
    ft = settings.finetune
    ckpt = Path(out) / "finetune.pt" if out is not None else None
    train(
        pruned,
        data,
        ft,
        checkpoint=ckpt,
        progress=progress,
        desc="fine-tune",
        device=settings.device,
    )
    # a short fine-tune leaves BatchNorm's running statistics behind the weights (MobileNetV2:
    # 15% in eval mode after one epoch); refresh them as after pruning
    if settings.amc.bn_recalibrate:
        recalibrate_bn(pruned, env.calibration)
    pruned_acc = evaluate(pruned, data)
    pruned_ms = layers.network_ms(pruned, graph.input_shape)  # measured once, then reused
    return OwnPruneResult(
        model=pruned.eval(),
        policy=best,
        budget_ms=float(budget_ms),
        original_ms=original_ms,
        pruned_ms=pruned_ms,
        predicted_ms=latency(best.as_dict()),
        searched_ms=latency(searched.as_dict()),
        verified=tuple(verified),
        original_acc=evaluate(model, data),
        pruned_acc_before_finetune=acc_before,
        pruned_acc=pruned_acc,
        calibration=ridge.w,
        calibration_error=ridge.sigma,
        layers_measured=layers.measured,
        episodes=len(result.history),
        seconds=time.time() - t0,
    )


def with_episodes(settings: OwnSettings, episodes: int) -> OwnSettings:
    return replace(settings, amc=replace(settings.amc, episodes=episodes))
