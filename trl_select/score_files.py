"""Score files: one parquet file per selection event (`output_dir/selection/epoch_{k}.parquet`), written and read.

The file format layer: NumPy and pyarrow only (no torch, no transformers), so `trl-select plot`, `trl-select
suspects` and any script can read a run's scores without the trainer stack. The layout is in docs/formats.md.

- `write_score_file` / `score_table`: one row per pair of the pool with its id, every score, the kept flag and how
  many epochs so far trained on it; the band limits, rule and epoch ride in the schema metadata.
- `read_score_file` / `read_score_files`: a file (or a run's files) back into `ScoreFile`s, each holding the
  `SelectionEvent` it records.
- `read_score_event`: the lenient reader of `trl-select suspects`, which also takes offline files and older layouts.
- Small pure helpers shared by the readers' views (the order of score columns, the sampled scatter rows, histograms).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .event import SelectionEvent
from .rules import Band


SCORE_DIR = "selection"
SCORE_FILE_PATTERN = "epoch_{epoch}.parquet"
# Schema-metadata key of a score file, and the layout version it holds.
METADATA_KEY = b"trl_select"
FORMAT_VERSION = 1
# The columns that are not scores.
FIXED_COLUMNS = ("epoch", "pair_id", "kept", "times_kept_so_far", "category")
# Bound on the points of the wandb scatter table and of the scatter panels (sampled, deterministic per epoch).
MAX_SCATTER_POINTS = 5_000
HISTOGRAM_BINS = 64
# Timings vary from run to run; leaving them out of score files keeps a file a function of the seed and data.
_TIMING_PREFIX = "selection/seconds"


# ----- pure helpers -----


def ordered_score_names(names: Sequence[str]) -> list[str]:
    """LossDiff first, then IRM, then any other score in the given order: LossDiff is the x axis of every scatter."""
    preferred = [name for name in ("lossdiff", "irm") if name in names]
    return preferred + [name for name in names if name not in preferred]


def score_file_path(output_dir: str | os.PathLike, epoch: int, global_step: int | None = None) -> Path:
    """`output_dir/selection/epoch_{epoch}.parquet`, or `epoch_{epoch}_step_{global_step}.parquet` for an in-epoch
    event (several per epoch)."""
    name = SCORE_FILE_PATTERN.format(epoch=epoch)
    if global_step is not None:
        name = name.replace(".parquet", f"_step_{global_step}.parquet")
    return Path(output_dir) / SCORE_DIR / name


def scatter_rows(num_rows: int, max_points: int = MAX_SCATTER_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted row indices of at most `max_points` rows, uniformly without replacement; the same for the same seed."""
    if num_rows <= max_points:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=max_points, replace=False))


def score_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray] | None:
    """`(counts, edges)` of the finite values (non-finite scores are counted in `selection/{score}/num_nonfinite`);
    `None` if there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return np.histogram(finite, bins=bins)


def integer_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(counts, edges)` with one bin per integer value from 0 to the maximum (edges at the half-integers)."""
    values = np.asarray(values, dtype=np.int64)
    edges = np.arange(-0.5, int(values.max(initial=0)) + 1.0)
    return np.histogram(values, bins=edges)


def _compact_floats(values: np.ndarray) -> pa.Array:
    # Scores come from float32 log-probs, so float32 usually holds them exactly: half the bytes, same values. Any
    # score it would round stays float64, so a file always reproduces the keep-mask bit for bit.
    values = np.asarray(values, dtype=np.float64)
    narrow = values.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), values, equal_nan=True):
        return pa.array(narrow)
    return pa.array(values)


