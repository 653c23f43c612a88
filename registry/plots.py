"""Figures as PNG files, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: nothing here touches matplotlib's global backend or figure list, so the library can
draw inside a notebook or a GUI program without changing its state.

matplotlib is the ``plots`` extra: every drawing function raises MissingExtra without it. A command
whose figures come beside its tables (ablate, overlap, report, analyze, steer-eval) draws through
:func:`drawn`, which writes the tables all the same and says once that the figures were skipped.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

from .errors import MissingExtra
from .extras import require
from .files import atomic_path

log = logging.getLogger("neuronreg")
DPI = 100
_warned: list[str] = []  # the one warning a process gives for figures it skipped


def require_matplotlib(needs: str = "Figures need matplotlib") -> None:
    """MissingExtra unless matplotlib can be imported (every figure needs it)."""
    require("matplotlib", "plots", needs)


def _draws(function):
    """A drawing function: MissingExtra before any work when matplotlib is not installed."""
    @functools.wraps(function)
    def draw(*args, **kwargs):
        require_matplotlib()
        return function(*args, **kwargs)
    return draw


def drawn(draw, *args, **kwargs) -> Path | None:
    """``draw(*args, **kwargs)``, or None without matplotlib, with one warning a process: figures beside a
    command's tables are optional, the tables are not."""
    try:
        return draw(*args, **kwargs)
    except MissingExtra as exc:
        if not _warned:
            _warned.append(exc.message)
            log.warning("%s Tables, CSV and JSON are written without their figures.", exc.message)
        return None


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


@_draws
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


@_draws
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


def _group_bounds(groups: list[str]) -> list[int]:
    """Indices where a new group starts in an ordered list of group names (the first excluded)."""
    return [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]]


@_draws
def jaccard_heatmap(values: list[list[float]], labels: list[str], sizes: list[int], path: str | Path, *,
                    title: str, groups: list[str] | None = None, annotate: bool = True) -> Path:
    """A square heatmap of Jaccard indices between languages, sequential colours from 0.

    The diagonal (always 1) is drawn grey with each language's neuron count, so that the colour
    scale spans the off-diagonal values; ``groups`` (one name per row, e.g. the script) adds a
    white line between groups and names them on the right. ``annotate`` writes every value in its cell.
    """
    import numpy as np
    from matplotlib.colors import Normalize

    data = np.array(values, dtype=float)
    n = data.shape[0]
    off = data[~np.eye(n, dtype=bool)]
    top = float(off.max()) if off.size and off.max() > 0 else 1.0
    norm = Normalize(vmin=0.0, vmax=top)
    cell = min(0.5, max(0.12, 7.5 / max(n, 1)))
    figure = _figure(max(5.0, 3.2 + cell * n), max(3.0, 1.0 + cell * n))
    axes = figure.add_subplot()
    shown = np.ma.masked_array(data, mask=np.eye(n, dtype=bool))
    cmap = _colormap("viridis").with_extremes(bad="#d9d9d9")
    image = axes.imshow(shown, cmap=cmap, norm=norm, aspect="equal", interpolation="nearest")
    fontsize = 9 if n <= 20 else 7 if n <= 40 else 5
    axes.set_xticks(range(n), labels, fontsize=fontsize, rotation=90 if n > 20 else 0)
    axes.set_yticks(range(n), [f"{label} ({size:,})" for label, size in zip(labels, sizes)], fontsize=fontsize)
    axes.xaxis.tick_top()
    axes.tick_params(length=0)
    axes.set_title(title, fontsize=10, wrap=True)
    if annotate:
        for (i, j), value in np.ndenumerate(data):
            if i == j:
                text, colour = f"{sizes[i]:,}", "black"
            else:
                red, green, blue, _ = cmap(norm(value))
                text = "0" if value == 0 else f"{value:.2f}" if value >= 0.01 else f"{value:.1g}"
                colour = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
            axes.text(j, i, text, ha="center", va="center", fontsize=7 if n > 12 else 8, color=colour)
    if groups is not None:
        for bound in _group_bounds(groups):
            axes.axhline(bound - 0.5, color="white", linewidth=2)
            axes.axvline(bound - 0.5, color="white", linewidth=2)
        starts = [0, *_group_bounds(groups), n]
        for start, end in zip(starts, starts[1:]):
            axes.text(n - 0.3, (start + end - 1) / 2, groups[start], ha="left", va="center", fontsize=fontsize,
                      color="dimgray")
    axes.set_xlabel("grey diagonal: the language's neuron count", fontsize=8, color="dimgray")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8, pad=0.02 if groups is None else 0.1)
    colorbar.set_label("Jaccard |A ∩ B| / |A ∪ B|", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    return _save_palette(figure, path)


@_draws
def per_layer_lines(series: dict[str, list[int]], path: str | Path, *, title: str, groups: list[str] | None = None,
                    ylabel: str = "neurons") -> Path:
    """One line per language of its neuron count in each layer; the legend goes outside when there are many.

    Languages of one group (``groups``, one name per series, e.g. the script) share a line style,
    so that groups read apart even where colours repeat.
    """
    from matplotlib.ticker import MaxNLocator

    styles = ["-", "--", ":", "-."]
    style_of = {name: styles[i % len(styles)] for i, name in enumerate(dict.fromkeys(groups or []))}
    colours = _colormap("tab20").colors if len(series) > 10 else _colormap("tab10").colors
    many = len(series) > 8
    figure = _figure(9.5 if many else 7.5, 4.5)
    axes = figure.add_subplot()
    for i, (label, counts) in enumerate(series.items()):
        style = style_of.get(groups[i], "-") if groups else "-"
        shown = f"{label} {groups[i]}" if groups else label
        axes.plot(range(len(counts)), counts, style, color=colours[i % len(colours)], linewidth=1.4, label=shown,
                  marker="o" if len(counts) <= 12 else None, markersize=3)
    axes.set_xlabel("layer", fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    axes.tick_params(labelsize=8)
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3, linewidth=0.5)
    if many:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                    ncol=1 if len(series) <= 24 else 2, frameon=False)
    else:
        axes.legend(fontsize=8, loc="upper left", frameon=False)
    return _save_palette(figure, path)


