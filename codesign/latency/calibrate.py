"""A few-network correction of the LUT sum, shrunk towards a prior, with prediction intervals.

    log(measured / LUT sum) = z . w        z: host-independent network features (below)
    w = argmin |Z w - y|^2 + lam |S (w - w0)|^2      (every weight but the intercept)

`w0` is the prior: zero (the LUT sum itself) or the weights fitted on another target or space
(`codesign latency fit --adapt`). `lam` is chosen by leave-one-out error (closed form), so with
few or contradicting networks the fit falls back to the prior, and with many it follows the
data. `S` scales each feature to unit spread over the LUT's own blocks, so the penalty means the
same on every host. The features mean the same thing on every host and space of a family:

    icpt          1: a constant relative gap between the LUT sum and the network
    stem, head    shares of the LUT sum spent in the stem / head blocks
    res<i>        share of the LUT sum in inverted residuals at the i-th largest resolution
    gap           blocks per LUT ms: a fixed per-block overhead the network does not pay
    bytes         activation MiB per LUT ms: memory traffic the network keeps in cache
    k<i>          share of blocks with the i-th smallest kernel

Uncertainty: the prediction interval of a linear model, relative (log space), with the
leave-one-out error as the noise estimate and Student's t for small samples:
    rel = t(0.975, dof) * max(sigma, noise floor / 2.563) * sqrt(1 + leverage(z))
(the noise floor, `LatencyTable.noise_floor`, is a (p90 - p10) / median spread)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codesign.latency.features import FeatureSchema

LAMBDAS = tuple(float(x) for x in np.logspace(-3, 3, 25))
TOLERANCE = 0.10  # a prediction is "confident" if its 95% interval lies within +-10%
DEFAULT_REL = 0.25  # relative uncertainty of an uncalibrated (LUT-only) prediction
P90_P10 = 2.563  # (p90 - p10) / sigma of a normal: the noise floor is such a spread


def z_names(schema: FeatureSchema) -> tuple[str, ...]:
    return (
        "icpt",
        "stem",
        "head",
        *(f"res{i}" for i in range(len(schema.resolutions))),
        "gap",
        "bytes",
        *(f"k{i}" for i in range(len(schema.kernels))),
    )


def z_features(schema: FeatureSchema, x: np.ndarray) -> np.ndarray:
    """Host-independent features (rows of `x`: the schema's network features)."""
    x = np.atleast_2d(x)
    col = {n: x[:, i] for i, n in enumerate(schema.names)}
    lut = np.maximum(col["lut_sum"], 1e-9)
    n_mb = np.maximum(sum(col[f"n_k{k}"] for k in schema.kernels), 1.0)
    cols = [
        np.ones(len(x)),
        col["lut_stem"] / lut,
        col["lut_head"] / lut,
        *(col[f"lut_res_{r}"] / lut for r in schema.resolutions),
        col["depth"] / lut,
        col["act_mb"] / lut,
        *(col[f"n_k{k}"] / n_mb for k in schema.kernels),
    ]
    return np.stack(cols, axis=1)


def t_quantile(dof: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, max(1.0, dof)))


@dataclass(frozen=True, slots=True)
class Ridge:
    """A fitted correction: weights, prior, scales, the regularised inverse Gram matrix (for the
    leverage of a new network) and the leave-one-out noise estimate."""

    names: tuple[str, ...]
    w: tuple[float, ...]
    w0: tuple[float, ...]
    scale: tuple[float, ...]
    lam: float
    gram_inv: tuple[tuple[float, ...], ...]
    sigma: float  # leave-one-out RMS error of log(measured / predicted)
    dof: float  # samples minus effective parameters
    n: int

    def log_ratio(self, z: np.ndarray) -> np.ndarray:
        return np.atleast_2d(z) @ np.array(self.w)

    def leverage(self, z: np.ndarray) -> np.ndarray:
        zs = np.atleast_2d(z) / np.array(self.scale)
        g = np.array(self.gram_inv)
        return np.einsum("ij,jk,ik->i", zs, g, zs)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "w": list(self.w),
            "w0": list(self.w0),
            "scale": list(self.scale),
            "lam": self.lam,
            "gram_inv": [list(r) for r in self.gram_inv],
            "sigma": self.sigma,
            "dof": self.dof,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Ridge:
        return cls(
            tuple(d["names"]),
            tuple(d["w"]),
            tuple(d["w0"]),
            tuple(d["scale"]),
            float(d["lam"]),
            tuple(tuple(r) for r in d["gram_inv"]),
            float(d["sigma"]),
            float(d["dof"]),
            int(d["n"]),
        )

    def prior_for(self, names: Sequence[str]) -> np.ndarray:
        """These weights as a prior over `names` (features this fit lacks get 0)."""
        mine = dict(zip(self.names, self.w, strict=True))
        return np.array([mine.get(n, 0.0) for n in names])


