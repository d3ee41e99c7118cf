"""The record of one selection event (`SelectionEvent`) and the reporter signature that receives it.

Pure data: no torch, no transformers. The callback builds one event per epoch; reporters, score files
(`score_files.py`), plots and the CLI read it.
"""

from __future__ import annotations

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


__all__ = ["Reporter", "SelectionEvent"]
