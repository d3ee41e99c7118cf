"""The offline views: figures built from a synthetic run directory, and `trl-select plot` writing them as PNGs."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from PIL import Image

from trl_select.callback import SelectionEvent
from trl_select.cli import main
from trl_select.history import SelectionHistory
from trl_select.plots import event_figure, overview_figure, robust_limits
from trl_select.reporting import KeepTally, read_score_files, score_file_path, write_score_file
from trl_select.rules import Band, band_intersection, jaccard

from .test_reporting import warmup_event


def make_run(output_dir, num_pairs=300, epochs=3, rule_bands=None, categories=True, score_files=True, compute=False):
    """A run directory as the trainer leaves it: the history plus one score file per epoch (warm-up first)."""
    rule_bands = {"lossdiff": (10.0, 90.0), "irm": (10.0, 90.0)} if rule_bands is None else rule_bands
    rule = "lossdiff_irm" if len(rule_bands) == 2 else "irm_band"
    rng = np.random.default_rng(0)
    kinds = np.asarray(["near_miss", "copy", "other"], dtype=object)[rng.integers(0, 3, num_pairs)]
    history, tally = SelectionHistory(output_dir), KeepTally(output_dir)
    ids = list(range(100, 100 + num_pairs))
    for epoch in range(epochs):
        if epoch == 0:
            event = warmup_event(num_pairs, ids)
            event.rule = rule
        else:
            scores = {name: rng.normal(0.1 * epoch, 0.3, num_pairs).astype(np.float32) for name in rule_bands}
            scores = {name: values.astype(np.float64) for name, values in scores.items()}
            keep, bands = band_intersection(scores, rule_bands)
            metrics = {"selection/aux/val_loss_before": 0.7 - 0.01 * epoch, "selection/aux/val_loss_after": 0.6}
            if compute:  # cumulative FTE as the callback logs it: training 4000/epoch, selection 1000/event
                metrics |= {
                    "selection/compute/train": 4000.0 * epoch,
                    "selection/compute/policy_scoring": 600.0 * epoch,
                    "selection/compute/aux_pool": 400.0 * epoch,
                    "selection/compute/selection_share": 1000 / 5000,
                }
            event = SelectionEvent(epoch, 10 * epoch, "selection", rule, ids, keep, scores, bands, metrics, True)
        history.append(
            {
                "epoch": epoch,
                "event": event.kind,
                "pool_size": num_pairs,
                "num_selected": int(event.keep.sum()),
                "rule": rule,
                "thresholds": {n: {"lo": b.lo, "hi": b.hi} for n, b in event.bands.items()},
                "percentiles": {n: {"lo": b.lo_percentile, "hi": b.hi_percentile} for n, b in event.bands.items()},
                "selected_ids": [i for i, k in zip(ids, event.keep, strict=True) if k],
            }
        )
        times_kept = tally.times_kept(event)
        if score_files:
            write_score_file(
                score_file_path(output_dir, epoch),
                event,
                times_kept,
                kinds if categories else None,
                "rejected_kind" if categories else None,
            )
    return history.read()


def _titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes]


def test_event_figure_shows_bands_scatter_categories_and_counts(tmp_path):
    make_run(tmp_path, num_pairs=3_000)
    file = read_score_files(tmp_path)[1]
    figure = event_figure(file, max_points=1_000)
    assert _titles(figure) == [
        "LossDiff distribution",
        "IRM distribution",
        "LossDiff × IRM, 1,000 of 3,000 pairs sampled",
        "Kept fraction by rejected_kind",
        "Epochs trained per pair, through epoch 1",
        "Summary",
    ]
    kept = file.event.keep
    assert figure.get_suptitle().startswith(f"Epoch 1 selection (lossdiff_irm): kept {kept.sum():,} of 3,000")
    lossdiff_ax, _, scatter_ax, category_ax, times_ax, summary_ax = figure.axes
    band = file.event.bands["lossdiff"]
    limits = {line.get_xdata()[0] for line in lossdiff_ax.get_lines() if len(line.get_xdata())}
    assert limits == {band.lo, band.hi}  # the band's limits drawn as vertical lines
    # the axis fits the bulk of the scores and holds the band; the pairs beyond it are counted at the edges
    values = file.event.scores["lossdiff"]
    lo, hi = lossdiff_ax.get_xlim()
    assert lo <= band.lo < band.hi <= hi and (lo, hi) == robust_limits(values, [band])
    below, above = int((values < lo).sum()), int((values > hi).sum())
    assert below > 0 and above > 0  # 3,000 normal scores: about 1% beyond each of the P1 and P99 limits
    edge_notes = [text.get_text() for text in lossdiff_ax.texts]
    assert edge_notes == [f"◀ {below:,} below", f"{above:,} above ▶"]
    all_pairs, kept_pairs = lossdiff_ax.containers  # the histogram of every pair, then of the kept ones
    assert sum(bar.get_height() for bar in all_pairs) + below + above == 3_000
    assert sum(bar.get_height() for bar in kept_pairs) == kept.sum()  # kept pairs are inside the band
    dropped, kept_points, beyond = (c for c in scatter_ax.collections if isinstance(c, PathCollection))
    assert len(dropped.get_offsets()) + len(kept_points.get_offsets()) == 1_000  # bounded
    (x_lo, x_hi), (y_lo, y_hi) = scatter_ax.get_xlim(), scatter_ax.get_ylim()
    points = np.concatenate([dropped.get_offsets(), kept_points.get_offsets()])
    assert (points[:, 0] >= x_lo).all() and (points[:, 0] <= x_hi).all() and (points[:, 1] >= y_lo).all()
    edge = (points[:, 0] == x_lo) | (points[:, 0] == x_hi) | (points[:, 1] == y_lo) | (points[:, 1] == y_hi)
    assert len(beyond.get_offsets()) == edge.sum() > 0  # the pairs beyond the axes, ringed at the edge
    # both bands shaded, and their intersection outlined
    assert [p.get_label() for p in scatter_ax.patches] == ["LossDiff band", "IRM band", "both bands (kept)"]
    # every legend sits below its axes, off the data
    figure.draw_without_rendering()
    for ax in (lossdiff_ax, scatter_ax, category_ax):
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0, ax.get_title()
    widths = sorted(round(bar.get_width(), 6) for bar in category_ax.containers[0])
    expected = sorted(round(kept[file.categories == v].mean(), 6) for v in ("copy", "near_miss", "other"))
    assert widths == expected
    assert [bar.get_height() for bar in times_ax.containers[0]] == [0, 3_000 - kept.sum(), kept.sum()]
    summary = summary_ax.texts[0].get_text()
    assert f"kept: {kept.sum():,} of 3,000 pairs" in summary and "validation loss 0.6900 → 0.6000" in summary


def test_robust_limits_fit_the_bulk_and_hold_the_bands():
    values = np.concatenate([np.linspace(-1.0, 1.0, 999), [500.0, np.nan]])
    lo, hi = robust_limits(values)
    assert -1.1 < lo < -0.9 and 0.9 < hi < 1.1  # the outlier at 500 does not squash the axis
    band = Band(lo=-3.0, hi=0.5, lo_percentile=10.0, hi_percentile=90.0)
    lo, hi = robust_limits(values, [band])
    assert lo < -3.0 and 0.9 < hi < 1.2  # widened by the band, plus a margin of the wider span
    assert robust_limits(np.full(5, 2.0)) == (1.0, 3.0) and robust_limits(np.array([np.nan])) == (-1.0, 1.0)


def test_event_figure_of_a_single_score_rule_has_no_scatter(tmp_path):
    make_run(tmp_path, epochs=2, rule_bands={"irm": (20.0, 80.0)}, categories=False)
    figure = event_figure(read_score_files(tmp_path)[1])
    assert _titles(figure) == ["IRM distribution", "Epochs trained per pair, through epoch 1", "Summary"]
    assert "band P20–P80" in figure.axes[0].get_legend().get_texts()[-1].get_text()


def test_overview_figure_follows_the_history(tmp_path):
    history = make_run(tmp_path, epochs=3)
    figure = overview_figure(history, read_score_files(tmp_path))
    assert _titles(figure) == [
        "Kept fraction per epoch",
        "Churn: 1 − Jaccard with the previous epoch",
        "LossDiff band per epoch",
        "IRM band per epoch",
        "Aux model validation loss at each refresh",
        "Epochs trained per pair, through epoch 2",
    ]
    kept_ax, churn_ax, lossdiff_ax, _, aux_ax, _ = figure.axes
    overall, *per_category = kept_ax.get_lines()
    np.testing.assert_allclose(overall.get_ydata(), [r["num_selected"] / r["pool_size"] for r in history])
    assert [line.get_label() for line in per_category] == [
        f"rejected_kind = {v}" for v in ("copy", "near_miss", "other")
    ]
    churn = [1 - jaccard(b["selected_ids"], a["selected_ids"]) for a, b in zip(history, history[1:], strict=False)]
    np.testing.assert_allclose([bar.get_height() for bar in churn_ax.containers[0]], churn)
    lower = next(line for line in lossdiff_ax.get_lines() if "lower" in line.get_label())
    np.testing.assert_allclose(lower.get_ydata(), [r["thresholds"]["lossdiff"]["lo"] for r in history[1:]])
    after = next(line for line in aux_ax.get_lines() if line.get_label() == "after alignment")
    np.testing.assert_allclose(after.get_ydata(), [0.6, 0.6])


def test_overview_shows_cumulative_compute_from_the_score_files(tmp_path):
    history = make_run(tmp_path, epochs=3, compute=True)
    files = read_score_files(tmp_path)
    assert files[2].event.metrics["selection/compute/train"] == 8000.0  # reporting keeps compute, unlike timings
    figure = overview_figure(history, files)
    compute_ax = figure.axes[-1]
    assert compute_ax.get_title() == "Compute so far at each selection event (FTE)"
    # the share says what it is: as of the last event, without the last epoch's training (the console's is lower)
    share = compute_ax.texts[0].get_text()
    assert "as of the epoch-2 event: 20.0%" in share and "training of epochs 0–1" in share
    legend = [text.get_text() for text in compute_ax.get_legend().get_texts()]
    assert legend == ["train", "reference", "policy scoring", "aux alignment", "aux validation", "aux pool"]
    assert compute_ax.get_ylim()[1] >= 8000 + 1200 + 800  # the stack's top at epoch 2


def test_overview_without_score_files_still_draws_the_history(tmp_path):
    history = make_run(tmp_path, epochs=2, score_files=False)
    figure = overview_figure(history, [])
    assert len(figure.axes) == 6
    assert "no score files" in " ".join(t.get_text() for t in figure.axes[-1].texts)
    with pytest.raises(ValueError, match="empty"):
        overview_figure([])


def _assert_png(path, min_width):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= 300
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10  # drawn on, not a blank canvas


def test_plot_command_writes_the_pngs(tmp_path, capsys):
    make_run(tmp_path / "run", epochs=3)
    assert main(["plot", str(tmp_path / "run")]) == 0
    plot_dir = tmp_path / "run" / "selection_plots"
    names = ["selection_overview.png", "selection_epoch_1.png", "selection_epoch_2.png"]
    assert capsys.readouterr().out.split() == [str(plot_dir / name) for name in names]
    assert sorted(p.name for p in plot_dir.iterdir()) == sorted(names)  # no figure for the warm-up epoch
    for name in names:
        _assert_png(plot_dir / name, min_width=1_000)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "small"), "--dpi", "40"]) == 0
    with Image.open(tmp_path / "small" / names[0]) as small, Image.open(plot_dir / names[0]) as default:
        assert small.width < default.width / 2


def test_plot_command_explains_a_wrong_directory(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "No selection_history.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scores"])  # unknown subcommand: argparse's usage error


def test_console_script_points_at_the_cli():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [s.value for s in scripts if s.name == "trl-select"] == ["trl_select.cli:main"]
