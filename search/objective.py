"""Latency-aware search losses: cross-entropy combined with the expected latency E (ms).

    mul   alpha * CE * (log E / log T) ** beta     ProxylessNAS's multiplicative form
                                                   (alpha=0.2, beta=0.3 in the paper)
    add   CE + lambda * (E / T - 1)                ProxylessNAS's additive (linear) form
    hinge CE + lambda * max(E / T - 1, 0)          penalises only latency over the target, so
                                                   the search spends the budget on accuracy

T is the latency target in ms. The logarithms of the `mul` form are taken of latencies in
microseconds: ProxylessNAS used milliseconds for networks of ~80 ms, where both logs are
positive; for networks faster than 1 ms (this machine's small spaces) log(ms) is negative and
the ratio would reward being slower. In microseconds the ratio behaves as in the paper for any
network slower than 1 us.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from codesign.errors import CodesignError
from codesign.search.settings import FORMS  # the loss forms' names live with the settings


class SearchError(CodesignError, ValueError):
    """An architecture search that cannot run as asked (bad settings, infeasible target)."""


@dataclass(frozen=True, slots=True)
class LatencyObjective:
    target_ms: float
    form: str = "mul"
    alpha: float = 0.2
    beta: float = 0.3
    lam: float = 0.5

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise SearchError(f"latency loss form must be one of {FORMS}, got {self.form!r}")
        if not (self.target_ms > 0.001 and math.isfinite(self.target_ms)):
            raise SearchError(
                f"latency target must be a number of ms above 0.001, got {self.target_ms}"
            )
        if self.alpha <= 0 or self.beta < 0 or self.lam < 0:
            raise SearchError("alpha must be > 0 and beta, lambda >= 0")

    def __call__(self, ce: torch.Tensor, expected_ms: torch.Tensor) -> torch.Tensor:
        if self.form == "mul":
            e_us = (expected_ms * 1000.0).clamp_min(1.0 + 1e-6)
            ratio = torch.log(e_us) / math.log(self.target_ms * 1000.0)
            return self.alpha * ce * ratio**self.beta
        excess = expected_ms / self.target_ms - 1.0
        if self.form == "hinge":
            excess = torch.relu(excess)
        return ce + self.lam * excess

    def value(self, ce: float, latency_ms: float) -> float:
        """The loss for plain numbers (REINFORCE rewards, logging)."""
        return float(self(torch.tensor(float(ce)), torch.tensor(float(latency_ms))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
