"""Figures for the pipeline report (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_KERNEL_COLOR = {3: "#4c72b0", 5: "#dd8452", 7: "#c44e52"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_arch(space: Any, arch: Any, path: str | Path) -> Path:
    """One bar per searchable layer: height = expansion, colour = kernel; skipped layers hollow."""
    from codesign.arch import parse_token

    plt = _plt()
    layers = space.layers()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 1.5), 2.8), dpi=120)
    for i, (layer, token) in enumerate(zip(layers, arch.choices, strict=True)):
        choice = parse_token(token)
        if choice is None:
            ax.bar(i, 1, color="white", edgecolor="grey", hatch="//", width=0.8)
            ax.text(i, 1.1, "skip", ha="center", fontsize=7, color="grey")
        else:
            k, e = choice
            ax.bar(i, e, color=_KERNEL_COLOR.get(k, "#8172b2"), width=0.8)
            ax.text(i, e + 0.1, f"k{k}", ha="center", fontsize=7)
        if i and layer.position == 0:
            ax.axvline(i - 0.5, color="black", lw=0.6, ls=":")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"{ly.cout}\n{ly.h}²" for ly in layers], fontsize=6)
    ax.set_ylabel("expansion")
    ax.set_ylim(0, max(space.expansions) + 1.2)
    ax.set_title(arch.encode(), fontsize=7)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=c) for c in _KERNEL_COLOR.values()]
    ax.legend(
        handles,
        [f"kernel {k}" for k in _KERNEL_COLOR],
        fontsize=6,
        loc="upper left",
        ncol=3,
        frameon=False,
    )
    fig.tight_layout()
    return _save(fig, path)


def pareto(points: Sequence[dict[str, Any]], path: str | Path, budget_ms: float | None) -> Path:
    """Accuracy vs measured latency: {"label", "acc", "ms", "kind"} per point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=120)
    styles = {
        "searched": ("tab:red", "*", 140),
        "baseline": ("tab:grey", "o", 40),
        "compressed": ("tab:purple", "D", 60),
        "shipped": ("tab:purple", "D", 60),
    }
    for kind, (color, marker, size) in styles.items():
        pts = [p for p in points if p.get("kind") == kind]
        if pts:
            ax.scatter(
                [p["ms"] for p in pts],
                [p["acc"] for p in pts],
                c=color,
                marker=marker,
                s=size,
                label=kind,
                zorder=3,
            )
            for p in pts:
                ax.annotate(
                    p["label"],
                    (p["ms"], p["acc"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    base = sorted((p for p in points if p.get("kind") == "baseline"), key=lambda p: p["ms"])
    if base:
        ax.plot([p["ms"] for p in base], [p["acc"] for p in base], color="tab:grey", lw=0.8)
    if budget_ms:
        ax.axvline(budget_ms, color="tab:red", ls="--", lw=0.8, label=f"budget {budget_ms:.3g} ms")
    ax.set_xlabel("measured latency (ms, TVM on target)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def per_layer(
    values: Sequence[float], labels: Sequence[str], path: str | Path, ylabel: str, title: str
) -> Path:
    """A bar per layer, e.g. kept-channel ratios or bit widths."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(values) + 1.5), 2.6), dpi=120)
    ax.bar(range(len(values)), values, color="tab:purple")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
