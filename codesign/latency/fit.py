"""Fit a LatencyModel on measured whole networks and compare it with its baselines.

measured networks of (space, target, mode) from the LUT's `networks` table
  -> seeded train / held-out split
  -> residual target chosen by 5-fold CV on the training split:
       diff      measured - LUT sum
       logratio  log(measured / LUT sum)
       none      no residual: the LUT sum itself, kept when XGBoost does not beat it in CV
                 (whole networks that are the sum of their blocks up to measurement noise)
  -> XGBoost on the network features (codesign.latency.features)
baselines on the same split: lut_only (the LUT sum), flops_linear (least squares on MACs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.arch import Arch
from codesign.latency.model import LatencyModel, LatencyModelError, resolve_mode
from codesign.latency.regress import Booster, kfold_indices, linear_fit, metrics
from codesign.lut import LatencyTable
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

FORMS = ("diff", "logratio")


@dataclass
class FitReport:
    n_train: int
    n_test: int
    form: str
    cv_rmspe: dict[str, float]
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metrics
    train: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "form": self.form,
            "cv_rmspe": self.cv_rmspe,
            "test": self.test,
            "train": self.train,
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
) -> tuple[LatencyModel, FitReport]:
    """Fit on the networks measured in `db` (or only `archs` if given); returns model + report."""
    space, target = get_space(space), parse_target(target)
    base = LatencyModel.from_lut(db, space, target, mode=mode, trials=trials)
    with LatencyTable(db) as table:
        mode = resolve_mode(table, space, target.key, mode)
    all_archs, meas = measured_networks(db, space, target.key, mode)
    if archs is not None:
        wanted = {a.encode() for a in archs}
        keep = [i for i, a in enumerate(all_archs) if a.encode() in wanted]
        all_archs, meas = [all_archs[i] for i in keep], meas[keep]
    n = len(all_archs)
    if n < 8:
        raise LatencyModelError(
            f"only {n} measured networks of {space.name} on {target.key} ({mode}); measure at "
            "least 8 (`codesign latency fit --networks N` measures them)"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(2, int(round(n * test_fraction)))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    x = np.stack([base.features(space.arch_blocks(a)) for a in all_archs])
    lut = x[:, 0]

    # choose the residual form by cross-validation on the training split only
    cv: dict[str, float] = {}
    folds = kfold_indices(len(train_idx), min(5, len(train_idx)), seed)
    for form in FORMS:
        preds = np.zeros(len(train_idx))
        for tr, va in folds:
            i_tr, i_va = train_idx[tr], train_idx[va]
            b = Booster.fit(x[i_tr], _residual_target(form, lut[i_tr], meas[i_tr]), seed)
            preds[va] = _apply(form, lut[i_va], b.predict(x[i_va]))
        cv[form] = metrics(preds, meas[train_idx])["rmspe"]
    cv["none"] = metrics(lut[train_idx], meas[train_idx])["rmspe"]  # nothing is fitted
    form = min(cv, key=cv.get)
    booster = None
    if form != "none":
        booster = Booster.fit(
            x[train_idx], _residual_target(form, lut[train_idx], meas[train_idx]), seed
        )
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
        "cv_rmspe": cv,
    }
    model = LatencyModel(
        space,
        target.key,
        mode,
        base.lut,
        residual=booster,
        form=form,
        calibration=calibration,
        db=db,
        target=target,
        trials=trials,
        training=training,
    )
    report = FitReport(len(train_idx), len(test_idx), form, cv)
    for name, idx in (("test", test_idx), ("train", train_idx)):
        preds = {
            "lut_only": lut[idx],
            "flops_linear": flops_ab[0] * macs[idx] + flops_ab[1],
            "lut_xgb": model._apply(x[idx]),
        }
        getattr(report, name).update({k: metrics(v, meas[idx]) for k, v in preds.items()})
    model.training["report"] = report.to_dict()
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
