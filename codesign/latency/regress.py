"""Small regressors and error metrics for latency prediction (XGBoost, least squares)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

XGB_PARAMS = {
    "n_estimators": 300,
    "max_depth": 3,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 2.0,
    "reg_lambda": 1.0,
}


def metrics(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    """RMSPE, MAPE and the share within +-5% / +-10%, as fractions (not percents)."""
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    if len(meas) == 0:
        return {
            "rmspe": float("nan"),
            "mape": float("nan"),
            "within5": float("nan"),
            "within10": float("nan"),
            "n": 0,
        }
    rel = (pred - meas) / meas
    return {
        "rmspe": float(np.sqrt(np.mean(rel**2))),
        "mape": float(np.mean(np.abs(rel))),
        "within5": float(np.mean(np.abs(rel) <= 0.05)),
        "within10": float(np.mean(np.abs(rel) <= 0.10)),
        "n": int(len(meas)),
    }


@dataclass
class Booster:
    """A fitted XGBoost regressor, serialisable to a string."""

    raw: str  # base64 of XGBoost's JSON model

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, seed: int = 0) -> Booster:
        import xgboost as xgb

        model = xgb.XGBRegressor(**XGB_PARAMS, random_state=seed, n_jobs=1)
        model.fit(np.asarray(x, float), np.asarray(y, float))
        raw = model.get_booster().save_raw(raw_format="json")
        return cls(base64.b64encode(bytes(raw)).decode())

    def predict(self, x: np.ndarray) -> np.ndarray:
        booster = self._booster()
        return np.asarray(booster.inplace_predict(np.atleast_2d(np.asarray(x, float))), float)

    def _booster(self):
        cached = getattr(self, "_cache", None)
        if cached is None:
            import xgboost as xgb

            cached = xgb.Booster()
            cached.load_model(bytearray(base64.b64decode(self.raw)))
            object.__setattr__(self, "_cache", cached)
        return cached


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ~ a*x + b."""
    a, b = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def kfold_indices(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(order, k)
    return [
        (np.concatenate([f for j, f in enumerate(folds) if j != i]), folds[i]) for i in range(k)
    ]
