"""Figures at publication quality, byte-for-byte reproducible: every figure as PDF and SVG (vector) and
PNG at 200 dpi, in one seaborn style, drawn on the Agg canvas without pyplot's global state and saved
without software/date metadata (the same store gives the same bytes)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.rcParams["svg.hashsalt"] = "robbench"  # SVG element ids from a fixed salt, not a random one
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 200
FORMATS = ("pdf", "svg", "png")  # vector for papers, PNG for the markdown pages
METADATA = {  # no version strings or dates: same store -> same bytes
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}
STYLE = "whitegrid"
CONTEXT = "paper"
PALETTE = "colorblind"
ACCURACY_LABEL = "accuracy (%)"
SUCCESS_LABEL = "attack success rate (%)"
EPS_LABEL = "ε (L∞, pixels in [0, 1])"


@dataclass
class Series:
    """One line: ``xs``/``ys`` in the axis units; ``lo``/``hi`` a 95% band (same length) or empty;
    ``published``: drawn dashed in the colour of the reproduced series of the same ``name``."""
    name: str
    xs: list[float]
    ys: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None
    published: bool = False


def _style():
    import seaborn as sns

    class _Both:
        def __enter__(self):
            self.a, self.b = sns.axes_style(STYLE), sns.plotting_context(CONTEXT)
            self.a.__enter__()
            self.b.__enter__()

        def __exit__(self, *exc):
            self.b.__exit__(*exc)
            self.a.__exit__(*exc)

    return _Both()


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, stem: Path) -> list[Path]:
    """``stem``.pdf, .svg and .png (``stem`` is a name without extension; dots in it stay); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in FORMATS:
        p = stem.parent / f"{stem.name}.{fmt}"
        fig.savefig(p, format=fmt, dpi=DPI, metadata=METADATA[fmt])
        out.append(p)
    return out


def colours(n: int) -> list[tuple[float, float, float]]:
    import seaborn as sns

    return list(sns.color_palette(PALETTE, max(n, 1)))


def heatmap(matrix: "pandas.DataFrame", title: str, stem: Path) -> list[Path]:  # noqa: F821
    """N x (N+1) attack success rates in %: rows = source member, columns = target members + ensemble;
    a colorbar in the same unit, named in the title."""
    import seaborn as sns

    n_rows, n_cols = matrix.shape
    with _style():
        fig = new_figure(1.6 + 0.62 * n_cols, 1.1 + 0.5 * n_rows)
        ax = fig.add_subplot(1, 1, 1)
        sns.heatmap(100 * matrix.astype(float), ax=ax, vmin=0.0, vmax=100.0, cmap="viridis", annot=True,
                    fmt=".0f", square=False, annot_kws={"size": 7}, linewidths=0.5, linecolor="white",
                    cbar_kws={"label": SUCCESS_LABEL})
        ax.set_xlabel("target (member j, whole ensemble)")
        ax.set_ylabel("source member i")
        ax.set_title(f"{title}\nattack success rate (%)", fontsize=8)
        fig.tight_layout()
        return save(fig, stem)


def line_panels(panels: Sequence[tuple[str, Sequence[Series]]], xlabel: str, ylabel: str, stem: Path,
                xlog: bool = False, ylim: tuple[float, float] | None = (0, 100),
                ncols: int | None = None) -> list[Path]:
    """One subplot per panel (``ncols`` per row; default: all in one row), one colour per series name
    across panels; reproduced series solid with markers and their 95% band, published series dashed in
    the same colour."""
    k = max(1, len(panels))
    cols = min(k, ncols or k)
    rows = -(-k // cols)
    names = list(dict.fromkeys(s.name for _, ss in panels for s in ss))
    cmap = dict(zip(names, colours(len(names))))
    with _style():
        fig = new_figure(2.9 * cols + 1.6, 2.7 * rows)
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(k)]
        for i, (ax, (title, series)) in enumerate(zip(axes, panels)):
            xticks: set[float] = set()
            for s in series:
                c = cmap[s.name]
                if s.published:
                    ax.plot(s.xs, s.ys, linestyle="--", linewidth=1.0, color=c, marker="", alpha=0.9)
                else:
                    if s.lo and s.hi:
                        ax.fill_between(s.xs, s.lo, s.hi, color=c, alpha=0.18, linewidth=0)
                    ax.plot(s.xs, s.ys, linestyle="-", linewidth=1.3, color=c, marker="o", markersize=2.5)
                xticks.update(s.xs)
            if xlog:
                ax.set_xscale("log")
            if 0 < len(xticks) <= 10:
                ax.set_xticks(sorted(xticks))
                ax.set_xticklabels([f"{x:g}" for x in sorted(xticks)])
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel(xlabel, fontsize=7)
            if i % cols == 0:
                ax.set_ylabel(ylabel, fontsize=7)
            ax.tick_params(labelsize=6)
        if names:
            handles = [Line2D([], [], color=cmap[n], linewidth=1.3, marker="o", markersize=2.5) for n in names]
            labels = list(names)
            if any(s.published for _, ss in panels for s in ss):
                handles += [Line2D([], [], color="0.3", linewidth=1.3), Line2D([], [], color="0.3", linewidth=1.0,
                                                                                 linestyle="--")]
                labels += ["reproduced (95% band)", "published"]
            elif any(s.lo for _, ss in panels for s in ss):
                handles.append(Patch(color="0.3", alpha=0.18))
                labels.append("95% band")
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0 - 1.5 / fig.get_figwidth(), 0.5),
                       fontsize=6, frameon=False)
        fig.tight_layout(rect=(0, 0, 1.0 - 1.55 / fig.get_figwidth(), 1))
        return save(fig, stem)
