"""Features of a whole network for the residual latency model, computed from its block list.

Working from blocks (not architecture strings) lets the same model score pruned networks, whose
block shapes no architecture string describes. The schema is fixed per search space:

    lut_sum, lut_stem, lut_head, lut_res_<H> (LUT sum of inverted residuals by input size H),
    n_k<k> per kernel, n_e<e> per expansion (pruned widths count as e_other), n_skip,
    depth, macs_m, params_m, act_mb, lut_max_block, lut_mean_block
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from codesign.blocks import BlockSpec


class FeatureSchema:
    """Feature names and extraction for one search space."""

    def __init__(
        self,
        resolutions: Sequence[int],
        kernels: Sequence[int],
        expansions: Sequence[int],
        num_layers: int,
    ) -> None:
        self.resolutions = tuple(sorted(set(resolutions), reverse=True))
        self.kernels = tuple(sorted(set(kernels)))
        self.expansions = tuple(sorted(set(expansions)))
        self.num_layers = num_layers
        self.names = (
            ["lut_sum", "lut_stem", "lut_head"]
            + [f"lut_res_{r}" for r in self.resolutions]
            + [f"n_k{k}" for k in self.kernels]
            + [f"n_e{e}" for e in self.expansions]
            + [
                "n_e_other",
                "n_skip",
                "depth",
                "macs_m",
                "params_m",
                "act_mb",
                "lut_max_block",
                "lut_mean_block",
            ]
        )

    @classmethod
    def for_space(cls, space) -> FeatureSchema:
        res = [ly.h for ly in space.layers()]
        return cls(res, space.kernels, space.expansions, space.num_layers)

    def to_dict(self) -> dict:
        return {
            "resolutions": list(self.resolutions),
            "kernels": list(self.kernels),
            "expansions": list(self.expansions),
            "num_layers": self.num_layers,
            "names": list(self.names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSchema:
        return cls(d["resolutions"], d["kernels"], d["expansions"], d["num_layers"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSchema) and self.to_dict() == other.to_dict()

    def extract(
        self, blocks: Sequence[BlockSpec], block_ms: Callable[[BlockSpec], float]
    ) -> np.ndarray:
        f = dict.fromkeys(self.names, 0.0)
        lats = [block_ms(b) for b in blocks]
        mbs = 0
        for b, lat in zip(blocks, lats, strict=True):
            f["lut_sum"] += lat
            if b.kind == "conv":
                f["lut_stem"] += lat
            elif b.kind == "head":
                f["lut_head"] += lat
            else:
                mbs += 1
                res = min(self.resolutions, key=lambda r: abs(r - b.h))
                f[f"lut_res_{res}"] += lat
                if f"n_k{b.kernel}" in f:
                    f[f"n_k{b.kernel}"] += 1
                e = b.mid / b.cin
                key = (
                    f"n_e{int(e)}" if b.expand and e == int(e) else ("n_e1" if not b.expand else "")
                )
                f[key if key in f else "n_e_other"] += 1
            f["macs_m"] += b.macs() / 1e6
            f["params_m"] += b.params() / 1e6
            f["act_mb"] += b.activation_elems() * 4 / 2**20
        f["n_skip"] = max(0, self.num_layers - max(0, mbs - 1))  # minus the fixed first block
        f["depth"] = len(blocks)
        f["lut_max_block"] = max(lats) if lats else 0.0
        f["lut_mean_block"] = float(np.mean(lats)) if lats else 0.0
        return np.array([f[n] for n in self.names], dtype=np.float64)


BLOCK_FEATURES = (
    "is_mb",
    "is_conv",
    "is_head",
    "kernel",
    "cin",
    "mid",
    "cout",
    "stride",
    "h",
    "w",
    "expand",
    "log_macs",
    "log_params",
    "log_act",
    "macs_dw_m",
    "macs_pw_m",
)


def block_features(b: BlockSpec) -> np.ndarray:
    """Features of one block for the per-block latency predictor (missing LUT entries)."""
    ho, wo = b.out_h, b.out_w
    dw = ho * wo * b.mid * b.kernel**2 if b.kind == "mb" else 0
    return np.array(
        [
            b.kind == "mb",
            b.kind == "conv",
            b.kind == "head",
            b.kernel,
            b.cin,
            b.mid,
            b.cout,
            b.stride,
            b.h,
            b.w,
            b.expand,
            np.log1p(b.macs()),
            np.log1p(b.params()),
            np.log1p(b.activation_elems()),
            dw / 1e6,
            (b.macs() - dw) / 1e6,
        ],
        dtype=np.float64,
    )
