"""Seeded training and evaluation loops shared by search, compression and the artifact.

`train` is resumable: with `checkpoint=PATH` it saves model, optimiser and schedule after every
epoch and continues from the last saved epoch when called again with the same path, config,
dataset and architecture (parameter names and shapes); anything else starts over (a checkpoint
of a differently pruned network made the resumed fine-tune fail to load it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codesign.data import Dataset


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smoothing: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def default_device() -> str:
    """Where training runs unless told otherwise: 'cuda' when a GPU is usable, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 256,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy in percent on a split (first `limit` images if given)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = _device_of(model)  # evaluates where the model is
    for x, y in data.batches(split, batch_size, limit=limit):
        correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _start_digest(model: nn.Module, data: Dataset) -> str:
    """What a checkpoint can resume: the model's architecture (parameter names, shapes, dtypes)
    on the dataset. Not the weights' values: a resumed run rebuilds its model as it can."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(data.info.to_dict(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    device: str | None = None,
) -> list[dict[str, float]]:
    """Train with SGD + nesterov momentum and a cosine schedule; returns per-epoch history.

    Runs on `device` (default: `default_device()`, CUDA when present); the model is back on
    the CPU when this returns, where lowering and export expect it."""
    from tqdm import tqdm

    set_seed(config.seed)
    dev = torch.device(device or default_device())
    model.to(dev)
    params_bn = [p for n, p in model.named_parameters() if p.ndim <= 1]
    params_w = [p for n, p in model.named_parameters() if p.ndim > 1]
    opt = torch.optim.SGD(
        [
            {"params": params_w, "weight_decay": config.weight_decay},
            {"params": params_bn, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
    )
    steps_per_epoch = max(1, -(-data.info.n_train // config.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint else None
    start = _start_digest(model, data) if ckpt is not None else ""
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("config") == config.to_dict() and state.get("start") == start:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, history = state["epoch"], state["history"]
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=desc,
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0, loss_sum, seen = time.time(), 0.0, 0
        for x, y in data.batches(
            "train", config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch
        ):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            bar.update()
        acc = evaluate(model, data)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / max(seen, 1),
                "val_acc": acc,
                "seconds": time.time() - t0,
            }
        )
        bar.set_postfix_str(f"loss {history[-1]['loss']:.3f} val {acc:.2f}%")
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": config.to_dict(),
                    "start": start,
                },
                tmp,
            )
            tmp.replace(ckpt)
    bar.close()
    model.to("cpu").eval()
    return history
