"""The HAQ environment for a network without BlockSpecs (`codesign.compression.quant.graph`).

The same episode, state embedding, bit ladder, greedy budget wall and reward as `HAQEnv`; what
differs is the unit of execution precision: every conv / linear layer is its own unit, priced
by its own LUT entries (`layer_ms[i][precision]`, measured alone, float32 in and out), so a
layer runs in int8 only where int8 was measured faster than every float on the menu (and the
integer kernels fit it), in fp16 only where fp16 beat fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from codesign.compression.haq.env import BudgetError, HAQConfig, HAQEnv, layer_embedding
from codesign.compression.quant.graph import TracedGraph, fake_quant_graph, set_graph_bits
from codesign.compression.quant.policy import QuantPolicy
from codesign.data import Dataset
from codesign.tvm_backend.precision import PrecisionMenu


class GraphHAQEnv(HAQEnv):
    """One traced network, one target menu, one latency budget (ms of the LUT's layer sum)."""

    def __init__(
        self,
        graph: TracedGraph,
        data: Dataset,
        ranges: Sequence[Any],
        menu: PrecisionMenu,
        layer_ms: Sequence[Mapping[str, float]],
        config: HAQConfig,
    ) -> None:
        from codesign.compression.haq.env import bit_ladder
        from codesign.train import evaluate

        if config.budget_kind != "latency":
            raise BudgetError("HAQ on your own network takes a latency budget (ms)")
        self.graph = graph
        self.layers = graph.layers  # type: ignore[assignment]
        self.blocks = tuple(ly.lut_key("fp32") for ly in graph.layers)  # type: ignore[assignment]
        self.layer_ms = tuple(dict(m) for m in layer_ms)
        self.data, self.menu, self.config = data, menu, config
        self.latency = self._latency  # type: ignore[assignment]
        self.ladder = bit_ladder(menu, config.min_bits)
        self.base = fake_quant_graph(graph, ranges)  # type: ignore[assignment]
        self.states = layer_embedding(self.layers)  # type: ignore[arg-type]
        self.float_accuracy = evaluate(self.base, data, limit=config.val_images)
        self.accuracy_cache: dict[str, float] = {}
        self._actions: list[float] = []
        self.float_policy = self.derive([(32, 32)] * len(self.layers))
        self.fastest_float = tuple(self._fastest_float(i) for i in range(len(self.layers)))
        self.fp16_blocks = tuple(p == "fp16" for p in self.fastest_float)
        self.int8_blocks = self._faster_blocks()
        self.cheapest = tuple(
            "int8" if fast else fp
            for fast, fp in zip(self.int8_blocks, self.fastest_float, strict=True)
        )
        self._useful = self._useful_blocks()
        self.check_budget()

    def check_budget(self, note: str = "") -> None:
        """Raise BudgetError unless some policy meets `config.budget` (after changing it)."""
        low = self.min_cost_policy()
        if self.cost(low) > self.config.budget:
            raise BudgetError(
                f"no policy meets the latency budget of {self.config.budget:.4g} ms for the "
                f"layers{note} on {self.menu.target_key}: the fastest reachable policy costs "
                f"{self.cost(low):.4g} ms (float: {self.cost(self.float_policy):.4g} ms). "
                "Raise the budget."
            )

    def _latency(self, units: Sequence[tuple[int, str]]) -> float:
        return float(sum(self.layer_ms[i][p] for i, p in units))

    def cost(self, policy: QuantPolicy) -> float:
        return self._latency(list(enumerate(policy.precisions)))

    def _fastest_float(self, b: Any) -> str:
        floats = self.menu.float_precisions  # narrowest first
        return min(floats, key=lambda p: (self.layer_ms[b][p], -floats.index(p)))

    def _faster_blocks(self) -> tuple[bool, ...]:
        return tuple(
            self.menu.has_int8
            and ly.int8_ok
            and "int8" in self.layer_ms[i]
            and self.layer_ms[i]["int8"] < self.layer_ms[i][self.fastest_float[i]]
            for i, ly in enumerate(self.graph.layers)
        )

    def derive(self, bits: Sequence[Sequence[int]]) -> QuantPolicy:
        n = len(self.graph.layers)
        int8 = getattr(self, "int8_blocks", (False,) * n)
        fp16 = getattr(self, "fp16_blocks", (False,) * n)
        return QuantPolicy.derive_units(
            (1,) * n, [(int(b[0]), int(b[1])) for b in bits], self.menu, int8, fp16
        )

    def accuracy(self, policy: QuantPolicy) -> float:
        """Validation accuracy after a short seeded QAT fine-tune (cached per policy)."""
        import copy

        from codesign.compression.quant.qat import finetune
        from codesign.train import evaluate

        key = policy.encode()
        if key not in self.accuracy_cache:
            qnet = copy.deepcopy(self.base)
            set_graph_bits(qnet, self.graph, [(lb.w, lb.a) for lb in policy.layers])
            finetune(qnet, self.data, self.config.qat)
            self.accuracy_cache[key] = evaluate(qnet, self.data, limit=self.config.val_images)
        return self.accuracy_cache[key]
