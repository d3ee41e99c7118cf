"""Which preference pairs are probably mislabeled? A ranked list from the per-pair scores of the selection events.

A pair whose label is flipped (the "chosen" answer is the worse one) sits in the low tail of the implicit reward
margin (the policy, trained on the rest of the pool, prefers its "rejected" side) and in the low tail of LossDiff
(moving θ_t toward the validation-aligned θ_aux raises its loss: it pulls against the clean validation direction).
On the reverse-digits benchmark (`benchmarks/results/quality/quality.md`) the pairs the lower cuts drop are 81-86%
flipped, against 30% in the pool. This module accumulates that evidence over every selection event of a run (and any
offline `trl-select score` file) into one number per pair, the *suspicion*, and ranks the pairs by it.

For each event `e` (one score file) and score `s` of `SUSPECT_SCORES`, the percentile of pair `i` within the pool is

    p_{e,s}(i) = 100 · (rank_{e,s}(i) - 1/2) / n_{e,s}        (mid-ranks for ties; finite scores only)

so `p` near 0 is the bottom of the pool. With `q = 100 - p` (the share of the pool above the pair, for a score whose
low tail is suspect), the default statistic `mean_log_odds` is

    suspicion(i) = 100 · σ( mean over (e, s) of log(q_{e,s}(i) / (100 - q_{e,s}(i))) )

0-100: 50 for a pair of average scores, near 100 for one at the bottom of IRM and LossDiff at every event. It ranks
like the mean log-odds, so a pair at the very bottom of one score counts for more than one merely below the median
of both (the mean percentile would weigh them alike). Measured against the alternatives of `SUSPECT_STATISTICS` and
against single scores in `benchmarks/suspects.py` (`benchmarks/results/suspects.md`): on the reverse-digits task it
has the best precision@10% and @20% of the statistics over a run's events, and beats the last event's IRM or
LossDiff alone (an offline `trl-select score` file of the final policy, passed with the run, adds one more, more
trained event and helps a little further). Percentiles, not raw values, because the scale of both scores changes from epoch to epoch as the
policy moves away from π_ref.

Everything here reads the score files with pyarrow (`score_files.py`): importing this module imports neither torch nor
transformers nor TRL. `find_suspects` is the API; `trl_select.suspects_report` writes the ranking as JSONL, CSV, a
text table or a self-contained HTML report, and builds the wandb table the trainer's wandb reporter logs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .pair_files import load_pairs, pair_ids_of
from .pool_source import resolve_pool_source
from .score_files import (  # noqa: F401  (ScoreEvent, read_score_event: re-exported, they lived here)
    FIXED_COLUMNS,
    FORMAT_VERSION,
    METADATA_KEY,
    SCORE_DIR,
    ScoreEvent,
    read_score_event,
)


logger = logging.getLogger(__name__)

# Score -> which tail holds the suspects. Both: a flipped pair has a low (negative) margin and a low LossDiff.
SUSPECT_SCORES: dict[str, str] = {"irm": "low", "lossdiff": "low"}
# The band cut of the built-in rules (`irm_lo_percentile`, `lossdiff_lo_percentile`): the "suspect tail" counted.
TAIL_PERCENTILE = 10.0
TEXT_COLUMNS = ("prompt", "chosen", "rejected")


# ----- reading score files -----


def _score_file_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run's OUTPUT_DIR or a score file (.parquet).")
    folder = path / SCORE_DIR if (path / SCORE_DIR).is_dir() else path
    files = sorted(folder.glob("epoch_*.parquet")) or sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"No score files in {path} (looked for {folder}/epoch_*.parquet and *.parquet). A selective training run "
            "writes OUTPUT_DIR/selection/epoch_{k}.parquet at each selection event; for a model trained without "
            "selection, score the pool once with `trl-select score ... --scores lossdiff,irm --out scores.parquet` "
            "and pass that file."
        )
    return files


def load_score_files(*paths: str | os.PathLike, scores: Sequence[str] | None = None) -> list[ScoreEvent]:
    """The score events of `paths`, each a run's OUTPUT_DIR (its `selection/epoch_*.parquet`), a folder of score files,
    or one `.parquet` score file. Run events come in epoch order, then offline files in the order given.

    Files without any of `scores` (default: `SUSPECT_SCORES`) are skipped: the warm-up epochs keep every pair and
    score none. Raises `FileNotFoundError`/`ValueError` naming the fix when nothing usable is found or when two files
    score different pools.
    """
    if not paths:
        raise ValueError("load_score_files needs at least one OUTPUT_DIR or score file.")
    wanted = tuple(scores or SUSPECT_SCORES)
    events = [read_score_event(file) for path in paths for file in _score_file_paths(Path(path))]
    usable = [event for event in events if any(name in event.scores for name in wanted)]
    if not usable:
        kinds = sorted({event.kind for event in events})
        raise ValueError(
            f"The score files of {', '.join(map(str, paths))} ({len(events)} file(s), kinds {kinds}) hold none of the "
            f"scores {list(wanted)}: a run writes them from the first selection event on (epoch "
            "`selection_warmup_epochs`); train past the warm-up, or score the pool with `trl-select score --scores "
            "lossdiff,irm`."
        )
    usable.sort(key=lambda event: (event.kind == "offline", event.epoch if event.kind != "offline" else 0))
    reference = set(usable[0].pair_ids)
    for event in usable[1:]:
        if set(event.pair_ids) != reference:
            raise ValueError(
                f"{event.path} scores {len(event.pair_ids)} pairs and {usable[0].path} {len(reference)}, not the same "
                "pairs: pass score files of one pool (one run's OUTPUT_DIR, and offline files scored on the dataset "
                "that run trained on)."
            )
    labels = [event.label for event in usable]
    for index, event in enumerate(usable):  # two offline files with the same stem, or a run passed twice
        if labels.count(event.label) > 1:
            usable[index] = dataclasses.replace(event, label=f"{event.label}_{index}")
    return usable


# ----- the math (pure) -----


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """`100 · (rank - 1/2) / n` among the finite values (mid-ranks for ties), NaN for a non-finite value.

    0 < p < 100: the lowest of n distinct values gets 50/n, the highest 100 - 50/n; a constant score gets 50 for all.
    """
    values = np.asarray(values, dtype=np.float64)
    result = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return result
    x = values[finite]
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # mid-rank of each run of equal values: (first + last) / 2 with 1-based ranks
    starts = np.searchsorted(sorted_x, sorted_x, side="left")
    ends = np.searchsorted(sorted_x, sorted_x, side="right")
    ranks = np.empty(n)
    ranks[order] = (starts + 1 + ends) / 2.0
    result[finite] = 100.0 * (ranks - 0.5) / n
    return result


def suspicion_percentiles(percentiles: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """`q = 100 - p` for a score whose low tail is suspect, `q = p` for a high tail; shape `(events, scores, pairs)`."""
    q = np.array(percentiles, dtype=np.float64, copy=True)
    for index, direction in enumerate(directions):
        if direction not in ("low", "high"):
            raise ValueError(f"A suspect direction is 'low' or 'high', got {direction!r}.")
        if direction == "low":
            q[:, index] = 100.0 - q[:, index]
    return q


def _nanmean(values: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    finite = np.isfinite(values)
    counts = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def mean_percentile(q: np.ndarray) -> np.ndarray:
    """`mean over (e, s) of q_{e,s}`: how far from the bottom of each score the pair sat, on average."""
    return _nanmean(q, (0, 1))


def mean_log_odds(q: np.ndarray) -> np.ndarray:
    """`100 · σ(mean over (e, s) of logit(q_{e,s} / 100))`: the mean of the log-odds of sitting below the pair, mapped
    back to 0-100. Ranks like the mean log-odds; the extremes weigh more than in `mean_percentile` (the lowest of
    2000 pairs once and the median once give 98.4, not 75)."""
    fraction = q / 100.0
    with np.errstate(invalid="ignore", divide="ignore"):
        log_odds = _nanmean(np.log(fraction) - np.log1p(-fraction), (0, 1))
    return 100.0 / (1.0 + np.exp(-log_odds))


def tail_fraction(q: np.ndarray, tail: float = TAIL_PERCENTILE) -> np.ndarray:
    """`100 · share of (e, s) with q_{e,s} > 100 - tail` (how often the pair sat in a cut tail), plus
    `mean_percentile / 1000` to order pairs with the same count."""
    in_tail = np.where(np.isfinite(q), (q > 100.0 - tail).astype(np.float64), np.nan)
    return 100.0 * _nanmean(in_tail, (0, 1)) + mean_percentile(q) / 1000.0


def last_event(q: np.ndarray) -> np.ndarray:
    """`mean over s of q_{E,s}` of the last event only (the latest, most trained policy)."""
    return _nanmean(q[-1:], (0, 1))


def recency_weighted(q: np.ndarray) -> np.ndarray:
    """`sum_e w_e · mean_s q_{e,s} / sum_e w_e` with `w_e = e + 1`: later events, scored by a more trained policy,
    count more."""
    per_event = _nanmean(q, (1,))
    weights = np.arange(1, q.shape[0] + 1, dtype=np.float64)[:, None] * np.isfinite(per_event)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weights.sum(0) > 0, np.nansum(per_event * weights, 0) / weights.sum(0), np.nan)


def both_scores_agree(q: np.ndarray) -> np.ndarray:
    """`mean over e of min over s of q_{e,s}`: high only where every score puts the pair near its bottom."""
    lowest = np.where(np.isfinite(q), q, np.inf).min(axis=1, keepdims=True)
    return _nanmean(np.where(np.isfinite(lowest), lowest, np.nan), (0, 1))


# Name -> function of the suspicion percentiles `q` (events, scores, pairs) -> one number per pair, higher = more
# suspect. `benchmarks/suspects.py` measures each; `DEFAULT_STATISTIC` is the one `trl-select suspects` uses.
SUSPECT_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean_log_odds": mean_log_odds,
    "mean_percentile": mean_percentile,
    "tail_fraction": tail_fraction,
    "last_event": last_event,
    "recency_weighted": recency_weighted,
    "both_scores_agree": both_scores_agree,
}
DEFAULT_STATISTIC = "mean_log_odds"


# ----- ranking -----


@dataclass
class Suspect:
    """One pair of the ranking (`rank` 1 = most suspect).

    `statistic` is the suspicion (0-100 for every built-in statistic); `percentiles[event][score]` the pair's
    percentile `p` of that score at that event (0 = the pool's lowest); `times_dropped` how many of the events'
    rules left the pair out; `prompt`/`chosen`/`rejected` the pair's text when a dataset was given.
    """

    rank: int
    pair_id: Any
    statistic: float
    percentiles: dict[str, dict[str, float]]
    times_dropped: int
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def to_record(self) -> dict[str, Any]:
        """A flat row: rank, pair_id, suspicion (the statistic the ranking used), times_dropped, `{event}.{score}`
        percentiles, and the text columns when known."""
        record: dict[str, Any] = {
            "rank": self.rank,
            "pair_id": self.pair_id,
            "suspicion": _round(self.statistic),
            "times_dropped": self.times_dropped,
        }
        for event, values in self.percentiles.items():
            for score, value in values.items():
                record[f"{event}.{score}"] = _round(value)
        if self.chosen is not None:
            record.update(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected)
        return record


def _round(value: float) -> float | None:
    return round(float(value), 2) if math.isfinite(value) else None


def rank_suspects(
    events: Sequence[ScoreEvent],
    statistic: str = DEFAULT_STATISTIC,
    scores: Sequence[str] | None = None,
    directions: Mapping[str, str] | None = None,
    top: int | None = None,
) -> list[Suspect]:
    """Rank the pairs of `events` by `statistic` (a name in `SUSPECT_STATISTICS`), most suspect first.

    `scores` defaults to the scores of `SUSPECT_SCORES` the files hold; `directions` overrides which tail of a score
    is suspect (`"low"`/`"high"`). Ties keep the order of the first event's rows. Pairs whose every score is
    non-finite rank last.
    """
    if statistic not in SUSPECT_STATISTICS:
        raise ValueError(f"Unknown suspect statistic {statistic!r}; choose from {sorted(SUSPECT_STATISTICS)}.")
    if not events:
        raise ValueError("rank_suspects needs at least one score event.")
    present = {name for event in events for name in event.scores}
    names = [name for name in (scores or SUSPECT_SCORES) if name in present]
    if not names:
        raise ValueError(
            f"None of the scores {list(scores or SUSPECT_SCORES)} is in the score files ({sorted(present)})."
        )
    directions = {**SUSPECT_SCORES, **(directions or {})}
    unknown = [name for name in names if name not in directions]
    if unknown:
        raise ValueError(f"No suspect direction for {unknown}: pass directions={{{unknown[0]!r}: 'low' or 'high'}}.")
    pair_ids = list(events[0].pair_ids)
    row_of = {pair_id: row for row, pair_id in enumerate(pair_ids)}
    percentiles = np.full((len(events), len(names), len(pair_ids)), np.nan)
    dropped = np.zeros(len(pair_ids), dtype=np.int64)
    for e, event in enumerate(events):
        rows = np.fromiter((row_of[pair_id] for pair_id in event.pair_ids), dtype=np.int64, count=len(event.pair_ids))
        for s, name in enumerate(names):
            if name in event.scores:
                percentiles[e, s, rows] = percentile_ranks(event.scores[name])
        dropped[rows] += ~event.kept
    values = SUSPECT_STATISTICS[statistic](suspicion_percentiles(percentiles, [directions[n] for n in names]))
    order = np.argsort(-np.where(np.isfinite(values), values, -np.inf), kind="stable")
    if top is not None:
        order = order[:top]
    return [
        Suspect(
            rank=rank,
            pair_id=pair_ids[row],
            statistic=float(values[row]),
            percentiles={
                event.label: {
                    name: float(percentiles[e, s, row]) for s, name in enumerate(names) if name in event.scores
                }
                for e, event in enumerate(events)
            },
            times_dropped=int(dropped[row]),
        )
        for rank, row in enumerate(order, start=1)
    ]


# ----- the pairs' text -----


def _as_text(value: Any) -> str:
    """A string as is; a conversation (list of `{"role", "content"}`) as `role: content` lines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(
            f"{message.get('role', '?')}: {message.get('content', '')}" if isinstance(message, dict) else str(message)
            for message in value
        )
    return str(value)


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """`(prompt, chosen, rejected)` of an implicit-prompt pair (whole transcripts sharing a prefix, as HH-RLHF): the
    prompt is the shared prefix, cut after its last `"Assistant:"` when it has one (else at the full shared prefix)."""
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    cut = chosen.rfind("Assistant:", 0, length)
    length = cut + len("Assistant:") if cut >= 0 else length
    return chosen[:length], chosen[length:], rejected[length:]


def pair_texts(
    dataset_path: str | os.PathLike, pair_ids: Iterable[Any], split: str = "train", read: int | None = None
) -> dict[Any, tuple[str, str, str]]:
    """`{pair_id: (prompt, chosen, rejected)}` of the first `read` of `pair_ids` (default: all) from the dataset at
    `dataset_path`, matched by its `id` column (else the row index, the trainer's convention). Raises `ValueError`
    naming the fix if any of `pair_ids` is not in the dataset.

    Without a `prompt` column (the implicit-prompt format), the prompt is the shared prefix (`split_implicit_prompt`).
    """
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = load_pairs(str(dataset_path), split)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    missing_columns = [name for name in ("chosen", "rejected") if name not in dataset.column_names]
    if missing_columns:
        raise ValueError(
            f"--dataset {dataset_path} has no {missing_columns} column(s) (it has {dataset.column_names}): pass the "
            "preference dataset the run trained on."
        )
    ids = pair_ids_of(dataset)
    row_of = {pair_id: row for row, pair_id in enumerate(ids)}
    wanted = list(pair_ids)
    unknown = [pair_id for pair_id in wanted if pair_id not in row_of]
    if unknown:
        source = (
            "its `id` column" if "id" in dataset.column_names else f"row indices 0..{len(ids) - 1} (no `id` column)"
        )
        raise ValueError(
            f"{len(unknown)} of the {len(wanted)} pair ids of the score files (e.g. {unknown[:3]}) are not in --dataset "
            f"{dataset_path} (ids: {source}). Pass the dataset the run trained on, unfiltered and in its original "
            "order (pair ids are its `id` column, else its row numbers before TRL's filtering)."
        )
    texts = {}
    has_prompt = "prompt" in dataset.column_names
    for pair_id in wanted[:read]:
        row = dataset[row_of[pair_id]]
        chosen, rejected = _as_text(row["chosen"]), _as_text(row["rejected"])
        if has_prompt:
            texts[pair_id] = (_as_text(row["prompt"]), chosen, rejected)
        else:
            texts[pair_id] = split_implicit_prompt(chosen, rejected)
    return texts


def recorded_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str | None, str | None, str]:
    """`(location, split, note)` of the pool the first run folder of `paths` recorded (`pool_source.json`, its files'
    sha256 checked), or `(None, None, why not)`: the text `trl-select suspects` shows when `--dataset` is not given."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    notes = []
    for path in paths:
        if Path(path).is_dir():
            location, split, note = resolve_pool_source(path)
            if location is not None:
                return location, split, note
            notes.append(note)
    return None, None, "; ".join(notes) or "score files only (no run folder)"


def find_suspects(
    output_dir: str | os.PathLike | Sequence[str | os.PathLike],
    dataset: str | os.PathLike | None = None,
    top: int | None = None,
    statistic: str = DEFAULT_STATISTIC,
    split: str = "train",
) -> list[Suspect]:
    """The pairs of a run ranked by the evidence that their label is flipped, most suspect first.

    Args:
        output_dir (`str`, `os.PathLike` or a sequence of them):
            A selective run's `output_dir` (its `selection/epoch_*.parquet`), a score file, a folder of score files,
            or a list of these (e.g. a run and an offline `trl-select score` file of the same pool).
        dataset (`str` or `os.PathLike`, *optional*, defaults to `None`):
            The training dataset (a `save_to_disk` folder, .jsonl, .json or .parquet) to attach the prompt, chosen
            and rejected text of each pair, matched by its `id` column or row index.
        top (`int`, *optional*, defaults to `None`):
            Keep the `top` most suspect pairs (`None`: all).
        statistic (`str`, *optional*, defaults to `"mean_log_odds"`):
            A name in `SUSPECT_STATISTICS` (`DEFAULT_STATISTIC`, see the module docstring).
        split (`str`, *optional*, defaults to `"train"`):
            The split of a `DatasetDict` folder.

    Returns:
        `list[Suspect]`: one row per pair (`Suspect.to_record()` for a flat dict), `rank` 1 first.
    """
    paths = [output_dir] if isinstance(output_dir, (str, os.PathLike)) else list(output_dir)
    suspects = rank_suspects(load_score_files(*paths), statistic=statistic)
    if dataset is not None:
        # every id is checked (a wrong dataset fails whatever `top`), only the kept rows' text is read
        texts = pair_texts(dataset, [row.pair_id for row in suspects], split, read=top)
        for row in suspects[:top]:
            row.prompt, row.chosen, row.rejected = texts[row.pair_id]
    return suspects[:top]


__all__ = [
    "DEFAULT_STATISTIC",
    "SUSPECT_SCORES",
    "SUSPECT_STATISTICS",
    "ScoreEvent",
    "Suspect",
    "find_suspects",
    "load_score_files",
    "recorded_dataset",
    "percentile_ranks",
    "rank_suspects",
    "read_score_event",
]
