"""Moving a pruning policy onto its latency budget: the search's best policy, widened into budget
it left unused (`fill_budget`), and corrected by whole-network measurements (`to_budget`,
narrowing with `shrink_to_budget` where a network measured over the budget).

A policy is kept channels per group (`{group: count}`); `options` are each group's allowed
counts (ascending), `channels` its unpruned count, `latency` a prediction in ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

Counts = dict[str, int]  # kept channels per group
Predict = Callable[[Counts], float]  # ms of the network a policy gives


def fill_budget(
    counts: Counts,
    options: Mapping[str, Sequence[int]],
    channels: Mapping[str, int],
    latency: Predict,
    budget_ms: float,
    estimate: Predict | None = None,
) -> Counts:
    """Widen groups one allowed width at a time while `latency` stays within `budget_ms`.

    AMC's action wall bounds an episode from above only; with few episodes the best one can
    sit far under the budget (MobileNetV2: 0.43x of the original at a 0.6x budget), pruning
    accuracy away for latency nobody asked for. Each pass ranks the one-step widenings by the
    share of the group's channels restored per predicted ms (`estimate`, by default `latency`:
    a cheap estimate ranks, `latency` decides) and takes the best that fits; a group whose
    widening does not fit is not tried again. Bounded: each pass widens or blocks one group.
    """
    counts, blocked = dict(counts), set()
    estimate = estimate or latency
    for _ in range(sum(len(o) for o in options.values()) + len(options)):
        now, best, best_score = estimate(counts), None, -math.inf
        for name, opts in options.items():
            cur = counts.get(name, channels[name])
            wider = [o for o in opts if o > cur]
            if name in blocked or not wider:
                continue
            ms = estimate({**counts, name: wider[0]})
            score = (wider[0] - cur) / channels[name] / max(ms - now, 1e-9)
            if ms <= budget_ms and score > best_score:
                best, best_score = (name, wider[0]), score
        if best is None:
            break
        trial = {**counts, best[0]: best[1]}
        if latency(trial) <= budget_ms:
            counts = trial
        else:
            blocked.add(best[0])
    return counts


def shrink_to_budget(
    counts: Counts,
    options: Mapping[str, Sequence[int]],
    channels: Mapping[str, int],
    latency: Predict,
    budget_ms: float,
) -> Counts:
    """Narrow groups one allowed width at a time, the most predicted ms saved per share of the
    group's channels removed first, until `latency` is within `budget_ms` (or every group is
    at its smallest). Bounded: each pass narrows one group."""
    counts = dict(counts)
    for _ in range(sum(len(o) for o in options.values())):
        now = latency(counts)
        if now <= budget_ms:
            break
        best, best_score = None, -math.inf
        for name, opts in options.items():
            cur = counts.get(name, channels[name])
            narrower = [o for o in opts if o < cur]
            if not narrower:
                continue
            saved = now - latency({**counts, name: narrower[-1]})
            score = saved / ((cur - narrower[-1]) / channels[name])
            if score > best_score:
                best, best_score = (name, narrower[-1]), score
        if best is None:
            break
        counts[best[0]] = best[1]
    return counts


def to_budget(
    counts: Counts,
    measure: Predict,
    latency: Predict,
    budget_ms: float,
    *,
    options: Mapping[str, Sequence[int]],
    channels: Mapping[str, int],
    rounds: int,
    fill: bool = True,
) -> tuple[Counts, list[tuple[float, float]]]:
    """Measure the policy's network whole and move it towards the budget: the prediction,
    scaled by measured / predicted of the network just measured (a correction local to the
    policy), is narrowed within the budget (`shrink_to_budget`) and then widened into what is
    left (`fill_budget`), and the result measured again. At most `rounds` corrections (so
    `rounds + 1` measurements); stops once a network measures within the budget and 5% of it.
    Returns the slowest policy measured within the budget (none: the last one) and the
    (predicted, measured) ms of every network measured."""
    seen: list[tuple[float, float]] = []
    within: tuple[Counts, float] | None = None
    for r in range(max(0, rounds) + 1):
        predicted, measured = latency(counts), measure(counts)
        seen.append((predicted, measured))
        if measured <= budget_ms and (within is None or measured > within[1]):
            within = (counts, measured)
        if 0.95 * budget_ms <= measured <= budget_ms or r == rounds:
            break
        scale = measured / max(predicted, 1e-12)

        def local(c: Counts, _s: float = scale) -> float:
            return _s * latency(c)

        moved = shrink_to_budget(counts, options, channels, local, budget_ms)
        if fill:
            moved = fill_budget(moved, options, channels, local, budget_ms)
        if moved == counts:
            break
        counts = moved
    return (within[0] if within is not None else counts), seen
