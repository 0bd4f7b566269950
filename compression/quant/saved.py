"""A quantised network as a model directory, so it compiles and ships like any other.

    model.json  blocks carry their execution precision (LUT keys `..._int8`), policies.quantization
                is the `QuantPolicy` record, extra.quant_ranges the calibrated activation range
                (lo, hi) of every quantisable layer
    weights.pt  the state dict of the BN-folded fake-quant twin (`quantize_network`), after QAT

`load_model` rebuilds the fake-quant twin from these (it is the PyTorch reference the compiled
integer module is checked against); `compile_artifact` lowers it with
`codesign.tvm_backend.quantize.lower_quantized`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from codesign.compression.quant.fakequant import Range, quantize_network
from codesign.compression.quant.policy import PolicyError, QuantPolicy
from codesign.modules import Network


def float_blocks(blocks: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(b.with_precision("fp32") for b in blocks)


def quantized_twin(meta: Any) -> Network:
    """The (untrained) fake-quant network that a quantised model directory's weights load into.

    Raises PolicyError when the policy, ranges and blocks of `meta` disagree."""
    policy = QuantPolicy.from_dict(meta.policies["quantization"])
    ranges = meta.extra.get("quant_ranges")
    if not isinstance(ranges, list) or not all(
        isinstance(r, list | tuple) and len(r) == 2 for r in ranges
    ):
        raise PolicyError("extra.quant_ranges must list one [lo, hi] pair per quantisable layer")
    floats = float_blocks(meta.blocks)
    if policy.apply(floats) != tuple(meta.blocks):
        raise PolicyError("the blocks' precisions differ from the quantisation policy's")
    return quantize_network(
        Network(floats), [Range(float(lo), float(hi)) for lo, hi in ranges], policy
    )


def save_quantized_model(
    path: str | Path,
    qnet: Network,
    policy: QuantPolicy,
    ranges: Sequence[Range],
    source: Any,
    *,
    accuracy: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the fine-tuned fake-quant `qnet` (policy set) as a model directory derived from the
    float model's metadata `source` (a `ModelDir`)."""
    from codesign.model_dir import save_model

    meta = replace(
        source,
        blocks=policy.apply(qnet.specs),
        accuracy=accuracy,
        policies={**source.policies, "quantization": policy.to_dict()},
        extra={
            **source.extra,
            **(extra or {}),
            "quant_ranges": [[r.lo, r.hi] for r in ranges],
        },
    )
    return save_model(path, qnet, meta)
