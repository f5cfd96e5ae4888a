"""Figures as PNG, byte-for-byte reproducible: the Agg canvas without pyplot's global state, no
Software/date metadata, fixed size, dpi and fonts."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.rcParams["svg.hashsalt"] = "robbench"  # harmless for PNG; keeps any SVG stable too
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 80  # modest: the committed demo report stays small
PNG_METADATA = {"Software": None}  # no matplotlib version string: same store -> same bytes


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)


def heatmap(matrix: "pandas.DataFrame", title: str, path: Path) -> None:  # noqa: F821
    """N x (N+1) attack success rates: rows = source member, columns = target members + ensemble."""
    import seaborn as sns

    n_rows, n_cols = matrix.shape
    fig = new_figure(1.0 + 0.75 * n_cols, 0.9 + 0.6 * n_rows)
    ax = fig.add_subplot(1, 1, 1)
    sns.heatmap(matrix.astype(float), ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", annot=True, fmt=".2f",
                cbar=False, square=False, annot_kws={"size": 8})
    ax.set_xlabel("target")
    ax.set_ylabel("source member")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def line_panels(panels: Sequence[tuple[str, dict[str, tuple[list[float], list[float]]]]], xlabel: str,
                ylabel: str, path: Path, xlog: bool = False, ylim: tuple[float, float] | None = (0, 100)) -> None:
    """One subplot per panel; each panel maps a series label to (xs, ys). A label ending in ' (paper)'
    is drawn dashed in the colour of the series it belongs to (published beside reproduced)."""
    k = max(1, len(panels))
    fig = new_figure(3.2 * k + 0.4, 3.0)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(1, k, i + 1)
        bases = list(dict.fromkeys(lbl.removesuffix(" (paper)") for lbl in series))
        xticks: set[float] = set()
        for label, (xs, ys) in series.items():
            base = label.removesuffix(" (paper)")
            paper = label != base
            colour = colours[bases.index(base) % len(colours)]
            ax.plot(xs, ys, marker="" if paper else "o", markersize=3, linewidth=1.0 if paper else 1.4,
                    linestyle="--" if paper else "-", color=colour, label=None if paper else base)
            xticks.update(xs)
        if xlog:
            ax.set_xscale("log")
        if 0 < len(xticks) <= 10:
            ax.set_xticks(sorted(xticks))
            ax.set_xticklabels([f"{x:g}" for x in sorted(xticks)])
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if i == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.3)
        if series:
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    save(fig, path)
