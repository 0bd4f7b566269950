"""A trained network on disk: the hand-off between search, compression and compilation.

    DIR/model.json   format, block keys, architecture string and space (if any), dataset info
                     (classes, input shape, mean/std), accuracy, policies (pruning/quantisation)
    DIR/weights.pt   the PyTorch state dict of `codesign.modules.Network(blocks)` (BN unfolded);
                     for a quantised network (policies.quantization) that of its BN-folded
                     fake-quant twin (see `codesign.compression.quant.saved`)

The block list, not only the architecture string, defines the network: a pruned network has
block shapes no architecture string of the space describes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codesign.blocks import BlockSpec
from codesign.data import DatasetInfo
from codesign.errors import CodesignError
from codesign.modules import Network

FORMAT = "codesign-model/1"


class ModelDirError(CodesignError, ValueError):
    """A model directory that is missing, incomplete or inconsistent."""


@dataclass
class ModelDir:
    blocks: tuple[BlockSpec, ...]
    arch: str | None = None
    space: str | None = None
    dataset: DatasetInfo | None = None
    accuracy: float | None = None
    policies: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return bool(self.policies.get("quantization"))

    def network(self) -> Network:
        """The module the weights load into: the float network, or a quantised network's
        fake-quant twin."""
        if self.quantized:
            from codesign.compression.quant.policy import PolicyError
            from codesign.compression.quant.saved import quantized_twin

            try:
                return quantized_twin(self)
            except PolicyError as err:
                raise ModelDirError(f"inconsistent quantised model: {err}") from None
        return Network(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "blocks": [b.key for b in self.blocks],
            "arch": self.arch,
            "space": self.space,
            "dataset": self.dataset.to_dict() if self.dataset else None,
            "accuracy": self.accuracy,
            "policies": self.policies,
            "extra": self.extra,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def save_model(path: str | Path, network: Network, meta: ModelDir) -> Path:
    """Write model.json and weights.pt into `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blocks = tuple(b.with_precision("fp32") for b in meta.blocks) if meta.quantized else meta.blocks
    if tuple(network.specs) != tuple(blocks):
        raise ModelDirError("the network's blocks differ from the metadata's blocks")
    tmp = path / "weights.pt.tmp"
    torch.save(network.state_dict(), tmp)
    tmp.replace(path / "weights.pt")
    (path / "model.json").write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    return path


def load_model(path: str | Path) -> tuple[Network, ModelDir]:
    """Read a model directory written by `save_model`; errors say what is missing."""
    path = Path(path)
    meta_file, weights = path / "model.json", path / "weights.pt"
    if not meta_file.exists() or not weights.exists():
        raise ModelDirError(
            f"{path} is not a codesign model directory (needs model.json and weights.pt); "
            "create one with `codesign search` or `codesign.model_dir.save_model`"
        )
    try:
        data = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{meta_file} is not valid JSON: {err}") from None
    if data.get("format") != FORMAT:
        raise ModelDirError(f"{meta_file}: unknown format {data.get('format')!r}, want {FORMAT}")
    ds = data.get("dataset")
    meta = ModelDir(
        blocks=tuple(BlockSpec.from_key(k) for k in data["blocks"]),
        arch=data.get("arch"),
        space=data.get("space"),
        dataset=DatasetInfo(
            **{
                **ds,
                "classes": tuple(ds["classes"]),
                "input_shape": tuple(ds["input_shape"]),
                "mean": tuple(ds["mean"]),
                "std": tuple(ds["std"]),
            }
        )
        if ds
        else None,
        accuracy=data.get("accuracy"),
        policies=data.get("policies") or {},
        extra=data.get("extra") or {},
    )
    net = meta.network()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, OSError) as err:
        raise ModelDirError(f"{weights} does not match the blocks in model.json: {err}") from None
    return net.eval(), meta