def score_table(
    event: SelectionEvent,
    times_kept: np.ndarray,
    categories: np.ndarray | None = None,
    category_column: str | None = None,
) -> pa.Table:
    """The score file of one event as an Arrow table, rows in pool order.

    Columns: `epoch`, `pair_id`, one column per score (`lossdiff`, `irm`, ...; float32 when that is exact, else
    float64), `kept`, `times_kept_so_far` (epochs so far, this one included, that train on the pair) and, with a
    category column, `category`. The schema metadata (`METADATA_KEY`) holds the epoch, global step, event kind, rule,
    each score's band (`lo`, `hi`, `lo_percentile`, `hi_percentile`), whether the aux model was refreshed, the
    event's `selection/*` metrics except timings, and the category column's name.
    """
    num_rows = len(event.pair_ids)
    columns: dict[str, pa.Array] = {
        "epoch": pa.array(np.full(num_rows, event.epoch, dtype=np.int32)),
        "pair_id": pa.array(list(event.pair_ids)),
    }
    for name in ordered_score_names(list(event.scores)):
        columns[name] = _compact_floats(event.scores[name])
    columns["kept"] = pa.array(np.asarray(event.keep, dtype=bool))
    columns["times_kept_so_far"] = pa.array(np.asarray(times_kept, dtype=np.int32))
    if categories is not None:
        columns["category"] = pa.array([str(value) for value in categories]).dictionary_encode()
    metadata = {
        "format_version": FORMAT_VERSION,
        "epoch": event.epoch,
        "global_step": event.global_step,
        "kind": event.kind,
        "rule": event.rule,
        "bands": {name: band.as_dict() for name, band in event.bands.items()},
        "aux_refreshed": event.aux_refreshed,
        "metrics": {key: value for key, value in event.metrics.items() if not key.startswith(_TIMING_PREFIX)},
        "category_column": category_column if categories is not None else None,
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


@dataclass
class ScoreFile:
    """One score file read back: the event (pair ids, keep-mask, scores, bands, metrics without timings), the
    epochs-trained count of each pair, and the category of each pair if the run had a category column."""

    event: SelectionEvent
    times_kept: np.ndarray
    categories: np.ndarray | None = None
    category_column: str | None = None
    path: Path | None = None


def write_score_file(
    path: str | os.PathLike,
    event: SelectionEvent,
    times_kept: np.ndarray,
    categories: np.ndarray | None = None,
    category_column: str | None = None,
) -> Path:
    """Write `score_table(...)` to `path` (zstd parquet) atomically: a reader sees the old file or the new one, whole.

    The temporary file starts with a dot, which pyarrow's dataset discovery skips.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        table = score_table(event, times_kept, categories, category_column)
        pq.write_table(table, tmp, compression="zstd", **_parquet_encodings(table.schema))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _parquet_encodings(schema: pa.Schema) -> dict[str, Any]:
    # Random-looking floats gain nothing from a dictionary (it doubles them) but compress better byte-split; integer
    # ids, usually a range, delta-encode to almost nothing. 60k pairs with two float32 scores: about 0.45 MB.
    dictionary, encodings = [], {}
    for field in schema:
        if pa.types.is_floating(field.type):
            encodings[field.name] = "BYTE_STREAM_SPLIT"
        elif field.name == "pair_id" and pa.types.is_integer(field.type):
            encodings[field.name] = "DELTA_BINARY_PACKED"
        elif not pa.types.is_boolean(field.type):
            dictionary.append(field.name)
    return {"use_dictionary": dictionary, "column_encoding": encodings}


def read_score_file(path: str | os.PathLike) -> ScoreFile:
    """Read a score file written by `write_score_file` back into the event it records."""
    path = Path(path)
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a trl-select score file (no {METADATA_KEY.decode()!r} schema metadata).")
    metadata = json.loads(raw)
    if metadata["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path} has score-file format {metadata['format_version']}; this trl-select reads up to "
            f"{FORMAT_VERSION}. Upgrade trl-select."
        )
    bands = {name: Band(**limits) for name, limits in metadata["bands"].items()}
    fixed = {"epoch", "pair_id", "kept", "times_kept_so_far", "category"}
    scores = {name: table[name].to_numpy().astype(np.float64) for name in table.column_names if name not in fixed}
    event = SelectionEvent(
        epoch=metadata["epoch"],
        global_step=metadata["global_step"],
        kind=metadata["kind"],
        rule=metadata["rule"],
        pair_ids=table["pair_id"].to_pylist(),
        keep=table["kept"].to_numpy(zero_copy_only=False).astype(bool),
        scores=scores,
        bands=bands,
        metrics=metadata["metrics"],
        aux_refreshed=metadata["aux_refreshed"],
    )
    categories = None
    if "category" in table.column_names:
        categories = np.asarray(table["category"].to_pylist(), dtype=object)
    return ScoreFile(
        event=event,
        times_kept=table["times_kept_so_far"].to_numpy().astype(np.int64),
        categories=categories,
        category_column=metadata["category_column"],
        path=path,
    )


def read_score_files(output_dir: str | os.PathLike) -> list[ScoreFile]:
    """Every score file under `output_dir/selection/`, in epoch order (empty if there are none)."""
    directory = Path(output_dir) / SCORE_DIR
    files = [read_score_file(path) for path in directory.glob(SCORE_FILE_PATTERN.format(epoch="*"))]
    return sorted(files, key=lambda file: (file.event.epoch, file.event.global_step))


@dataclass(frozen=True)
class ScoreEvent:
    """One score file: a selection event of a run, or an offline `trl-select score` pass.

    `label` names the event in column headers (`epoch_2`, or the file's stem for an offline file); `kept` is the
    event's keep-mask (all `True` for an offline file, whose rule is `none`).
    """

    label: str
    epoch: int
    kind: str
    pair_ids: list[Any]
    scores: dict[str, np.ndarray]
    kept: np.ndarray
    path: Path


def read_score_event(path: str | os.PathLike) -> ScoreEvent:
    """Read one score file (the layout of `reporting.write_score_file`) with pyarrow."""
    path = Path(path)
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None or "pair_id" not in table.column_names:
        raise ValueError(
            f"{path} is not a trl-select score file (no {METADATA_KEY.decode()!r} schema metadata or no pair_id "
            "column): pass a run's OUTPUT_DIR, its selection/ folder, or a file written by `trl-select score`."
        )
    metadata = json.loads(raw)
    if metadata.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has score-file format {metadata['format_version']}; this trl-select reads up to "
            f"{FORMAT_VERSION}. Upgrade trl-select."
        )
    kind = metadata.get("kind", "selection")
    epoch = int(metadata.get("epoch", 0))
    scores = {
        name: table[name].to_numpy(zero_copy_only=False).astype(np.float64)
        for name in table.column_names
        if name not in FIXED_COLUMNS
    }
    kept = (
        table["kept"].to_numpy(zero_copy_only=False).astype(bool)
        if "kept" in table.column_names
        else np.ones(table.num_rows, dtype=bool)
    )
    label = f"epoch_{epoch}" if kind in ("selection", "warmup") else path.stem
    return ScoreEvent(label, epoch, kind, table["pair_id"].to_pylist(), scores, kept, path)


__all__ = [
    "FIXED_COLUMNS",
    "FORMAT_VERSION",
    "HISTOGRAM_BINS",
    "MAX_SCATTER_POINTS",
    "METADATA_KEY",
    "SCORE_DIR",
    "SCORE_FILE_PATTERN",
    "ScoreEvent",
    "ScoreFile",
    "integer_histogram",
    "ordered_score_names",
    "read_score_event",
    "read_score_file",
    "read_score_files",
    "scatter_rows",
    "score_file_path",
    "score_histogram",
    "score_table",
    "write_score_file",
]