def _save_palette(figure, path: str | Path, colours: int = 256) -> Path:
    """Like :func:`_save`, as a PNG of at most ``colours`` colours: a plot with many lines or labelled
    cells is a third of the size of full RGBA, and looks the same. Deterministic (no timestamp)."""
    import numpy as np
    from PIL import Image

    figure.canvas.draw()
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    path = Path(path)
    with atomic_path(path) as tmp:
        image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            tmp, format="png", optimize=True, dpi=(DPI, DPI))
    return path


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


@_draws
def metric_bars(labels: list[str], values: list[float | None], path: str | Path, *, title: str,
                ylabel: str) -> Path:
    """One bar per row of a report (the base model first, in grey), its value written on it; a row
    without the value gets no bar and says "n/a"."""
    import numpy as np

    figure = _figure(max(5.0, 1.2 + 0.75 * len(labels)), 4.0)
    axes = figure.add_subplot()
    present = [v for v in values if v is not None and math.isfinite(v)]
    colours = ["0.6"] + [_colormap("tab10").colors[i % 10] for i in range(len(labels) - 1)]
    heights = np.array([v if v is not None and math.isfinite(v) else 0.0 for v in values], dtype=float)
    bars = axes.bar(range(len(labels)), heights, color=colours[:len(labels)], width=0.7)
    top = max((abs(v) for v in present), default=1.0) or 1.0
    for bar, value in zip(bars, values):
        text = "n/a" if value is None or not math.isfinite(value) else (f"{value:.4g}")
        axes.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, text, ha="center",
                  va="bottom", fontsize=8)
    if present and min(present) > 0:
        axes.set_ylim(0, max(present) * 1.12)
    axes.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right"
                    if len(labels) > 4 else "center", fontsize=8)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    axes.grid(axis="y", alpha=0.3, linewidth=0.5)
    axes.set_axisbelow(True)
    return _save(figure, path)


@_draws
def tradeoff_scatter(points: list[tuple[str, float, float]], path: str | Path, *, xlabel: str, ylabel: str,
                     title: str) -> Path:
    """One labelled point per run at (change in English, change in its trained language), the base model
    at the origin, with the axes through it: up is a better trained language, right a better English
    (when higher is better on both)."""
    figure = _figure(6.5, 5.0)
    axes = figure.add_subplot()
    colours = _colormap("tab10").colors
    axes.axhline(0, color="0.5", linewidth=0.8)
    axes.axvline(0, color="0.5", linewidth=0.8)
    axes.scatter([0], [0], color="0.4", marker="s", s=30, zorder=3)
    axes.annotate("base", (0, 0), textcoords="offset points", xytext=(5, -10), fontsize=8, color="0.3")
    for i, (label, x, y) in enumerate(points):
        axes.scatter([x], [y], color=colours[i % 10], s=40, zorder=3)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    axes.grid(alpha=0.3, linewidth=0.5)
    axes.margins(0.15)
    return _save(figure, path)


