"""The record of one selection event (`SelectionEvent`) and the reporter signature that receives it.

Pure data: no torch, no transformers. The callback builds one event per epoch; reporters, score files
(`score_files.py`), plots and the CLI read it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .rules import Band


if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments


@dataclass
class SelectionEvent:
    """Everything one selection event decided, handed to each reporter in `SelectionCallback.reporters`.

    Arrays are in pool-row order (row `i` is pair `pair_ids[i]`). A warm-up event has no scores and keeps every pair.
    An in-epoch event (`selection_strategy="steps"`) scores a chunk of the pool: `rows` are the chunk's pool rows, and
    `pair_ids`, `keep` and `scores` are the chunk's, in `rows` order; `keep` marks the pairs trained until the next
    event.
    """

    epoch: int
    global_step: int
    kind: str  # "warmup" or "selection" ("offline" for `trl-select score`)
    rule: str
    pair_ids: list[Any]
    keep: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    bands: dict[str, Band] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    aux_refreshed: bool = False
    rows: np.ndarray | None = None


# A reporter: `reporter(event, args, state)`, called on every rank after each event (see `SelectionCallback`).
Reporter = Callable[[SelectionEvent, "TrainingArguments", "TrainerState"], None]


# The logger of the one console line per selection event (`SelectionCallback`).
EVENT_LOGGER = "trl_select.events"
# The logger whose INFO level turns on the selection passes' progress bars (`scoring.progress_disabled`).
PROGRESS_LOGGER = "trl_select.progress"
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
               "critical": logging.CRITICAL}  # fmt: skip


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes each record through `tqdm.write`, which clears the Trainer's progress bar, prints the line on its own
    and redraws the bar (the way transformers prints its logs), instead of appending to the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def show_selection_events(log_level: str = "passive") -> None:
    """Make the event lines (INFO on `EVENT_LOGGER`) reach the console, unless the user configured that logger.

    Scripts like TRL's `dpo.py` leave Python logging unconfigured and set only transformers' own verbosity (warning by
    default), so an INFO line of `trl_select` would reach no handler. This sets `EVENT_LOGGER` alone to INFO, or to
    the trainer's `log_level` when that is set and not `passive` (`--log_level warning` hides the lines), and gives it
    a plain stderr handler only when no handler would receive its records (after a `logging.basicConfig`, or with any
    root handler, they propagate there instead, printed once). Nothing changes if that logger or the `trl_select`
    logger already has a level, or it has a handler. An explicit `log_level` also becomes the `trl_select` loggers' level if unset (at info and debug, the
    selection passes' progress bars show, `PROGRESS_LOGGER`). Other `trl_select` loggers keep their levels.
    """
    package, events = logging.getLogger("trl_select"), logging.getLogger(EVENT_LOGGER)
    if events.level != logging.NOTSET or events.handlers or package.level != logging.NOTSET:
        return  # configured by the user (or by an earlier trainer)
    level = _LOG_LEVELS.get(str(log_level).lower())  # None for "passive"
    if level is not None:
        package.setLevel(level)  # `--log_level info`: the selection passes' progress bars too
    events.setLevel(logging.INFO if level is None else level)
    if not events.hasHandlers():
        handler = _ProgressBarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.set_name("trl_select.events")
        events.addHandler(handler)
        events.propagate = False


__all__ = ["EVENT_LOGGER", "PROGRESS_LOGGER", "Reporter", "SelectionEvent", "show_selection_events"]
