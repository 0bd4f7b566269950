"""Predicted-vs-measured scatter plot (PNG) for a latency model's held-out networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scatter(
    path: str | Path, measured: np.ndarray, preds: dict[str, np.ndarray], title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    lo = float(min(measured.min(), *(p.min() for p in preds.values()))) * 0.95
    hi = float(max(measured.max(), *(p.max() for p in preds.values()))) * 1.05
    xs = np.linspace(lo, hi, 50)
    ax.plot(xs, xs, color="black", lw=1, label="ideal")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, label="±10%")
    styles = {
        "lut_only": ("tab:orange", "x"),
        "flops_linear": ("tab:green", "+"),
        "lut_xgb": ("tab:blue", "o"),
    }
    for name, p in preds.items():
        color, marker = styles.get(name, ("tab:red", "."))
        within = float(np.mean(np.abs(p - measured) / measured <= 0.10)) * 100
        ax.scatter(
            measured,
            p,
            s=14,
            color=color,
            marker=marker,
            alpha=0.8,
            label=f"{name} ({within:.0f}% within ±10%)",
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