@_draws
def shares_by_strength(strengths: list[float], series: dict[str, list[float]], path: str | Path, *, title: str,
                       baselines: dict[str, float] | None = None, xlabel: str = "strength",
                       ylabel: str = "share of outputs") -> Path:
    """One line per series (e.g. a language) of its share (0 to 1) at each strength.

    Strengths sit at even steps, labelled with their values (a grid such as 0, 0.5, 1, 2, 4 reads
    better so than on a linear axis). ``baselines`` (a share per series: the same without steering)
    are drawn as thin dashed lines of the series' colour.
    """
    from matplotlib.ticker import PercentFormatter

    colours = _colormap("tab10").colors
    figure = _figure(7.0, 4.2)
    axes = figure.add_subplot()
    positions = list(range(len(strengths)))
    for i, (label, shares) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        axes.plot(positions, shares, "-o", color=colour, linewidth=1.6, markersize=4, label=label)
        if baselines and label in baselines:
            axes.axhline(baselines[label], color=colour, linestyle="--", linewidth=0.9,
                         label=f"{label}, no steering")
    axes.set_xticks(positions, [f"{s:g}" for s in strengths], fontsize=8)
    axes.set_xlim(-0.3, max(len(strengths) - 0.7, 0.3))
    axes.set_ylim(-0.03, 1.03)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.tick_params(labelsize=8)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    axes.grid(alpha=0.3, linewidth=0.5)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    return _save_palette(figure, path)


TRAINING_PANELS = (("val_loss", "validation loss"), ("train_loss", "training loss"), ("grad_norm", "gradient norm"),
                   ("lr", "learning rate"))


@_draws
def training_curves(runs: dict[str, dict[str, tuple[list[float], list[float]]]], path: str | Path, *,
                    title: str) -> Path:
    """Several runs' training curves on one figure: validation loss, training loss, gradient norm and
    learning rate as four panels over the step, one colour per run (labelled once, in the legend).

    ``runs`` maps a run's label to its series: ``key -> (steps, values)`` for the keys of
    ``TRAINING_PANELS``; a key a run did not log is left out of its panel, and a panel no run logged
    says so. Lines get a marker at each logged step when a run logged few of them."""
    colours = _colormap("tab10").colors if len(runs) <= 10 else _colormap("tab20").colors
    figure = _figure(10.0, 7.0)
    panels = figure.subplots(2, 2, sharex=True).flatten()
    for axes, (key, name) in zip(panels, TRAINING_PANELS):
        drawn = False
        for i, (label, series) in enumerate(runs.items()):
            steps, values = series.get(key, ([], []))
            if not steps:
                continue
            drawn = True
            axes.plot(steps, values, "-", color=colours[i % len(colours)], linewidth=1.4, label=label,
                      marker="o" if len(steps) <= 25 else None, markersize=3)
        if not drawn:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes, fontsize=9,
                      color="0.4")
        axes.set_title(name, fontsize=10)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3, linewidth=0.5)
    for axes in panels[2:]:
        axes.set_xlabel("step", fontsize=9)
    handles, labels = [], []
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    return _save_palette(figure, path)


@_draws
def layer_profiles(series: dict[str, list[float | None]], path: str | Path, *, title: str, ylabel: str,
                   layers: list[int] | None = None, chance: float | None = None) -> Path:
    """One line per series (a run, or the base model) of a float per layer: alignment or update size by
    depth. ``layers`` labels the x positions (default 0, 1, ...; -1 reads "emb"); a None value leaves
    a gap; ``chance`` draws a dashed grey line at that level (e.g. 1 / N for retrieval)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    colours = _colormap("tab10").colors if len(series) <= 10 else _colormap("tab20").colors
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    for i, (label, values) in enumerate(series.items()):
        xs = layers if layers is not None else list(range(len(values)))
        ys = [math.nan if v is None else v for v in values]
        axes.plot(xs, ys, "-", color=colours[i % len(colours)], linewidth=1.4, label=label,
                  marker="o" if len(values) <= 40 else None, markersize=3)
    if chance is not None:
        axes.axhline(chance, color="0.5", linestyle="--", linewidth=0.9, label="chance")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: "emb" if x == -1 else f"{x:g}"))
    axes.set_xlabel("layer", fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.set_title(title, fontsize=10, wrap=True)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3, linewidth=0.5)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    return _save_palette(figure, path)
