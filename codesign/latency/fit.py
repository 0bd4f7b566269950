"""Fit a LatencyModel on measured whole networks and compare it with its baselines.

measured networks of (space, target, mode) from the LUT's `networks` table
  -> seeded train / held-out split
  -> residual target chosen by 5-fold CV on the training split:
       diff      measured - LUT sum
       logratio  log(measured / LUT sum)
       none      no residual: the LUT sum itself, kept when XGBoost does not beat it in CV
                 (whole networks that are the sum of their blocks up to measurement noise)
       ridge     a linear correction of log(measured / LUT sum) on host-independent features,
                 shrunk towards a prior (codesign.latency.calibrate): wins with few networks
  -> XGBoost on the network features (codesign.latency.features), or the ridge correction
  -> the chosen form's CV error (log space) is the model's uncertainty (`error`)
  -> refused when the held-out error is explained by the host's measurement noise
baselines on the same split: lut_only (the LUT sum), flops_linear (least squares on MACs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.arch import Arch
from codesign.latency.calibrate import Ridge, fit_ridge, space_scales
from codesign.latency.model import LatencyModel, LatencyModelError, resolve_mode
from codesign.latency.regress import Booster, kfold_indices, linear_fit, metrics
from codesign.lut import LatencyTable
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

FORMS = ("diff", "logratio")
MIN_NETWORKS = 8  # a held-out split and 5-fold CV of the rest (with a prior: 5, see adapt)
# Refused: a noise floor (a (p90 - p10) / median spread) above NOISE_MAX, where a +-10% claim
# cannot be checked, that is at least the held-out RMSPE: the error cannot be told from noise.
NOISE_MAX = 0.10


class NoisyMeasurementsError(LatencyModelError):
    """The held-out error is of the size of the host's measurement noise."""


def host_noise_floor(db: str | Path, target_key: str, mode: str) -> float | None:
    """The LUT's noise floor (relative repeat spread of one network on its host), if the
    LUT records one (`LatencyTable.noise_floor`, a property or a method)."""
    with LatencyTable(db) as table:
        nf = getattr(table, "noise_floor", None)
        if callable(nf):
            for args in ((target_key, mode), (target_key,), ()):
                try:
                    nf = nf(*args)
                    break
                except TypeError:
                    continue
            else:
                nf = None
    return float(nf) if isinstance(nf, (int, float)) else None


def check_noise(rmspe: float, noise_floor: float | None, *, allow_noisy: bool) -> None:
    """Refuse a model whose held-out error is explained by measurement noise."""
    if allow_noisy or noise_floor is None or not np.isfinite(rmspe):
        return
    if noise_floor > NOISE_MAX and rmspe <= noise_floor:
        raise NoisyMeasurementsError(
            f"held-out RMSPE {rmspe:.1%} is explained by measurement noise, not the model: one "
            f"network measured repeatedly on this host spreads by {noise_floor:.1%} (the noise "
            "floor), so the error cannot be checked. The networks were timed on a loaded or "
            "unsteady host; measure them again when it is quiet (or with more --repeat), or "
            "accept the model with --allow-noisy"
        )


@dataclass
class FitReport:
    n_train: int
    n_test: int
    form: str
    cv_rmspe: dict[str, float]
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metrics
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_floor: float | None = None  # the host's relative repeat spread, if the LUT has it

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "form": self.form,
            "cv_rmspe": self.cv_rmspe,
            "test": self.test,
            "train": self.train,
            "noise_floor": self.noise_floor,
        }


def measured_networks(
    db: str | Path, space: SearchSpace, target_key: str, mode: str
) -> tuple[list[Arch], np.ndarray]:
    """Successful whole-network measurements of this space on this target, sorted by arch."""
    with LatencyTable(db) as table:
        entries = table.networks(target_key, mode)
    archs, ms = [], []
    for e in entries:
        if e.ok and e.key.startswith(space.name + ":"):
            archs.append(space.decode(e.key))
            ms.append(e.median_ms)
    return archs, np.array(ms)


