"""What each selection event is shown as: per-pair score files, wandb views, and the scalars for every backend.

Three reporters (`SelectionCallback.reporters`), all acting on world process zero only:

- `ScoreFileReporter` writes `output_dir/selection/epoch_{k}.parquet`: one row per pair of the pool with its id, every
  score, the kept flag and how many epochs so far trained on it; the band limits, rule and epoch ride in the schema
  metadata. `read_score_file` reads one back into a `ScoreFile`.
- `WandbReporter` logs, per event and under `selection/` against `selection/epoch`: the scalars, a histogram of each
  score and of the epochs-trained counts, a sampled LossDiff x IRM table with its scatter chart, and the event figure
  of `plots.py` (score histograms with the bands drawn, scatter coloured kept/dropped).
- `CategoryMetricsReporter` adds the kept fraction per value of a source/category column to the trainer's metrics,
  so every `report_to` backend gets it with the other `selection/*` scalars.

The helpers that compute what is shown (`selection_scalars`, `kept_fraction_by_category`, `times_kept_from_history`,
and from `score_files.py` `scatter_rows`, `score_histogram`, `score_table`) are pure functions, separate from the I/O.
The score-file format itself (`write_score_file`, `read_score_file`, `ScoreFile`) is in `score_files.py`, re-exported
here. Add reporters of your own with `SelectiveDPOTrainer(..., selection_reporters=[...])`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .event import Reporter, SelectionEvent
from .history import HISTORY_FILENAME, read_history
from .score_files import (  # noqa: F401  (re-exported: the score-file API lived here)
    FORMAT_VERSION,
    HISTOGRAM_BINS,
    MAX_SCATTER_POINTS,
    METADATA_KEY,
    SCORE_DIR,
    SCORE_FILE_PATTERN,
    ScoreFile,
    integer_histogram,
    ordered_score_names,
    read_score_file,
    read_score_files,
    scatter_rows,
    score_file_path,
    score_histogram,
    score_table,
    write_score_file,
)
from .suspects import find_suspects
from .suspects_report import suspects_table


if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments

    from .trainer import SelectiveDPOTrainer


logger = logging.getLogger(__name__)

# Columns looked for, in order, when `selection_category_column` is unset.
AUTO_CATEGORY_COLUMNS = ("source", "category")
# A "category" column with more distinct values than this is an id or free text, not a grouping: not reported.
MAX_CATEGORIES = 50
# Rows of the wandb `selection/suspects` table: the most suspect pairs of the run so far.
MAX_SUSPECT_ROWS = 200


# ----- pure helpers -----


def times_kept_from_history(
    records: Sequence[dict[str, Any]], pair_ids: Sequence[Any], before_epoch: int
) -> np.ndarray:
    """For each pair, how many epochs before `before_epoch` trained on it, from `selection_history.jsonl` records.

    A resumed run re-reads the counts of the epochs it did not see; if an epoch was recorded twice (a crash after its
    record), the last record counts. Ids not in `pair_ids` are ignored.
    """
    row_of = {pair_id: row for row, pair_id in enumerate(pair_ids)}
    last_record = {record["epoch"]: record for record in records if record["epoch"] < before_epoch}
    counts = np.zeros(len(pair_ids), dtype=np.int32)
    for record in last_record.values():
        rows = [row_of[pair_id] for pair_id in record["selected_ids"] if pair_id in row_of]
        counts[rows] += 1
    return counts


def kept_fraction_by_category(categories: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    """`{value: kept pairs with that value / pairs with that value}`, values in sorted order."""
    categories = np.asarray(categories, dtype=object)
    keep = np.asarray(keep, dtype=bool)
    return {str(value): float(keep[categories == value].mean()) for value in sorted(set(categories.tolist()), key=str)}


def metric_safe(name: str) -> str:
    """A category value as one metric-name component: no `/` (which would nest it), no spaces."""
    return re.sub(r"[^\w.\-]+", "_", str(name)).strip("_") or "_"


def selection_scalars(
    event: SelectionEvent, categories: np.ndarray | None = None, category_column: str | None = None
) -> dict[str, float]:
    """Every scalar of an event under `selection/`: the event's metrics, plus the size and kept fraction (which a
    warm-up event has no metrics for) and, with a category column, `selection/by_{column}/{value}/kept_fraction`.
    """
    keep = np.asarray(event.keep, dtype=bool)
    scalars = {
        "selection/epoch": float(event.epoch),
        "selection/pool_size": float(keep.size),
        "selection/num_selected": float(keep.sum()),
        "selection/kept_fraction": float(keep.mean()),
    }
    scalars.update({key: float(value) for key, value in event.metrics.items()})
    if categories is not None and category_column is not None:
        for value, fraction in kept_fraction_by_category(categories, keep).items():
            scalars[f"selection/by_{metric_safe(category_column)}/{metric_safe(value)}/kept_fraction"] = fraction
    return scalars


# ----- state shared by the reporters -----


class KeepTally:
    """How many epochs so far, the current one included, trained on each pair (warm-up epochs train on every pair).

    One tally serves all reporters of a trainer: `times_kept(event)` adds the event once, however many reporters ask.
    On the first event it sees, it starts from the epochs already in `selection_history.jsonl`, so a resumed run
    counts the epochs trained before the restart.
    """

    def __init__(self, output_dir: str | os.PathLike, pool_size: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.pool_size = pool_size
        self._counts: np.ndarray | None = None
        self._event: tuple[int, int] | None = None

    def times_kept(self, event: SelectionEvent) -> np.ndarray:
        """The counts of `event`'s pairs (of its chunk, for an in-epoch event: the epoch's segments add up)."""
        key = (event.epoch, event.global_step)
        if key != self._event:
            if self._counts is None and event.rows is None:
                history = self.output_dir / HISTORY_FILENAME
                records = read_history(history) if history.exists() else []
                self._counts = times_kept_from_history(records, event.pair_ids, before_epoch=event.epoch)
            elif self._counts is None:
                size = self.pool_size if self.pool_size is not None else int(event.rows.max()) + 1
                self._counts = np.zeros(size, dtype=np.int32)
            if event.rows is None:
                self._counts = self._counts + np.asarray(event.keep, dtype=np.int32)
            else:
                self._counts[event.rows] += np.asarray(event.keep, dtype=np.int32)
            self._event = key
        return self._counts if event.rows is None else self._counts[event.rows]


def resolve_category_column(column_names: Sequence[str], configured: str | None) -> str | None:
    """The column whose values group the pairs: `configured` (which must exist), else `source` or `category` if the
    dataset has one, else `None`."""
    if configured is not None:
        if configured not in column_names:
            raise ValueError(
                f"`selection_category_column={configured!r}` is not a column of the training dataset "
                f"(columns: {list(column_names)})."
            )
        return configured
    return next((name for name in AUTO_CATEGORY_COLUMNS if name in column_names), None)


def pool_categories(dataset, configured: str | None) -> tuple[str | None, np.ndarray | None]:
    """`(column, values in pool-row order as strings)` of the category column, or `(None, None)` if there is none or
    it has more than `MAX_CATEGORIES` distinct values (then it is an id or free text, and a warning says so)."""
    column = resolve_category_column(dataset.column_names, configured)
    if column is None:
        return None, None
    values = np.asarray([str(value) for value in dataset[column]], dtype=object)
    num_values = len(set(values.tolist()))
    if num_values > MAX_CATEGORIES:
        logger.warning(
            "Column %r has %d distinct values (more than %d): the kept fraction per value is not reported.",
            column,
            num_values,
            MAX_CATEGORIES,
        )
        return None, None
    return column, values


def event_categories(categories: np.ndarray | None, event: SelectionEvent) -> np.ndarray | None:
    """The pool's categories of `event`'s pairs (its chunk's, for an in-epoch event)."""
    if categories is None or event.rows is None:
        return categories
    return categories[event.rows]


# ----- reporters -----


class ScoreFileReporter:
    """Writes `output_dir/selection/epoch_{k}.parquet` at every event, warm-up included (all kept, no scores)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tally: KeepTally,
        categories: np.ndarray | None = None,
        category_column: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.tally = tally
        self.categories = categories
        self.category_column = category_column

    def __call__(self, event: SelectionEvent, args: TrainingArguments, state: TrainerState) -> None:
        if not state.is_world_process_zero:
            return
        path = score_file_path(self.output_dir, event.epoch, None if event.rows is None else event.global_step)
        write_score_file(
            path, event, self.tally.times_kept(event), event_categories(self.categories, event), self.category_column
        )
        logger.debug("Wrote %s (%d bytes)", path, path.stat().st_size)


class CategoryMetricsReporter:
    """Adds `selection/by_{column}/{value}/kept_fraction` to the trainer's metrics at each selection event, so every
    `report_to` backend gets them with the next training log, like the callback's own `selection/*` scalars."""

    def __init__(
        self, publish: Callable[[dict[str, float]], None], categories: np.ndarray, category_column: str
    ) -> None:
        self.publish = publish
        self.categories = categories
        self.category_column = category_column

    def __call__(self, event: SelectionEvent, args: TrainingArguments, state: TrainerState) -> None:
        # Warm-up keeps everything (1.0 for every value); the callback publishes nothing for it either.
        if event.kind != "selection" or not state.is_world_process_zero:
            return
        scalars = selection_scalars(event, event_categories(self.categories, event), self.category_column)
        self.publish({key: value for key, value in scalars.items() if key.startswith("selection/by_")})


class WandbReporter:
    """Logs each event to the wandb run of transformers' `WandbCallback`, under `selection/` against `selection/epoch`.

    Per event: every scalar of `selection_scalars`; `selection/{score}/histogram` for each score and
    `selection/times_kept/histogram` (epochs trained per pair so far); `selection/pairs`, a table of at most
    `max_points` sampled pairs (`pair_id`, scores, `status` kept/dropped, `times_kept`), and with two scores the
    `selection/scatter` chart of it (wandb's scatter preset cannot colour points, so the table and the event figure
    carry the kept/dropped colouring); `selection/event_plot`, the `plots.event_figure` image; with `output_dir`,
    `selection/suspects`, the `trl-select suspects` ranking (`suspects.find_suspects`, top `max_suspects`) over the
    score files so far, so the run's last one is the end-of-run list. Does nothing unless
    "wandb" is in `report_to` and a run is active. Logs without `step=`: wandb's own step counter advances as it does
    for the `WandbCallback`'s logs, so the two never conflict.
    """

    def __init__(
        self,
        tally: KeepTally,
        categories: np.ndarray | None = None,
        category_column: str | None = None,
        max_points: int = MAX_SCATTER_POINTS,
        log_figures: bool = True,
        output_dir: str | os.PathLike | None = None,
        max_suspects: int = MAX_SUSPECT_ROWS,
    ) -> None:
        self.tally = tally
        self.output_dir = output_dir
        self.max_suspects = max_suspects
        self.categories = categories
        self.category_column = category_column
        self.max_points = max_points
        self.log_figures = log_figures
        self._defined_for_run: str | None = None

    def __call__(self, event: SelectionEvent, args: TrainingArguments, state: TrainerState) -> None:
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        import wandb

        run = wandb.run
        if run is None or getattr(run, "disabled", False):
            return
        if self._defined_for_run != run.id:
            # Every selection/* key is plotted against the epoch, not the global step of the WandbCallback's `*` glob.
            run.define_metric("selection/epoch")
            run.define_metric("selection/*", step_metric="selection/epoch")
            self._defined_for_run = run.id
        run.log(self.payload(event, wandb))

    def payload(self, event: SelectionEvent, wandb) -> dict[str, Any]:
        """The dict logged for `event` (wandb objects built with the `wandb` module passed in)."""
        times_kept = self.tally.times_kept(event)
        categories = event_categories(self.categories, event)
        log: dict[str, Any] = dict(selection_scalars(event, categories, self.category_column))
        for name, values in event.scores.items():
            histogram = score_histogram(values)
            if histogram is not None:
                log[f"selection/{name}/histogram"] = wandb.Histogram(np_histogram=histogram)
        log["selection/times_kept/histogram"] = wandb.Histogram(np_histogram=integer_histogram(times_kept))
        if event.scores:
            rows = scatter_rows(len(event.pair_ids), self.max_points, seed=event.epoch)
            names = ordered_score_names(list(event.scores))
            columns = ["pair_id", *names, "status", "times_kept"]
            data = [
                [
                    event.pair_ids[row],
                    *(_json_float(event.scores[name][row]) for name in names),
                    "kept" if event.keep[row] else "dropped",
                    int(times_kept[row]),
                ]
                for row in rows
            ]
            if categories is not None:
                columns.append(self.category_column)
                for line, row in zip(data, rows, strict=True):
                    line.append(categories[row])
            table = wandb.Table(columns=columns, data=data)
            log["selection/pairs"] = table
            if len(names) >= 2:
                x, y = names[0], names[1]
                # The chart reads the run's latest `selection/scatter_table`, so it shows the latest event.
                log["selection/scatter"] = wandb.plot.scatter(table, x, y, title=f"{x} x {y}, latest selection")
            if self.log_figures:
                log["selection/event_plot"] = wandb.Image(self._render(event, times_kept))
        if self.output_dir is not None and event.kind == "selection":
            suspects = self._suspects_table(wandb)
            if suspects is not None:
                log["selection/suspects"] = suspects
        return log

    def _suspects_table(self, wandb):
        try:  # reads the score files, this event's included (`ScoreFileReporter` runs first)
            return suspects_table(find_suspects(self.output_dir, top=self.max_suspects), wandb)
        except (FileNotFoundError, ValueError) as error:
            logger.warning("No selection/suspects table: %s", error)
            return None

    def _render(self, event: SelectionEvent, times_kept: np.ndarray):
        from PIL import Image

        from .plots import event_figure, figure_png

        figure = event_figure(
            ScoreFile(event, times_kept, event_categories(self.categories, event), self.category_column),
            max_points=self.max_points,
        )
        return Image.open(io.BytesIO(figure_png(figure)))


def _json_float(value: float) -> float | None:
    # wandb tables are JSON: NaN/inf would not survive; an empty cell does.
    value = float(value)
    return value if np.isfinite(value) else None


def default_reporters(trainer: SelectiveDPOTrainer) -> list[Reporter]:
    """The reporters every selective trainer (`trainer`, a [`SelectiveDPOTrainer`]) gets: score files, per-category
    scalars (with a category column, handed to `trainer.log_selection_metrics`), wandb."""
    args = trainer.args
    column, categories = pool_categories(trainer.train_dataset, args.selection_category_column)
    tally = KeepTally(args.output_dir, len(trainer.train_dataset))
    reporters = [ScoreFileReporter(args.output_dir, tally, categories, column)]
    if column is not None:
        reporters.append(CategoryMetricsReporter(trainer.log_selection_metrics, categories, column))
    reporters.append(WandbReporter(tally, categories, column, output_dir=args.output_dir))
    return reporters


__all__ = [
    "CategoryMetricsReporter",
    "KeepTally",
    "ScoreFile",
    "ScoreFileReporter",
    "WandbReporter",
    "default_reporters",
    "read_score_file",
    "read_score_files",
    "score_file_path",
    "score_table",
    "selection_scalars",
    "write_score_file",
]
