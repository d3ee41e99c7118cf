"""Offline views of a run's selection, as matplotlib figures and PNG files (`trl-select plot OUTPUT_DIR`).

Reads `selection_history.jsonl` and the score files `selection/epoch_{k}.parquet` of an output directory and draws:

- `selection_overview.png`: kept fraction per epoch (overall and per category), churn (1 - Jaccard with the previous
  epoch's selection), each score's band per epoch with the pool median, the aux model's validation loss before and
  after each refresh, and how many epochs trained each pair.
- `selection_epoch_{k}.png` for each selection event: each score's histogram with its band, the LossDiff x IRM
  scatter coloured kept/dropped (sampled to a bounded number of points), the kept fraction per category, and the
  epochs-trained counts.

Figures are built with `matplotlib.figure.Figure` (no pyplot): no global state, no GUI backend, safe in a trainer.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .compute import METRIC_PREFIX as COMPUTE_PREFIX
from .compute import SELECTION_CATEGORIES
from .history import HISTORY_FILENAME, read_history
from .rules import jaccard
from .score_files import (
    MAX_SCATTER_POINTS,
    ScoreFile,
    integer_histogram,
    ordered_score_names,
    read_score_files,
    scatter_rows,
)


logger = logging.getLogger(__name__)

OVERVIEW_FILENAME = "selection_overview.png"
EVENT_FILENAME = "selection_epoch_{epoch}.png"
PLOT_DIR = "selection_plots"
DPI = 110

SCORE_LABELS = {"lossdiff": "LossDiff", "irm": "IRM"}
SCORE_AXIS_LABELS = {"lossdiff": "LossDiff = L(z; θ_t) − L(z; θ_aux)", "irm": "IRM = β·h_θt(z)"}
KEPT_COLOR = "#1f77b4"
DROPPED_COLOR = "#b8b8b8"
BAND_COLOR = "#ff7f0e"
CATEGORY_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
_PANEL_SIZE = (5.4, 4.3)  # inches per panel
# Axis limits: the 1st-99th percentiles of a score, widened to hold its band; pairs outside are marked at the edge.
ROBUST_PERCENTILES = (1.0, 99.0)
OUTLIER_COLOR = "#6a3d9a"


def score_label(name: str) -> str:
    return SCORE_LABELS.get(name, name)


def _grid(num_panels: int, title: str, columns: int = 3) -> tuple[Figure, list[Axes]]:
    columns = min(columns, num_panels)
    rows = math.ceil(num_panels / columns)
    figure = Figure(figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows + 0.6), layout="constrained")
    figure.suptitle(title, fontsize=13, fontweight="bold")
    axes = [figure.add_subplot(rows, columns, index + 1) for index in range(num_panels)]
    return figure, axes


def _legend_below(ax: Axes, columns: int = 2, bbox_to_anchor_y: float = -0.17, **kwargs: Any) -> None:
    """The legend under the axes (below the x label), never over the data."""
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, bbox_to_anchor_y), ncols=columns, fontsize=8, frameon=False, **kwargs
    )


def robust_limits(values: np.ndarray, bands: Sequence[Any] = (), margin: float = 0.04) -> tuple[float, float]:
    """Axis limits that fit the bulk of `values`: the `ROBUST_PERCENTILES` of the finite values, widened to hold
    every band's `lo` and `hi`, plus `margin` of the span on each side. A constant score gets a unit-wide window."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, ROBUST_PERCENTILES))
    for band in bands:
        if band is not None:
            lo, hi = min(lo, float(band.lo)), max(hi, float(band.hi))
    span = hi - lo
    if span <= 0:
        half = max(abs(hi), 1.0) * 0.5
        return lo - half, hi + half
    return lo - margin * span, hi + margin * span


