"""How to search (`SearchSettings`): one home for every setting and its default, read by the
Python entry point (`search_arch`), the string-named job (`SearchJob`), the `codesign search`
flags and the pipeline. Light on purpose (no torch import): the CLI reads its defaults here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

FORMS = ("mul", "add", "hinge")  # latency loss forms (codesign.search.objective)

STRATEGIES = ("proxyless", "evolution")
ESTIMATORS = ("binary", "reinforce")


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """How to search (everything but the inputs)."""

    strategy: str = "proxyless"
    epochs: int = 10
    warmup_epochs: int | None = None  # default: epochs // 4 (proxyless)
    retrain_epochs: int | None = None  # default: epochs; 0: no retraining (arch + measurement)
    estimator: str = "binary"
    loss: str = "mul"
    batch_size: int = 32
    lr: float = 0.05
    arch_lr: float = 0.01
    population: int = 24
    generations: int = 8
    repeat: int = 10
    min_repeat_ms: int = 50
    measure_rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        from codesign.search.objective import SearchError

        for name, value, allowed in (
            ("strategy", self.strategy, STRATEGIES),
            ("estimator", self.estimator, ESTIMATORS),
            ("loss", self.loss, FORMS),
        ):
            if value not in allowed:
                raise SearchError(f"{name} must be one of {allowed}, got {value!r}")
        if self.epochs < 1 or (self.retrain_epochs is not None and self.retrain_epochs < 0):
            raise SearchError("epochs must be >= 1 and retrain epochs >= 0")
        if min(self.measure_rounds, self.batch_size, self.repeat, self.population) < 1:
            raise SearchError("measure_rounds, batch_size, repeat and population must be >= 1")

    @property
    def retrain_for(self) -> int:
        return self.epochs if self.retrain_epochs is None else self.retrain_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default(name: str) -> Any:
    """The default of one `SearchSettings` field (what a CLI flag left out means)."""
    for f in fields(SearchSettings):
        if f.name == name:
            return f.default
    raise KeyError(name)
