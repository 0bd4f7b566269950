"""`LatencyModel`: whole-network latency = LUT sum of the blocks + a learned residual.

One interface for everything that asks "how fast is this network on that target?":
    predict(arch) / predict_many(archs) / predict_blocks(specs)  -> ms
    predict_with_uncertainty(arch) / ..._blocks(specs)             -> LatencyPrediction
    lut_sum(arch) / block_ms(spec)                                 -> ms from the LUT
    expected(layer_probs)                                          -> differentiable E[latency]
Blocks missing from the LUT (e.g. pruned shapes) are measured on demand through the TVM backend
and cached in the LUT (`missing="measure"`), predicted by a per-block XGBoost model trained on
the LUT (`missing="predict"`), or refused (`missing="error"`); the caller chooses.

A model is bound to one (space, target, LUT mode) and to the LUT state it was fitted on: `save`
stores the LUT snapshot's digest, and `load` with a LUT file refuses one that has changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codesign.arch import Arch
from codesign.blocks import BlockSpec
from codesign.errors import CodesignError
from codesign.latency.calibrate import LatencyPrediction, Ridge, interval, z_features
from codesign.latency.features import FeatureSchema, block_features
from codesign.latency.regress import Booster
from codesign.lut import LatencyTable
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

FORMAT = "codesign-latency-model/1"
MISSING = ("measure", "predict", "error")


class LatencyModelError(CodesignError):
    """A latency model that cannot answer as asked (missing blocks, foreign LUT, bad file)."""


def lut_digest(
    target_key: str, mode: str, lut: dict[str, float], blocks: Sequence[BlockSpec]
) -> str:
    h = hashlib.sha256(f"{target_key}|{mode}".encode())
    for b in sorted(blocks, key=lambda b: b.key):
        h.update(f"|{b.key}={lut.get(b.key, float('nan')):.6g}".encode())
    return h.hexdigest()[:16]


def resolve_mode(table: LatencyTable, space: SearchSpace, target_key: str, mode: str) -> str:
    """'auto' -> 'tuned' if the LUT has tuned entries for every block of the space, else 'untuned'."""
    if mode != "auto":
        return mode
    tuned = table.latencies(target_key, "tuned")
    return "tuned" if all(b.key in tuned for b in space.blocks()) else "untuned"


class LatencyModel:
    """Predicts network latency on one target from a LUT snapshot and an optional residual."""

    def __init__(
        self,
        space: SearchSpace,
        target_key: str,
        mode: str,
        lut: dict[str, float],
        *,
        residual: Booster | None = None,
        form: str = "none",
        calibration: tuple[float, float] = (1.0, 0.0),
        missing: str = "predict",
        db: str | Path | None = None,
        target: Target | None = None,
        trials: int = 0,
        training: dict[str, Any] | None = None,
        ridge: Ridge | None = None,
        error: tuple[float, float] | None = None,
        noise_floor: float | None = None,
    ) -> None:
        if missing not in MISSING:
            raise LatencyModelError(f"missing must be one of {MISSING}, got {missing!r}")
        self.space = space
        self.target_key = target_key
        self.mode = mode
        self.lut = dict(lut)
        self.schema = FeatureSchema.for_space(space)
        self.residual = residual
        self.form = form
        self.calibration = calibration
        self.missing = missing
        self.db = Path(db) if db else None
        self.target = target
        self.trials = trials
        self.training = training or {}
        self.ridge = ridge  # the few-network correction (form "ridge"; leverage for all forms)
        self.error = error  # (relative sigma, degrees of freedom) of the chosen form, from CV
        self.noise_floor = noise_floor  # the host's repeat spread when fitted (relative)
        self.digest = lut_digest(target_key, mode, self.lut, space.blocks())
        self._block_model: Booster | None = None
        self._tables: list[Any] | None = None
        absent = [b.key for b in space.blocks() if b.key not in self.lut]
        if absent:
            raise LatencyModelError(
                f"the LUT lacks {len(absent)} of {len(space.blocks())} blocks of space "
                f"{space.name!r} for {target_key} ({mode}), e.g. {absent[0]}; run `codesign lut "
                f"build --space {space.name} --target ...` first"
            )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_lut(
        cls,
        db: str | Path,
        space: str | SearchSpace,
        target: str | Target,
        *,
        mode: str = "auto",
        missing: str = "predict",
        trials: int = 0,
    ) -> LatencyModel:
        """A LUT-only model (no residual) over the current contents of the LUT file."""
        space, target = get_space(space), parse_target(target)
        with LatencyTable(db) as table:
            mode = resolve_mode(table, space, target.key, mode)
            lut = table.latencies(target.key, mode)
        return cls(
            space, target.key, mode, lut, missing=missing, db=db, target=target, trials=trials
        )

    # ---------------------------------------------------------------- blocks
    def block_ms(self, spec: BlockSpec) -> float:
        """LUT latency of one block; a missing entry is handled by the `missing` policy."""
        ms = self.lut.get(spec.key)
        if ms is not None:
            return ms
        if self.missing == "error":
            raise LatencyModelError(
                f"block {spec.key} has no LUT entry for {self.target_key} ({self.mode}); measure "
                "it with `codesign lut build` or allow missing='measure'|'predict'"
            )
        if self.missing == "measure":
            return self._measure(spec)
        return self._predict_block(spec)

    def _measure(self, spec: BlockSpec) -> float:
        if self.db is None or self.target is None:
            raise LatencyModelError("measuring missing blocks needs the LUT file and the target")
        from codesign.lut_build import build_lut

        report = build_lut(
            self.space,
            self.target,
            self.db,
            blocks=[spec],
            progress=False,
            trials=self.trials if self.mode == "tuned" else 0,
        )
        if report.failed:
            raise LatencyModelError(f"measuring {spec.key} failed: {report.failed[0]}")
        with LatencyTable(self.db) as table:
            entry = table.get(self.target_key, spec, self.mode)
        assert entry is not None and entry.ok
        self.lut[spec.key] = entry.median_ms
        return entry.median_ms

    def _predict_block(self, spec: BlockSpec) -> float:
        if self._block_model is None:
            keys = sorted(self.lut)
            x = np.stack([block_features(BlockSpec.from_key(k)) for k in keys])
            y = np.log(np.array([self.lut[k] for k in keys]))
            self._block_model = Booster.fit(x, y, seed=0)
        return float(np.exp(self._block_model.predict(block_features(spec))[0]))

    # ---------------------------------------------------------------- networks
    def lut_sum_blocks(self, specs: Sequence[BlockSpec]) -> float:
        return float(sum(self.block_ms(b) for b in specs))

    def lut_sum(self, arch: Arch) -> float:
        return self.lut_sum_blocks(self.space.arch_blocks(arch))

    def features(self, specs: Sequence[BlockSpec]) -> np.ndarray:
        return self.schema.extract(specs, self.block_ms)

    def predict_blocks(self, specs: Sequence[BlockSpec]) -> float:
        """Latency in ms of a network given as its block list (works for pruned networks)."""
        x = self.features(specs)
        return float(self._apply(x[None, :])[0])

    def predict(self, arch: Arch) -> float:
        return self.predict_blocks(self.space.arch_blocks(arch))

    def predict_blocks_with_uncertainty(self, specs: Sequence[BlockSpec]) -> LatencyPrediction:
        """The prediction with its 95% interval: the chosen form's cross-validated error,
        widened by the network's distance to the training networks (leverage) and never
        below the host's noise floor. A LUT-only model is never `confident`."""
        x = self.features(specs)
        ms = float(self._apply(x[None, :])[0])
        if self.error is None:
            return interval(ms, None, 1.0, 0.0, self.noise_floor)
        lev = float(self.ridge.leverage(z_features(self.schema, x))[0]) if self.ridge else 0.0
        return interval(ms, self.error[0], self.error[1], lev, self.noise_floor)

    def predict_with_uncertainty(self, arch: Arch) -> LatencyPrediction:
        return self.predict_blocks_with_uncertainty(self.space.arch_blocks(arch))

    def predict_many(self, archs: Sequence[Arch]) -> np.ndarray:
        if not archs:
            return np.zeros(0)
        x = np.stack([self.features(self.space.arch_blocks(a)) for a in archs])
        return self._apply(x)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        lut = x[:, 0]
        if self.form == "ridge" and self.ridge is not None:
            return lut * np.exp(self.ridge.log_ratio(z_features(self.schema, x)))
        if self.residual is None or self.form == "none":
            return lut
        r = self.residual.predict(x)
        return lut + r if self.form == "diff" else lut * np.exp(r)

    # ---------------------------------------------------------------- gradient NAS
    def layer_tables(self) -> list[np.ndarray]:
        """Per searchable layer, the LUT ms of each candidate (aligned with layer.candidates)."""
        if self._tables is None:
            tables = []
            for layer in self.space.layers():
                row = [
                    0.0 if (b := layer.block(t)) is None else self.block_ms(b)
                    for t in layer.candidates
                ]
                tables.append(np.array(row))
            self._tables = tables
        return self._tables

    def fixed_ms(self) -> float:
        return float(sum(self.block_ms(b) for b in self.space.fixed_blocks()))

    def expected(self, layer_probs: Sequence[Any]) -> Any:
        """Differentiable expected latency (torch scalar, ms) for per-layer op probabilities.

        E = a * (fixed blocks + sum_l sum_o p[l][o] * LUT[l][o]) + b, where (a, b) calibrate the
        LUT sum to measured whole networks (identity for a LUT-only model).
        """
        import torch

        tables = self.layer_tables()
        if len(layer_probs) != len(tables):
            raise LatencyModelError(
                f"expected {len(tables)} per-layer probability vectors, got {len(layer_probs)}"
            )
        total = None
        for probs, table in zip(layer_probs, tables, strict=True):
            if probs.shape[-1] != len(table):
                raise LatencyModelError(
                    f"a layer has {len(table)} candidates but {probs.shape[-1]} probabilities"
                )
            term = (probs * torch.as_tensor(table, dtype=probs.dtype, device=probs.device)).sum(-1)
            total = term if total is None else total + term
        a, b = self.calibration
        assert total is not None  # a space has at least one searchable layer
        return a * (total + self.fixed_ms()) + b

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "space": self.space.to_dict(),
            "target_key": self.target_key,
            "target_spec": self.target.spec if self.target else None,
            "mode": self.mode,
            "lut_digest": self.digest,
            "lut": self.lut,
            "schema": self.schema.to_dict(),
            "form": self.form,
            "residual": self.residual.raw if self.residual else None,
            "calibration": list(self.calibration),
            "trials": self.trials,
            "training": self.training,
            "ridge": self.ridge.to_dict() if self.ridge else None,
            "error": list(self.error) if self.error else None,
            "noise_floor": self.noise_floor,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        db: str | Path | None = None,
        *,
        missing: str = "predict",
        target: str | Target | None = None,
    ) -> LatencyModel:
        """Load a saved model. With `db`, the LUT must still hold what the model was fitted on."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LatencyModelError(f"cannot read latency model {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyModelError(f"{path} is not a codesign latency model ({FORMAT})")
        space = SearchSpace.from_dict(data["space"])
        tgt = (
            parse_target(target or data["target_spec"])
            if (target or data.get("target_spec"))
            else None
        )
        lut = data["lut"]
        if db is not None:
            with LatencyTable(db) as table:
                current = table.latencies(data["target_key"], data["mode"])
            now = lut_digest(data["target_key"], data["mode"], current, space.blocks())
            if now != data["lut_digest"]:
                raise LatencyModelError(
                    f"{path} was fitted on a different LUT state (digest {data['lut_digest']}, "
                    f"{db} now gives {now}): the LUT was rebuilt or re-measured since. Refit "
                    "with `codesign latency fit`, or load without the LUT to use the snapshot."
                )
            lut = {**current, **lut}
        model = cls(
            space,
            data["target_key"],
            data["mode"],
            lut,
            residual=Booster(data["residual"]) if data.get("residual") else None,
            form=data.get("form", "none"),
            calibration=tuple(data.get("calibration", (1.0, 0.0))),
            missing=missing,
            db=db,
            target=tgt,
            trials=data.get("trials", 0),
            training=data.get("training"),
            ridge=Ridge.from_dict(data["ridge"]) if data.get("ridge") else None,
            error=tuple(data["error"]) if data.get("error") else None,
            noise_floor=data.get("noise_floor"),
        )
        if model.digest != data["lut_digest"]:
            raise LatencyModelError(
                f"{path} is damaged: its LUT snapshot does not match its digest"
            )
        return model
