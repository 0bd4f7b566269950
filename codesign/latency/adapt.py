"""Adapt a latency model to a new target (or space) from a few networks measured there.

source model (another target / space of the family)
  -> its ridge correction (codesign.latency.calibrate), or one fitted on its training record
  -> the prior: its weights, over host-independent features
N networks measured on the new target (5 or more; 10 is the recommended count)
  -> ridge correction of the new target's LUT sum shrunk towards that prior (lambda by
     leave-one-out), compared with the same fit towards the plain LUT sum (no prior): the
     lower leave-one-out error wins
every other network of the space measured on the new target is held out and scored
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codesign.arch import Arch
from codesign.latency.calibrate import Ridge, fit_ridge, space_scales, z_features
from codesign.latency.fit import (
    check_noise,
    host_noise_floor,
    measured_networks,
    space_features,
)
from codesign.latency.model import LatencyModel, LatencyModelError, resolve_mode
from codesign.latency.regress import linear_fit, metrics
from codesign.lut import LatencyTable
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

MIN_ADAPT = 5  # networks on the new target: fewer leave nothing for leave-one-out to judge


@dataclass(frozen=True)
class AdaptResult:
    """The adapted model and how it was made. `held_out`: metrics (lut_only, prior, adapted) on
    the new target's other measured networks, with `spearman` rank correlations; empty if none."""

    model: LatencyModel
    source: str  # "<space> on <target key>" of the model adapted from
    target_key: str
    n_target: int
    used_prior: bool
    prior: dict[str, float]
    held_out: dict[str, dict[str, float]]
    noise_floor: float | None


def source_ridge(src: LatencyModel) -> Ridge:
    """The source model's correction; a model without one is fitted on its training record."""
    if src.ridge is not None:
        return src.ridge
    tr = src.training
    if not tr.get("archs"):
        raise LatencyModelError(
            "the model to adapt from has no training record (a LUT-only model): fit it on "
            "measured networks first (`codesign latency fit`)"
        )
    archs = [src.space.decode(a) for a in tr["archs"]]
    x = np.stack([src.features(src.space.arch_blocks(a)) for a in archs])
    scale = space_scales(src.schema, space_features(src, src.space))
    return fit_ridge(src.schema, x, np.array(tr["measured_ms"]), scale)


def spearman(pred: np.ndarray, meas: np.ndarray) -> float:
    from scipy.stats import rankdata

    if len(meas) < 3:
        return float("nan")
    return float(np.corrcoef(rankdata(pred), rankdata(meas))[0, 1])


def adapt_latency_model(
    *,
    source: LatencyModel | str | Path,
    db: str | Path,
    target: str | Target,
    space: str | SearchSpace | None = None,
    archs: Sequence[Arch] | None = None,
    networks: int = 10,
    mode: str = "auto",
    trials: int = 0,
    seed: int = 0,
    measure: bool = True,
    protocol: Any = None,
    noise_floor: float | None = None,
    allow_noisy: bool = False,
    progress: bool = False,
) -> AdaptResult:
    """Fit a model for `target` (LUT in `db`) from `source` plus `networks` sampled networks
    (or exactly `archs`) measured on `target` (measured now unless `measure=False`)."""
    src = source if isinstance(source, LatencyModel) else LatencyModel.load(source)
    prior_ridge = source_ridge(src)
    space = get_space(space) if space is not None else src.space
    target = parse_target(target)
    base = LatencyModel.from_lut(db, space, target, mode=mode, trials=trials)
    with LatencyTable(db) as table:
        mode = resolve_mode(table, space, target.key, mode)
    if noise_floor is None:
        noise_floor = host_noise_floor(db, target.key, mode)
    if archs is None:
        from codesign.latency.networks import sample_archs

        archs = sample_archs(space, networks, seed)
    if measure:
        from codesign.latency.networks import measure_networks

        measure_networks(
            space, target, db, archs, mode=mode, trials=trials, protocol=protocol, seed=seed,
            progress=progress,
        )  # fmt: skip
    all_archs, meas = measured_networks(db, space, target.key, mode)
    wanted = {a.encode() for a in archs}
    train_idx = np.array([i for i, a in enumerate(all_archs) if a.encode() in wanted], int)
    test_idx = np.array([i for i, a in enumerate(all_archs) if a.encode() not in wanted], int)
    if len(train_idx) < MIN_ADAPT:
        raise LatencyModelError(
            f"only {len(train_idx)} of the given networks are measured on {target.key} "
            f"({mode}); adapting needs at least {MIN_ADAPT} (10 recommended)"
        )
    x = np.stack([base.features(space.arch_blocks(a)) for a in all_archs])
    scale = space_scales(base.schema, space_features(base, space))
    names = z_features_names(base)
    prior = prior_ridge.prior_for(names)
    with_prior = fit_ridge(base.schema, x[train_idx], meas[train_idx], scale, prior=prior)
    without = fit_ridge(base.schema, x[train_idx], meas[train_idx], scale)
    ridge = with_prior if with_prior.sigma <= without.sigma else without
    lut = x[:, 0]
    training = {
        "archs": [a.encode() for a in all_archs],
        "measured_ms": meas.tolist(),
        "train_idx": train_idx.tolist(),
        "test_idx": test_idx.tolist(),
        "seed": seed,
        "flops_linear": list(
            linear_fit(x[train_idx, base.schema.names.index("macs_m")], meas[train_idx])
        ),
        "cv_rmspe": {"ridge_prior": with_prior.sigma, "ridge": without.sigma},
        "scale": scale.tolist(),
        "adapted_from": f"{src.space.name} on {src.target_key}",
    }
    model = LatencyModel(
        space,
        target.key,
        mode,
        base.lut,
        form="ridge",
        calibration=linear_fit(lut[train_idx], meas[train_idx]),
        db=db,
        target=target,
        trials=trials,
        training=training,
        ridge=ridge,
        error=(ridge.sigma, ridge.dof),
        noise_floor=noise_floor,
    )
    held: dict[str, dict[str, float]] = {}
    if len(test_idx):
        z = z_features(base.schema, x[test_idx])
        preds = {
            "lut_only": lut[test_idx],
            "prior": lut[test_idx] * np.exp(z @ prior),
            "adapted": model._apply(x[test_idx]),
        }
        for k, p in preds.items():
            held[k] = {**metrics(p, meas[test_idx]), "spearman": spearman(p, meas[test_idx])}
        model.training["report"] = {"test": held, "noise_floor": noise_floor}
        check_noise(held["adapted"]["rmspe"], noise_floor, allow_noisy=allow_noisy)
    return AdaptResult(
        model,
        training["adapted_from"],
        target.key,
        len(train_idx),
        ridge is with_prior,
        dict(zip(names, prior.tolist(), strict=True)),
        held,
        noise_floor,
    )


def z_features_names(model: LatencyModel) -> tuple[str, ...]:
    from codesign.latency.calibrate import z_names

    return z_names(model.schema)
