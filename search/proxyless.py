"""ProxylessNAS: gradient-based search with binarized paths on the target task and hardware.

Per searchable layer i, architecture parameters alpha_i (one per candidate) give p_i =
softmax(alpha_i). Training alternates (after `warmup_epochs` of weight-only training):

  weight step  one path sampled from p (one op per layer) runs forward and backward; SGD on
               the weights of that path only (`Supernet.forward(x, path)`).
  arch step    on the held-out search split. `binary` (ProxylessNAS "two" mode): per layer two
               ops are sampled from p, one of them made active by the renormalised
               probabilities q of the pair; binary gates g (1 for the active op, 0 for the
               other) scale the two outputs, and the gradient of the loss w.r.t. the gates
               gives the estimate  dL/dalpha_i = sum_j dL/dg_j q_j (delta_ij - q_i)  for the
               two involved alphas (memory: one path plus one extra output per layer, whatever
               the number of candidates). After the Adam step the two alphas are shifted
               together so that the probabilities of the uninvolved ops do not change.
               `reinforce`: paths sampled from p, reward R = -loss(CE, predicted latency of the
               path), gradient -(R - b) d log p(path) / d alpha with a moving-average baseline b.
  latency      E = LatencyModel.expected(p) is differentiable in alpha; its exact gradient
               enters the arch step through the loss (see codesign.search.objective).

The final architecture takes the most probable op per layer; if that is predicted over the
latency budget, the cheapest change per unit of lost log-probability is applied until it fits.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from codesign.arch import Arch
from codesign.data import Dataset
from codesign.search.estimators import (
    binary_gate_grad,
    probabilities,
    reinforce_grad,
    rescale_involved,
    sample_path,
    sample_two,
)
from codesign.search.objective import LatencyObjective, SearchError
from codesign.search.supernet import OpPath, Supernet, recalibrate_bn
from codesign.train import evaluate

ESTIMATORS = ("binary", "reinforce")


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True, slots=True)
class ProxylessConfig:
    epochs: int = 10
    warmup_epochs: int = 2
    batch_size: int = 32
    weight_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    arch_lr: float = 0.01
    arch_every: int = 1  # one architecture step per this many weight steps
    estimator: str = "binary"
    reinforce_samples: int = 4
    baseline_decay: float = 0.9
    eval_images: int = 500  # search-split images for the per-epoch accuracy of the argmax net
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise SearchError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.epochs < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise SearchError(
                f"need epochs >= 1 and 0 <= warmup_epochs <= epochs, got {self.epochs} and "
                f"{self.warmup_epochs}"
            )
        if self.batch_size < 1 or self.arch_every < 1 or self.reinforce_samples < 1:
            raise SearchError("batch_size, arch_every and reinforce_samples must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchOutcome:
    arch: Arch  # most probable op per layer
    probs: list[list[float]]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _cycle(data: Dataset, split: str, batch: int, seed: int) -> Iterator[tuple[Any, Any]]:
    for k in range(1_000_000):  # bounded; a pass is finite
        yield from data.batches(split, batch, shuffle=True, seed=seed + k)


# ------------------------------------------------------------------ the search
class ProxylessSearch:
    """Supernet weights + architecture parameters trained on `data` (train split: weights,
    val split: architecture). `model` is a codesign LatencyModel of the same space layout."""

    def __init__(
        self,
        supernet: Supernet,
        data: Dataset,
        model: Any,
        objective: LatencyObjective,
        config: ProxylessConfig,
    ) -> None:
        self.supernet, self.data, self.model = supernet, data, model
        self.objective, self.config = objective, config
        self.alphas = [torch.zeros(n, requires_grad=True) for n in supernet.num_candidates]
        cfg = config
        decay = [p for p in supernet.parameters() if p.ndim > 1]
        no_decay = [p for p in supernet.parameters() if p.ndim <= 1]
        self.w_opt = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.weight_lr,
            momentum=cfg.momentum,
            nesterov=True,
        )
        self.steps_per_epoch = max(1, -(-data.info.n_train // cfg.batch_size))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.w_opt, cfg.epochs * self.steps_per_epoch
        )
        self.a_opt = torch.optim.Adam(self.alphas, lr=cfg.arch_lr, betas=(0.0, 0.999), eps=1e-8)
        self.baseline: float | None = None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0

    # ---------------------------------------------------------------- state
    def _meta(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "objective": self.objective.to_dict(),
            "space": self.supernet.space.digest,
            "latency_model": self.model.digest,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._meta(),
            "supernet": self.supernet.state_dict(),
            "alphas": [a.detach().clone() for a in self.alphas],
            "w_opt": self.w_opt.state_dict(),
            "sched": self.sched.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "baseline": self.baseline,
            "epoch": self.epoch,
            "history": self.history,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._meta()
        diff = [k for k in meta if state.get(k) != meta[k]]
        if diff:
            raise SearchError(
                f"the search checkpoint was written with other settings ({', '.join(diff)}); "
                "use another output directory or delete the checkpoint to start over"
            )
        self.supernet.load_state_dict(state["supernet"])
        with torch.no_grad():
            for a, saved in zip(self.alphas, state["alphas"], strict=True):
                a.copy_(saved)
        self.w_opt.load_state_dict(state["w_opt"])
        self.sched.load_state_dict(state["sched"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.baseline = state["baseline"]
        self.epoch, self.history, self.seconds = state["epoch"], state["history"], state["seconds"]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    # ---------------------------------------------------------------- views
    def probs(self) -> list[list[float]]:
        return [p.tolist() for p in probabilities([a.detach() for a in self.alphas])]

    def argmax_path(self) -> OpPath:
        return tuple(int(torch.argmax(a.detach())) for a in self.alphas)

    def expected_ms(self) -> float:
        with torch.no_grad():
            return float(self.model.expected(probabilities(self.alphas)))

    # ---------------------------------------------------------------- steps
    def weight_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        path = sample_path(self.alphas, gen)
        self.supernet.train()
        loss = F.cross_entropy(self.supernet(x, path), y)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.w_opt.step()
        self.sched.step()
        return float(loss.detach())

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        if self.config.estimator == "reinforce":
            return self._reinforce_step(x, y, gen)
        pairs = [sample_two(a, gen) for a in self.alphas]
        gates = [torch.tensor([1.0] + [0.0] * (len(p) - 1), requires_grad=True) for p in pairs]
        self.supernet.train()
        ce = F.cross_entropy(self.supernet.forward_gated(x, pairs, gates), y)
        loss = self.objective(ce, self.model.expected(probabilities(self.alphas)))
        grads = torch.autograd.grad(loss, [*self.alphas, *gates], allow_unused=True)
        n = len(self.alphas)
        before = []
        for a, pair, g_lat, g_gate, g0 in zip(
            self.alphas, pairs, grads[:n], grads[n:], gates, strict=True
        ):
            g_lat = torch.zeros_like(a) if g_lat is None else g_lat
            g_gate = torch.zeros_like(g0) if g_gate is None else g_gate
            a.grad = g_lat + binary_gate_grad(a, pair, g_gate)
            before.append(a.detach()[list(pair)].clone())
        self.a_opt.step()
        for a, pair, old in zip(self.alphas, pairs, before, strict=True):
            rescale_involved(a, pair, old)
        return float(loss.detach())

    def _reinforce_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        paths, rewards = [], []
        self.supernet.train()
        with torch.no_grad():
            for _ in range(self.config.reinforce_samples):
                path = sample_path(self.alphas, gen)
                ce = float(F.cross_entropy(self.supernet(x, path), y))
                ms = float(self.model.predict(self.supernet.arch_of(path)))
                paths.append(path)
                rewards.append(-self.objective.value(ce, ms))
        mean = sum(rewards) / len(rewards)
        if self.baseline is None:
            self.baseline = mean
        grads = reinforce_grad(self.alphas, paths, rewards, self.baseline)
        d = self.config.baseline_decay
        self.baseline = d * self.baseline + (1 - d) * mean
        for a, g in zip(self.alphas, grads, strict=True):
            a.grad = g
        self.a_opt.step()
        return -mean

    # ---------------------------------------------------------------- loop
    def argmax_accuracy(self) -> float:
        """Accuracy on the search split of the most probable network, weights shared."""
        cfg = self.config
        net = self.supernet.subnet(self.argmax_path())
        batches = (x for x, _ in self.data.batches("train", cfg.batch_size, limit=4 * 64))
        recalibrate_bn(net, batches)
        return evaluate(net, self.data, "val", limit=cfg.eval_images)

    def run(
        self,
        checkpoint: Path | None = None,
        *,
        progress: bool = True,
        until_epoch: int | None = None,
    ) -> SearchOutcome:
        """Train until `config.epochs` (or `until_epoch`, to stop early); with `checkpoint`,
        resume from it and save after every epoch."""
        from tqdm import tqdm

        cfg = self.config
        if checkpoint is not None and checkpoint.exists():
            self.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False))
        bar = tqdm(
            total=cfg.epochs * self.steps_per_epoch,
            initial=self.epoch * self.steps_per_epoch,
            desc=f"search ({cfg.estimator})",
            unit="step",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        while self.epoch < stop:
            t0, epoch = time.time(), self.epoch
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            search = epoch >= cfg.warmup_epochs
            arch_batches = _cycle(self.data, "val", cfg.batch_size, cfg.seed * 7919 + epoch * 101)
            w_sum = a_sum = 0.0
            n_w = n_a = 0
            for step, (x, y) in enumerate(
                self.data.batches(
                    "train", cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch
                )
            ):
                w_sum += self.weight_step(x, y, gen)
                n_w += 1
                if search and (step + 1) % cfg.arch_every == 0:
                    xa, ya = next(arch_batches)
                    a_sum += self.arch_step(xa, ya, gen)
                    n_a += 1
                bar.update()
            self.epoch += 1
            path = self.argmax_path()
            arch = self.supernet.arch_of(path)
            entropy = sum(
                float(-(p * torch.log(p.clamp_min(1e-12))).sum())
                for p in probabilities([a.detach() for a in self.alphas])
            )
            self.seconds += time.time() - t0
            self.history.append(
                {
                    "epoch": self.epoch,
                    "phase": "search" if search else "warmup",
                    "weight_loss": w_sum / max(n_w, 1),
                    "arch_loss": a_sum / n_a if n_a else None,
                    "expected_ms": self.expected_ms(),
                    "argmax_arch": arch.encode(),
                    "argmax_predicted_ms": float(self.model.predict(arch)),
                    "argmax_supernet_acc": self.argmax_accuracy(),
                    "entropy": entropy,
                    "seconds": time.time() - t0,
                }
            )
            h = self.history[-1]
            bar.set_postfix_str(
                f"E {h['expected_ms']:.3f} ms, argmax {h['argmax_predicted_ms']:.3f} ms "
                f"{h['argmax_supernet_acc']:.1f}%"
            )
            if checkpoint is not None:
                self.save(checkpoint)
        bar.close()
        return SearchOutcome(
            self.supernet.arch_of(self.argmax_path()), self.probs(), self.history, self.seconds
        )


# ------------------------------------------------------------------ deriving the final arch
def derive_arch(
    space: Any, probs: Sequence[Sequence[float]], model: Any, budget_ms: float
) -> tuple[Arch, float]:
    """Most probable op per layer; while predicted over `budget_ms`, apply the single change
    with the largest LUT saving per unit of lost log-probability (bounded: one pass per op).
    Returns the arch and its predicted latency (which may still exceed the budget)."""
    layers = space.layers()
    tables = model.layer_tables()
    choice = [max(range(len(p)), key=lambda j, p=p: p[j]) for p in probs]

    def arch_of(ch: list[int]) -> Arch:
        flat = [layer.candidates[j] for layer, j in zip(layers, ch, strict=True)]
        return Arch.from_flat(space.name, flat, list(space.depths))

    arch = arch_of(choice)
    ms = float(model.predict(arch))
    for _ in range(sum(len(p) for p in probs)):
        if ms <= budget_ms:
            break
        best, best_score = None, -math.inf
        for i, p in enumerate(probs):
            cur = choice[i]
            for j in range(len(p)):
                saving = float(tables[i][cur] - tables[i][j])
                if j == cur or saving <= 0:
                    continue
                cost = math.log(max(p[cur], 1e-12)) - math.log(max(p[j], 1e-12))
                score = saving / (max(cost, 0.0) + 1e-3)
                if score > best_score:
                    best, best_score = (i, j), score
        if best is None:
            break
        choice[best[0]] = best[1]
        arch = arch_of(choice)
        ms = float(model.predict(arch))
    return arch, ms