def _residual_target(form: str, lut: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return meas - lut if form == "diff" else np.log(meas / lut)


def _apply(form: str, lut: np.ndarray, r: np.ndarray) -> np.ndarray:
    return lut + r if form == "diff" else lut * np.exp(r)


@dataclass(frozen=True)
class Fitted:
    """The outcome of choosing and fitting a residual form on one training split."""

    form: str
    booster: Booster | None
    ridge: Ridge
    cv: dict[str, float]
    error: tuple[float, float]  # (RMS of log(measured / CV prediction), degrees of freedom)


def space_features(base: LatencyModel, space: SearchSpace, n: int = 64) -> np.ndarray:
    """Features of `n` seeded random networks of the space (LUT only, nothing measured)."""
    from codesign.latency.networks import sample_archs

    return np.stack([base.features(space.arch_blocks(a)) for a in sample_archs(space, n, 1)])


def fit_forms(
    base: LatencyModel,
    x: np.ndarray,
    meas: np.ndarray,
    *,
    scale: np.ndarray,
    prior: np.ndarray | None = None,
    forms: tuple[str, ...] = (*FORMS, "ridge", "none"),
    seed: int = 0,
) -> Fitted:
    """Choose the residual form with the lowest CV RMSPE on (x, meas) and fit it on all."""
    lut = x[:, 0]
    schema = base.schema
    folds = kfold_indices(len(x), min(5, len(x)), seed)
    cv: dict[str, float] = {}
    log_err: dict[str, np.ndarray] = {}
    for form in forms:
        preds = np.zeros(len(x))
        for tr, va in folds:
            if form == "none":
                preds[va] = lut[va]
            elif form == "ridge":
                r = fit_ridge(schema, x[tr], meas[tr], scale, prior=prior)
                preds[va] = lut[va] * np.exp(r.log_ratio(_z(base, x[va])))
            else:
                b = Booster.fit(x[tr], _residual_target(form, lut[tr], meas[tr]), seed)
                preds[va] = _apply(form, lut[va], b.predict(x[va]))
        cv[form] = metrics(preds, meas)["rmspe"]
        log_err[form] = np.log(meas / np.maximum(preds, 1e-12))
    form = min(cv, key=lambda k: cv[k])
    ridge = fit_ridge(schema, x, meas, scale, prior=prior)
    booster = None
    if form in FORMS:
        booster = Booster.fit(x, _residual_target(form, lut, meas), seed)
    dof = ridge.dof if form == "ridge" else max(1.0, len(x) - 1.0)
    sigma = float(np.sqrt(np.mean(log_err[form] ** 2)))
    return Fitted(form, booster, ridge, cv, (sigma, dof))


def _z(base: LatencyModel, x: np.ndarray) -> np.ndarray:
    from codesign.latency.calibrate import z_features

    return z_features(base.schema, x)


def fit_latency_model(
    db: str | Path,
    space: str | SearchSpace,
    target: str | Target,
    *,
    mode: str = "auto",
    test_fraction: float = 0.33,
    seed: int = 0,
    trials: int = 0,
    archs: list[Arch] | None = None,
    noise_floor: float | None = None,
    allow_noisy: bool = False,
) -> tuple[LatencyModel, FitReport]:
    """Fit on the networks measured in `db` (or only `archs` if given); returns model + report.

    `noise_floor` (relative) defaults to the LUT's; a model whose held-out error it explains
    is refused (NoisyMeasurementsError) unless `allow_noisy`."""
    space, target = get_space(space), parse_target(target)
    base = LatencyModel.from_lut(db, space, target, mode=mode, trials=trials)
    with LatencyTable(db) as table:
        mode = resolve_mode(table, space, target.key, mode)
    if noise_floor is None:
        noise_floor = host_noise_floor(db, target.key, mode)
    all_archs, meas = measured_networks(db, space, target.key, mode)
    if archs is not None:
        wanted = {a.encode() for a in archs}
        keep = [i for i, a in enumerate(all_archs) if a.encode() in wanted]
        all_archs, meas = [all_archs[i] for i in keep], meas[keep]
    n = len(all_archs)
    if n < MIN_NETWORKS:
        raise LatencyModelError(
            f"only {n} measured networks of {space.name} on {target.key} ({mode}); measure at "
            f"least {MIN_NETWORKS} (`codesign latency fit --networks N` measures them), or adapt "
            "a model of another target with 5 or more (`codesign latency fit --adapt MODEL`)"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(2, int(round(n * test_fraction)))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    x = np.stack([base.features(space.arch_blocks(a)) for a in all_archs])
    lut = x[:, 0]
    scale = space_scales(base.schema, space_features(base, space))
    fitted = fit_forms(base, x[train_idx], meas[train_idx], scale=scale, seed=seed)
    calibration = linear_fit(lut[train_idx], meas[train_idx])
    macs = x[:, base.schema.names.index("macs_m")]
    flops_ab = linear_fit(macs[train_idx], meas[train_idx])

    training = {
        "archs": [a.encode() for a in all_archs],
        "measured_ms": meas.tolist(),
        "train_idx": train_idx.tolist(),
        "test_idx": test_idx.tolist(),
        "seed": seed,
        "flops_linear": list(flops_ab),
        "cv_rmspe": fitted.cv,
        "scale": scale.tolist(),
    }
    model = LatencyModel(
        space,
        target.key,
        mode,
        base.lut,
        residual=fitted.booster,
        form=fitted.form,
        calibration=calibration,
        db=db,
        target=target,
        trials=trials,
        training=training,
        ridge=fitted.ridge,
        error=fitted.error,
        noise_floor=noise_floor,
    )
    report = FitReport(len(train_idx), len(test_idx), fitted.form, fitted.cv)
    report.noise_floor = noise_floor
    for name, idx in (("test", test_idx), ("train", train_idx)):
        preds = {
            "lut_only": lut[idx],
            "flops_linear": flops_ab[0] * macs[idx] + flops_ab[1],
            "lut_xgb": model._apply(x[idx]),
        }
        getattr(report, name).update({k: metrics(v, meas[idx]) for k, v in preds.items()})
    model.training["report"] = report.to_dict()
    check_noise(report.test["lut_xgb"]["rmspe"], noise_floor, allow_noisy=allow_noisy)
    return model, report


def held_out(
    model: LatencyModel, db: str | Path | None = None
) -> tuple[list[Arch], np.ndarray, dict[str, np.ndarray]]:
    """The model's held-out networks, their measured latency (from `db` if given, else the
    training record) and each method's predictions."""
    tr = model.training
    if not tr.get("archs"):
        raise LatencyModelError("this model has no training record (a LUT-only model)")
    archs = [model.space.decode(tr["archs"][i]) for i in tr["test_idx"]]
    meas = np.array([tr["measured_ms"][i] for i in tr["test_idx"]])
    if db is not None:
        with LatencyTable(db) as table:
            rows = [table.get_network(model.target_key, a.encode(), model.mode) for a in archs]
        meas = np.array(
            [r.median_ms if r is not None and r.ok else m for r, m in zip(rows, meas, strict=True)]
        )
    x = np.stack([model.features(model.space.arch_blocks(a)) for a in archs])
    a, b = tr["flops_linear"]
    preds = {
        "lut_only": x[:, 0],
        "flops_linear": a * x[:, model.schema.names.index("macs_m")] + b,
        "lut_xgb": model._apply(x),
    }
    return archs, meas, preds