def _mark_outside(ax: Axes, below: int, above: int, axis: str = "x") -> None:
    """Say at the axis edges how many pairs lie beyond the limits (◀ 12 on the left, 7 ▶ on the right)."""
    if axis != "x":
        return
    for count, x, text, align in (
        (below, 0.0, f"◀ {below:,} below", "left"),
        (above, 1.0, f"{above:,} above ▶", "right"),
    ):
        if count:
            ax.text(x, 1.0, text, transform=ax.transAxes, ha=align, va="bottom", fontsize=8, color=OUTLIER_COLOR)


def _note(ax: Axes, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ----- one event -----


def event_figure(score_file: ScoreFile, max_points: int = MAX_SCATTER_POINTS) -> Figure:
    """The views of one selection event: a histogram per score with its band, the scatter of the first two scores
    coloured kept/dropped, the kept fraction per category (if any), and the epochs-trained counts."""
    event = score_file.event
    keep = np.asarray(event.keep, dtype=bool)
    names = ordered_score_names(list(event.scores))
    panels = [("histogram", name) for name in names]
    if len(names) >= 2:
        panels.append(("scatter", (names[0], names[1])))
    if score_file.categories is not None:
        panels.append(("category", None))
    panels.append(("times_kept", None))
    panels.append(("summary", None))
    title = (
        f"Epoch {event.epoch} selection ({event.rule}): kept {keep.sum():,} of {keep.size:,} pairs "
        f"({100 * keep.mean():.1f}%)"
    )
    figure, axes = _grid(len(panels), title)
    for ax, (kind, what) in zip(axes, panels, strict=True):
        if kind == "histogram":
            _histogram_panel(ax, what, event.scores[what], keep, event.bands.get(what))
        elif kind == "scatter":
            _scatter_panel(ax, score_file, *what, max_points=max_points)
        elif kind == "category":
            _category_panel(ax, score_file.categories, keep, score_file.category_column)
        elif kind == "times_kept":
            _times_kept_panel(ax, score_file.times_kept, event.epoch)
        else:
            _summary_panel(ax, score_file)
    return figure


def _histogram_panel(ax: Axes, name: str, values: np.ndarray, keep: np.ndarray, band) -> None:
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    title = f"{score_label(name)} distribution"
    if not finite.any():
        _note(ax, "no finite score")
        ax.set_title(title)
        return
    lo, hi = robust_limits(values, [band])
    inside = finite & (values >= lo) & (values <= hi)
    below, above = int((finite & (values < lo)).sum()), int((finite & (values > hi)).sum())
    edges = np.linspace(lo, hi, 61)
    ax.hist(values[inside], bins=edges, color=DROPPED_COLOR, label=f"all pairs ({finite.sum():,})")
    ax.hist(
        values[inside & keep], bins=edges, color=KEPT_COLOR, label=f"kept, in every band ({(finite & keep).sum():,})"
    )
    if band is not None:
        ax.axvspan(band.lo, band.hi, color=BAND_COLOR, alpha=0.15, zorder=0, label=_band_label(band))
        for limit in (band.lo, band.hi):
            ax.axvline(limit, color=BAND_COLOR, linestyle="--", linewidth=1.5)
    ax.set_xlim(lo, hi)
    _mark_outside(ax, below, above)
    if (~finite).any():
        title += f" ({(~finite).sum():,} non-finite not shown)"
    ax.set_title(title, pad=14 if below or above else 6)
    ax.set_xlabel(SCORE_AXIS_LABELS.get(name, name))
    ax.set_ylabel("pairs")
    _legend_below(ax)


def _band_label(band) -> str:
    return f"band P{band.lo_percentile:g}–P{band.hi_percentile:g}: [{band.lo:.3g}, {band.hi:.3g}]"


def _scatter_panel(ax: Axes, score_file: ScoreFile, x: str, y: str, max_points: int) -> None:
    event = score_file.event
    keep = np.asarray(event.keep, dtype=bool)
    rows = scatter_rows(keep.size, max_points, seed=event.epoch)
    xlim = robust_limits(event.scores[x], [event.bands.get(x)])
    ylim = robust_limits(event.scores[y], [event.bands.get(y)])
    xs, ys, kept = np.clip(event.scores[x][rows], *xlim), np.clip(event.scores[y][rows], *ylim), keep[rows]
    outside = (xs != event.scores[x][rows]) | (ys != event.scores[y][rows])  # drawn at the edge they pass
    size = 16 if rows.size <= 1_000 else 5  # small pools get visible dots, large ones a density
    ax.scatter(xs[~kept], ys[~kept], s=size, color=DROPPED_COLOR, alpha=0.7, linewidths=0, label="dropped")
    ax.scatter(xs[kept], ys[kept], s=size, color=KEPT_COLOR, alpha=0.6, linewidths=0, label="kept")
    if outside.any():
        ax.scatter(
            xs[outside], ys[outside], s=28, facecolors="none", edgecolors=OUTLIER_COLOR, linewidths=0.9,
            label=f"beyond the axes, at the edge ({outside.sum():,})", clip_on=False,
        )  # fmt: skip
    if x in event.bands:
        bx = event.bands[x]
        ax.axvspan(bx.lo, bx.hi, color=BAND_COLOR, alpha=0.10, zorder=0, label=f"{score_label(x)} band")
    if y in event.bands:
        by = event.bands[y]
        ax.axhspan(by.lo, by.hi, color=KEPT_COLOR, alpha=0.08, zorder=0, label=f"{score_label(y)} band")
    if x in event.bands and y in event.bands:
        bx, by = event.bands[x], event.bands[y]
        ax.add_patch(
            Rectangle(
                (bx.lo, by.lo), bx.hi - bx.lo, by.hi - by.lo, fill=False, edgecolor=BAND_COLOR, linestyle="--",
                linewidth=1.5, label="both bands (kept)",
            )
        )  # fmt: skip
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    sampled = f", {rows.size:,} of {keep.size:,} pairs sampled" if rows.size < keep.size else ""
    ax.set_title(f"{score_label(x)} × {score_label(y)}{sampled}")
    ax.set_xlabel(SCORE_AXIS_LABELS.get(x, x))
    ax.set_ylabel(SCORE_AXIS_LABELS.get(y, y))
    _legend_below(ax, columns=3)
    for handle in ax.get_legend().legend_handles:  # legend dots of one readable size, whatever the point size
        if isinstance(handle, PathCollection):
            handle.set_sizes([30])


def _category_panel(ax: Axes, categories: np.ndarray, keep: np.ndarray, column: str | None) -> None:
    values = sorted(set(categories.tolist()), key=str)
    fractions = [keep[categories == value].mean() for value in values]
    positions = np.arange(len(values))
    ax.barh(positions, fractions, color=KEPT_COLOR, height=0.6)
    for position, value, fraction in zip(positions, values, fractions, strict=True):
        count = int((categories == value).sum())
        kept = int(keep[categories == value].sum())
        ax.text(
            min(fraction, 1.0) + 0.01,
            position,
            f"{kept:,}/{count:,}",
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
    ax.axvline(keep.mean(), color="0.3", linestyle=":", label=f"all pairs ({keep.mean():.2f})")
    ax.set_yticks(positions, [f"{column} = {value}" if column else str(value) for value in values])
    ax.set_xlim(0, 1.18)
    ax.set_xlabel("kept fraction")
    ax.set_title(f"Kept fraction by {column}")
    _legend_below(ax)


def _summary_panel(ax: Axes, score_file: ScoreFile) -> None:
    event, metrics = score_file.event, score_file.event.metrics
    keep = np.asarray(event.keep, dtype=bool)
    lines = [
        f"rule: {event.rule}",
        f"epoch {event.epoch}, global step {event.global_step:,}",
        f"kept: {keep.sum():,} of {keep.size:,} pairs ({100 * keep.mean():.1f}%)",
    ]
    for name in ordered_score_names(list(event.bands)):
        lines.append(f"{score_label(name)} {_band_label(event.bands[name])}")
        nonfinite = int((~np.isfinite(event.scores[name])).sum()) if name in event.scores else 0
        if nonfinite:
            lines.append(f"  {nonfinite:,} non-finite {score_label(name)} scores (never kept)")
    if "selection/churn" in metrics:
        lines.append(f"churn vs previous epoch: {metrics['selection/churn']:.3f}")
    if "selection/aux/val_loss_before" in metrics:
        lines.append(
            f"aux refreshed: validation loss {metrics['selection/aux/val_loss_before']:.4f} → "
            f"{metrics['selection/aux/val_loss_after']:.4f}"
        )
    ax.text(0.03, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=10, linespacing=1.7)
    ax.set_axis_off()
    ax.set_title("Summary")


def _times_kept_panel(ax: Axes, times_kept: np.ndarray, epoch: int) -> None:
    counts, edges = integer_histogram(times_kept)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, counts, width=0.8, color=KEPT_COLOR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"epochs 0–{epoch} that trained on the pair")
    ax.set_ylabel("pairs")
    ax.set_title(f"Epochs trained per pair, through epoch {epoch}")


# ----- the whole run -----


def overview_figure(history: Sequence[dict[str, Any]], score_files: Sequence[ScoreFile] = ()) -> Figure:
    """The run at a glance, one point per epoch: kept fraction (overall and per category), churn, each score's band,
    the aux model's validation loss at each refresh, the epochs-trained counts after the last event and, when the
    score files carry `selection/compute/*` metrics, the cumulative compute (FTE) by category."""
    records = sorted({record["epoch"]: record for record in history}.values(), key=lambda record: record["epoch"])
    if not records:
        raise ValueError("The selection history is empty: no epoch has started yet.")
    score_names = ordered_score_names(
        list(dict.fromkeys(name for record in records for name in record.get("thresholds", {})))
    )
    panels = ["kept", "churn", *(("band", name) for name in score_names), "aux", "times_kept"]
    if any(f"{COMPUTE_PREFIX}train" in file.event.metrics for file in score_files):
        panels.append("compute")
    pool_size = records[-1]["pool_size"]
    title = f"Selection overview: rule {records[-1]['rule']}, pool of {pool_size:,} pairs, {len(records)} epochs"
    figure, axes = _grid(len(panels), title)
    by_epoch = {file.event.epoch: file for file in score_files}
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "kept":
            _kept_timeline(ax, records, by_epoch)
        elif panel == "churn":
            _churn_timeline(ax, records)
        elif panel == "aux":
            _aux_timeline(ax, records, by_epoch)
        elif panel == "compute":
            _compute_timeline(ax, records, by_epoch)
        elif panel == "times_kept":
            if score_files:
                _times_kept_panel(ax, score_files[-1].times_kept, score_files[-1].event.epoch)
            else:
                ax.set_title("Epochs trained per pair")
                _note(ax, "no score files (selection/epoch_*.parquet)")
        else:
            _band_timeline(ax, panel[1], records, by_epoch)
    return figure


def _epoch_axis(ax: Axes, records: Sequence[dict[str, Any]]) -> None:
    ax.set_xticks([record["epoch"] for record in records])
    ax.set_xlim(records[0]["epoch"] - 0.5, records[-1]["epoch"] + 0.5)
    ax.set_xlabel("epoch")
    warmup = [record["epoch"] for record in records if record["event"] == "warmup"]
    if warmup:
        ax.axvspan(min(warmup) - 0.5, max(warmup) + 0.5, color="0.93", zorder=0)
        ax.text(
            (min(warmup) + max(warmup)) / 2, 0.02, "warm-up\n(full pool)", transform=ax.get_xaxis_transform(),
            ha="center", va="bottom", fontsize=8, color="0.45",
        )  # fmt: skip


def _kept_timeline(ax: Axes, records: Sequence[dict[str, Any]], by_epoch: dict[int, ScoreFile]) -> None:
    epochs = [record["epoch"] for record in records]
    fractions = [record["num_selected"] / record["pool_size"] for record in records]
    ax.plot(epochs, fractions, "o-", color=KEPT_COLOR, linewidth=2.5, label="all pairs", zorder=3)
    files = [by_epoch[epoch] for epoch in epochs if epoch in by_epoch and by_epoch[epoch].categories is not None]
    if files:
        values = sorted(set(files[0].categories.tolist()), key=str)
        for color, value in zip(CATEGORY_COLORS * len(values), values, strict=False):
            ax.plot(
                [file.event.epoch for file in files],
                [file.event.keep[file.categories == value].mean() for file in files],
                "s--", color=color, linewidth=1.2, markersize=4, label=f"{files[0].category_column} = {value}",
            )  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction of the pool")
    ax.set_title("Kept fraction per epoch")
    _epoch_axis(ax, records)
    # The counts go under the epochs, where no line can cover them
    ax.set_xticks(epochs, [f"{record['epoch']}\n{record['num_selected']:,} kept" for record in records])
    _legend_below(ax, bbox_to_anchor_y=-0.26)


def _churn_timeline(ax: Axes, records: Sequence[dict[str, Any]]) -> None:
    ax.set_title("Churn: 1 − Jaccard with the previous epoch")
    _epoch_axis(ax, records)
    if len(records) < 2:
        _note(ax, "one epoch only")
        return
    epochs, churn = [], []
    for previous, record in zip(records, records[1:], strict=False):
        epochs.append(record["epoch"])
        churn.append(1.0 - jaccard(record["selected_ids"], previous["selected_ids"]))
    ax.bar(epochs, churn, width=0.5, color=BAND_COLOR)
    for epoch, value in zip(epochs, churn, strict=True):
        ax.annotate(f"{value:.3f}", (epoch, value), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_ylim(0, max(max(churn) * 1.25, 0.05))
    ax.set_ylabel("share of the union that changed")


def _band_timeline(ax: Axes, name: str, records: Sequence[dict[str, Any]], by_epoch: dict[int, ScoreFile]) -> None:
    rows = [record for record in records if name in record.get("thresholds", {})]
    epochs = [record["epoch"] for record in rows]
    lo = [record["thresholds"][name]["lo"] for record in rows]
    hi = [record["thresholds"][name]["hi"] for record in rows]
    percentiles = rows[-1].get("percentiles", {}).get(name)
    label = f"band P{percentiles['lo']:g}–P{percentiles['hi']:g}" if percentiles else "band"
    ax.fill_between(epochs, lo, hi, color=BAND_COLOR, alpha=0.2, step=None)
    ax.plot(epochs, lo, "v-", color=BAND_COLOR, label=f"{label} (lower)")
    ax.plot(epochs, hi, "^-", color=BAND_COLOR, label=f"{label} (upper)")
    medians = [
        (epoch, float(np.nanmedian(by_epoch[epoch].event.scores[name])))
        for epoch in epochs
        if epoch in by_epoch and name in by_epoch[epoch].event.scores
    ]
    if medians:
        ax.plot(*zip(*medians, strict=True), "o:", color="0.25", label="pool median")
    ax.set_title(f"{score_label(name)} band per epoch")
    ax.set_ylabel(SCORE_AXIS_LABELS.get(name, name))
    _epoch_axis(ax, records)
    _legend_below(ax, columns=3)


def _aux_timeline(ax: Axes, records: Sequence[dict[str, Any]], by_epoch: dict[int, ScoreFile]) -> None:
    ax.set_title("Aux model validation loss at each refresh")
    _epoch_axis(ax, records)
    refreshes = [
        (
            epoch,
            file.event.metrics["selection/aux/val_loss_before"],
            file.event.metrics["selection/aux/val_loss_after"],
        )
        for epoch, file in sorted(by_epoch.items())
        if "selection/aux/val_loss_before" in file.event.metrics
    ]
    if not refreshes:
        _note(ax, "no aux refresh recorded\n(no LossDiff in the rule, or no score files)")
        return
    epochs, before, after = (list(values) for values in zip(*refreshes, strict=True))
    ax.plot(epochs, before, "o", color=DROPPED_COLOR, markersize=8, label="before alignment (= policy)")
    ax.plot(epochs, after, "o", color=KEPT_COLOR, markersize=8, label="after alignment")
    for epoch, start, end in refreshes:
        ax.annotate("", (epoch, end), (epoch, start), arrowprops={"arrowstyle": "->", "color": "0.3"})
    spread = max(before + after) - min(before + after)
    margin = max(spread * 0.25, 1e-3)
    ax.set_ylim(min(before + after) - margin, max(before + after) + margin)
    ax.set_ylabel("validation preference loss")
    _legend_below(ax)


def _compute_timeline(ax: Axes, records: Sequence[dict[str, Any]], by_epoch: dict[int, ScoreFile]) -> None:
    """Cumulative FTE by category as of each selection event (training through the previous epoch), stacked."""
    files = [file for _, file in sorted(by_epoch.items()) if f"{COMPUTE_PREFIX}train" in file.event.metrics]
    epochs = [file.event.epoch for file in files]
    categories = ("train", *SELECTION_CATEGORIES)
    values = [[file.event.metrics.get(f"{COMPUTE_PREFIX}{name}", 0.0) for file in files] for name in categories]
    colors = [KEPT_COLOR, *CATEGORY_COLORS[: len(SELECTION_CATEGORIES)]]
    ax.stackplot(epochs, values, labels=[name.replace("_", " ") for name in categories], colors=colors, alpha=0.8)
    last = files[-1].event.epoch
    share = files[-1].event.metrics.get(f"{COMPUTE_PREFIX}selection_share", 0.0)
    ax.set_title("Compute so far at each selection event (FTE)")
    ax.set_ylabel("forward-token equivalents")
    ax.text(
        0.02, 0.97,
        f"selection share as of the epoch-{last} event: {100 * share:.1f}%\n"
        f"= selection / (selection + training of epochs 0–{last - 1});\n"
        "the end-of-run console line also counts the last\nepoch's training, so its share is lower",
        transform=ax.transAxes, va="top", ha="left", fontsize=7.5,
        bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
    )  # fmt: skip
    ax.set_ylim(0, max(sum(column) for column in zip(*values, strict=True)) * 1.55)
    _epoch_axis(ax, records)
    _legend_below(ax, columns=3)


# ----- files -----


def figure_png(figure: Figure, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_selection(
    output_dir: str | os.PathLike,
    plot_dir: str | os.PathLike | None = None,
    dpi: int = DPI,
    max_points: int = MAX_SCATTER_POINTS,
) -> list[Path]:
    """Render the overview and one figure per selection event of a run into `plot_dir` (default
    `output_dir/selection_plots`); return the PNG paths, overview first."""
    output_dir = Path(output_dir)
    if not (output_dir / HISTORY_FILENAME).exists():
        raise FileNotFoundError(f"No {HISTORY_FILENAME} in {output_dir}: is it the output_dir of a selective run?")
    history = read_history(output_dir)
    score_files = read_score_files(output_dir)
    plot_dir = Path(plot_dir) if plot_dir is not None else output_dir / PLOT_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = [(plot_dir / OVERVIEW_FILENAME, overview_figure(history, score_files))]
    for file in score_files:
        if file.event.kind == "selection":
            path = plot_dir / EVENT_FILENAME.format(epoch=file.event.epoch)
            figures.append((path, event_figure(file, max_points=max_points)))
    for path, figure in figures:
        path.write_bytes(figure_png(figure, dpi))
    if not score_files:
        logger.warning("No score files in %s: only the overview was drawn.", output_dir / "selection")
    return [path for path, _ in figures]


__all__ = ["event_figure", "figure_png", "overview_figure", "plot_selection"]