def space_scales(schema: FeatureSchema, x_space: np.ndarray) -> np.ndarray:
    """Spread of each feature over sampled networks of the space (the intercept: 1)."""
    s = np.std(z_features(schema, x_space), axis=0)
    s[0] = 1.0
    return np.where(s > 1e-12, s, 1.0)


def _penalty(k: int) -> np.ndarray:
    """The ridge penalty: every weight but the intercept. The intercept (the target's level:
    how far its networks run from its LUT sums) is always fitted from the target's own
    networks; a prior from another target or space lends only the shape (the source's level is
    its own host's: tiny's networks ran 6% under their LUT sums on the EMR guest, tiny-w2's on
    theirs)."""
    p = np.eye(k)
    p[0, 0] = 0.0
    return p


def _solve(zs: np.ndarray, yt: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    gram = zs.T @ zs + lam * _penalty(zs.shape[1])
    g = np.linalg.inv(gram)
    return g @ zs.T @ yt, g


def fit_ridge(
    schema: FeatureSchema,
    x: np.ndarray,
    measured: np.ndarray,
    scale: np.ndarray,
    *,
    prior: np.ndarray | None = None,
    lambdas: Sequence[float] = LAMBDAS,
) -> Ridge:
    """Fit the correction on networks `x` (schema features) measured at `measured` ms."""
    y = np.log(np.asarray(measured, float) / x[:, 0])
    return fit_log_ratio(z_names(schema), z_features(schema, x), y, scale, prior=prior,
                         lambdas=lambdas)  # fmt: skip


def fit_log_ratio(
    names: Sequence[str],
    z: np.ndarray,
    y: np.ndarray,
    scale: np.ndarray,
    *,
    prior: np.ndarray | None = None,
    lambdas: Sequence[float] = LAMBDAS,
) -> Ridge:
    """The ridge fit of log(measured / LUT sum) `y` on features `z` (first column: the
    intercept, never penalised), its strength chosen by leave-one-out error; any model of a
    LUT sum's gap to whole networks (the project's spaces, a user's pruned CNN) fits here."""
    names = tuple(names)
    w0 = np.zeros(z.shape[1]) if prior is None else np.asarray(prior, float)
    y = np.asarray(y, float)
    zs = z / scale
    yt = y - z @ w0
    n = len(y)
    # (LOO squared errors, lambda, correction, inverse Gram, effective parameters), from the
    # prior itself (lambda -> infinity: the prior's shape at the level of these networks, whose
    # LOO error is that of their mean) to the weakest pull
    g_prior = np.linalg.inv(zs.T @ zs + 1e6 * _penalty(zs.shape[1]))
    level = np.zeros_like(w0)
    level[0] = float(np.mean(yt))
    loo_level = (yt - level[0]) * n / max(n - 1, 1)
    fits = [(loo_level**2, float("inf"), level, g_prior, 1.0)]
    for lam in sorted(lambdas, reverse=True):
        d, g = _solve(zs, yt, lam)
        h = np.einsum("ij,jk,ik->i", zs, g, zs)
        if float(np.sum(h)) > n / 2:
            # weaker pulls interpolate: leverages near 1 make their LOO error 0/0, and picking
            # one let a fit on 9 noisy networks predict the 10th far worse than the prior
            # (RMSPE 15.8% vs 12.8%; with this bound 12.1%; EMR guest, test_latency_fewnet.py)
            break
        loo = (yt - zs @ d) / np.maximum(1.0 - h, 1e-6)
        fits.append((loo**2, lam, d, g, float(np.sum(h))))
    errs = [float(np.mean(f[0])) for f in fits]  # the first lowest: the strongest pull wins ties
    best = int(np.argmin(errs))
    err, (_, lam, d, g, p_eff) = errs[best], fits[best]
    w = w0 + d / scale
    return Ridge(
        names,
        tuple(float(v) for v in w),
        tuple(float(v) for v in w0),
        tuple(float(v) for v in scale),
        lam,
        tuple(tuple(float(v) for v in r) for r in g),
        float(np.sqrt(err)),
        max(1.0, len(y) - p_eff),
        len(y),
    )


@dataclass(frozen=True, slots=True)
class LatencyPrediction:
    """A predicted latency with its 95% interval. `confident`: the interval lies within
    +-`TOLERANCE` of `ms`, so the prediction can be trusted to that tolerance."""

    ms: float
    low: float
    high: float
    rel_uncertainty: float
    confident: bool


def interval(
    ms: float, rel_sigma: float | None, dof: float, leverage: float, noise_floor: float | None
) -> LatencyPrediction:
    """The 95% interval around `ms` for a relative error sigma (None: uncalibrated)."""
    if rel_sigma is None:
        rel = DEFAULT_REL
        return LatencyPrediction(ms, ms * (1 - rel), ms * (1 + rel), rel, False)
    s = max(rel_sigma, (noise_floor or 0.0) / P90_P10)
    rel = t_quantile(dof) * s * float(np.sqrt(1.0 + max(leverage, 0.0)))
    return LatencyPrediction(
        ms, float(ms * np.exp(-rel)), float(ms * np.exp(rel)), rel, rel <= TOLERANCE
    )
