"""Figures as PNG files, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: nothing here touches matplotlib's global backend or figure list, so the library can
draw inside a notebook or a GUI program without changing its state.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_path

DPI = 100


def heatmap_inches(rows: int, columns: int) -> tuple[float, float]:
    """Figure size of :func:`ablation_heatmap`: the PNG is ``round(inches * DPI)`` pixels each way."""
    return max(6.5, 3.9 + 0.95 * columns), 2.0 + 0.55 * rows


def heatmap_pixels(rows: int, columns: int) -> tuple[int, int]:
    width, height = heatmap_inches(rows, columns)
    return round(width * DPI), round(height * DPI)


def _label(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:+.2g}" if abs(value) < 10 else f"{value:+.0f}"


def ablation_heatmap(values: list[list[float]], row_labels: list[str], column_labels: list[str], path: str | Path, *,
                     title: str, xlabel: str, ylabel: str, colorbar_label: str,
                     outline: list[tuple[int, int]] | None = None) -> Path:
    """A diverging heatmap with every cell's value written in it.

    The colour scale is symmetric logarithmic around 0 (linear within 1/1000 of the largest
    magnitude), so a change of 0.05 and one of 50 are both visible; increases are red, decreases
    blue. ``outline`` cells (by default the diagonal) get a black frame.
    """
    import numpy as np
    from matplotlib.colors import Normalize, SymLogNorm

    data = np.array(values, dtype=float)
    finite = np.abs(data[np.isfinite(data)])
    top = float(finite.max()) if finite.size else 0.0
    if top > 0:
        norm = SymLogNorm(linthresh=top / 1000, linscale=0.5, vmin=-top, vmax=top, base=10)
    else:
        norm = Normalize(vmin=-1, vmax=1)
    figure = _figure(*heatmap_inches(*data.shape))
    axes = figure.add_subplot()
    image = axes.imshow(data, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(data.shape[1]), column_labels, fontsize=9)
    axes.set_yticks(range(data.shape[0]), row_labels, fontsize=9)
    axes.xaxis.tick_top()
    axes.xaxis.set_label_position("top")
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    cmap = image.get_cmap()
    for (i, j), value in np.ndenumerate(data):
        if not math.isfinite(value):
            text, colour = "n/a", "black"
        else:
            red, green, blue, _ = cmap(norm(value))
            text = _label(value)
            colour = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
        axes.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    for i, j in outline if outline is not None else [(k, k) for k in range(min(data.shape))]:
        axes.add_patch(_frame(i, j))
    colorbar = figure.colorbar(image, ax=axes, shrink=0.9)
    if top > 0:  # one tick per decade, and 0; the default symlog ticks crowd around the linear part
        decades = [10.0**k for k in range(math.ceil(math.log10(top / 1000) + 0.5), math.floor(math.log10(top)) + 1)]
        colorbar.set_ticks([-d for d in reversed(decades)] + [0.0] + decades, labels=[
            f"{-d:g}" for d in reversed(decades)] + ["0"] + [f"+{d:g}" for d in decades])
    colorbar.set_label(colorbar_label, fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    return _save(figure, path)


def _frame(row: int, column: int):
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # No timestamp or software version in the file: the same numbers give the same bytes, so an
        # unchanged registry publishes as "no change".
        figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def neurons_per_layer_png(entry: dict, path: str | Path) -> Path:
    """Heatmap of neurons per layer (x) and language (y) for one model of the dataset card."""
    import numpy as np

    rows = entry["default"]["languages"]
    data = np.array([row["per_layer"] for row in rows], dtype=float)
    figure = _figure(max(6, 0.22 * entry["num_layers"] + 2), min(2 + 0.28 * len(rows), 40))
    axes = figure.add_subplot()
    image = axes.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(rows)), [f"{row['code']} ({row['neurons']})" for row in rows])
    axes.set_xlabel("layer")
    axes.set_title(f"{entry['name']}: language-specific neurons per layer")
    figure.colorbar(image, ax=axes, label="neurons")
    return _save(figure, path)
