"""Host work per selection event that grows with the pool, before and after vectorising it, side by side.

Builds a token-id-only pool of `--pairs` preference pairs (default 1M; random lengths shaped like real chat data, no
model, no tokenizer) as a `datasets.Dataset` in 1,000-row Arrow chunks (what TRL's tokenizing `map` writes), then
times on it:

- **loader build**: the scoring loader over the whole pool (rows tagged, length-sorted longest first, sharded).
  Before: the row-by-row `_TokenizedRows` / `length_sorted_rows` kept below as the reference implementation. After:
  `trl_select.scoring.build_pass_loader` as the engine calls it (one process).
- **row reads**: collating `--read_rows` rows in batches of 32 through the loader's dataset, as every scoring pass does.
- **pool fingerprint**: what a checkpoint records of the pool. Before: `pool_fingerprint_json` below (every token
  JSON-encoded). After: `trl_select.checkpoint.pool_fingerprint` (the Arrow values hashed).

The reference implementations are the package's code as it was before; both orders are checked equal. Results go to
`benchmarks/results/host_work.md` with the machine named.

    OMP_NUM_THREADS=1 python -m benchmarks.host_work            # 1M pairs, ~10 min on 2 cores (mostly the old code)
    OMP_NUM_THREADS=1 python -m benchmarks.host_work --pairs 100000 --output /tmp/host_work.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from trl_select.checkpoint import pool_fingerprint
from trl_select.scoring import ROW_KEY, TOKEN_COLUMNS, _TokenizedRows, build_pass_loader, length_sorted_rows

from .common import machine_description, markdown_table


logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "host_work.md"
CHUNK_ROWS = 1_000
VOCAB = 150_000


# ----- the reference implementations (the package's code before vectorising) -----


class OldTokenizedRows(torch.utils.data.Dataset):
    """`scoring._TokenizedRows` before: `dataset[name]` columns (lazy `datasets.Column`s), read a row at a time."""

    def __init__(self, dataset: Dataset) -> None:
        self.columns = {name: dataset[name] for name in TOKEN_COLUMNS}
        self.size = len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> dict[str, Any]:
        return {**{name: column[row] for name, column in self.columns.items()}, ROW_KEY: row}

    def total_length(self, row: int) -> int:
        return len(self.columns["prompt_ids"][row]) + max(
            len(self.columns["chosen_ids"][row]), len(self.columns["rejected_ids"][row])
        )


def old_length_sorted_rows(rows: OldTokenizedRows) -> list[int]:
    """`scoring.length_sorted_rows` before: a Python sort keyed by a row-by-row length lookup."""
    return sorted(range(len(rows)), key=lambda row: (-rows.total_length(row), row))


def pool_fingerprint_json(pair_ids: list[Any], dataset: Dataset) -> dict[str, Any]:
    """`checkpoint.pool_fingerprint` before: a SHA-256 over the JSON encoding of every token, 1,024 rows at a time."""
    digest = hashlib.sha256()
    digest.update(json.dumps(pair_ids, default=str).encode())
    columns = [name for name in TOKEN_COLUMNS if name in dataset.column_names]
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        digest.update(json.dumps([batch[name] for name in columns], default=str).encode())
    return {"num_pairs": len(pair_ids), "sha256": digest.hexdigest()}


# ----- the pool -----


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float, cap: int) -> np.ndarray:
    """Log-normal token counts, as chat prompts and completions have: many short, a long tail, cut at `cap`."""
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(np.int64)


def _list_column(rng: np.random.Generator, lengths: np.ndarray) -> pa.ChunkedArray:
    chunks = []
    for start in range(0, len(lengths), CHUNK_ROWS):
        part = lengths[start : start + CHUNK_ROWS]
        offsets = np.concatenate([[0], np.cumsum(part)]).astype(np.int32)
        values = rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.int64)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
    return pa.chunked_array(chunks, type=pa.list_(pa.int64()))


def build_pool(num_pairs: int, seed: int = 0) -> Dataset:
    """`num_pairs` pairs of token ids: prompt median 90 tokens, completions median 150, each capped at 1,024."""
    rng = np.random.default_rng(seed)
    columns = {
        "prompt_ids": _list_column(rng, _lengths(rng, num_pairs, 90, 0.9, 1024)),
        "chosen_ids": _list_column(rng, _lengths(rng, num_pairs, 150, 0.8, 1024)),
        "rejected_ids": _list_column(rng, _lengths(rng, num_pairs, 150, 0.8, 1024)),
    }
    return Dataset(pa.table(columns))


# ----- timing -----


def _timed(function, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _read_rows(dataset: torch.utils.data.Dataset, order: list[int], num_rows: int, batch_size: int = 32) -> int:
    """Fetch `num_rows` rows of `order` in batches as the `DataLoader` does (`__getitems__` where the dataset has it)."""
    fetched = 0
    for start in range(0, num_rows, batch_size):
        batch = order[start : start + batch_size]
        if hasattr(dataset, "__getitems__"):
            examples = dataset.__getitems__(batch)
        else:
            examples = [dataset[row] for row in batch]
        fetched += len(examples)
    return fetched


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--read_rows", type=int, default=20_000, help="rows collated for the row-read timing")
    parser.add_argument(
        "--old_full_pairs",
        type=int,
        default=50_000,
        help="pools up to this size run the old sort whole; larger ones time it on a sample (and compare orders on "
        "this many rows)",
    )
    parser.add_argument("--old_sample_rows", type=int, default=20_000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    machine = machine_description()

    pool, seconds = _timed(build_pool, args.pairs)
    tokens = sum(int(pa.compute.sum(pa.compute.list_value_length(pool.data.column(n))).as_py()) for n in TOKEN_COLUMNS)
    logger.info("Pool: %d pairs, %d tokens, built in %.1f s", args.pairs, tokens, seconds)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)

    _, new_build = _timed(build_pass_loader, pool, lambda examples: examples, accelerator, 32)
    logger.info("Loader build, after: %.2f s", new_build)
    old_rows = OldTokenizedRows(pool)
    if args.pairs <= args.old_full_pairs:
        old_order, old_build = _timed(old_length_sorted_rows, old_rows)
        old_build_note = "measured"
    else:
        # The old sort's cost is one row-by-row length lookup per row (the sort of the keys is a rounding error):
        # time it on a random sample of the pool's rows and scale to the pool; time the whole old sort on a prefix.
        sample = np.random.default_rng(1).choice(args.pairs, args.old_sample_rows, replace=False).tolist()
        _, sampled = _timed(lambda: [old_rows.total_length(row) for row in sample])
        old_build = sampled * args.pairs / args.old_sample_rows
        old_build_note = f"extrapolated from {args.old_sample_rows:,} random rows"
    logger.info("Loader build, before: %.1f s (%s)", old_build, old_build_note)
    new_order = length_sorted_rows(_TokenizedRows(pool))
    if args.pairs <= args.old_full_pairs:
        assert new_order == old_order, "the vectorised length sort differs from the reference"
    else:
        prefix = pool.select(range(args.old_full_pairs))
        assert length_sorted_rows(_TokenizedRows(prefix)) == old_length_sorted_rows(OldTokenizedRows(prefix)), (
            "the vectorised length sort differs from the reference"
        )

    read_rows = min(args.read_rows, args.pairs)
    _, new_read = _timed(_read_rows, _TokenizedRows(pool), new_order, read_rows)
    _, old_read = _timed(_read_rows, old_rows, new_order, read_rows)
    logger.info("Reading %d rows: before %.1f s, after %.2f s", read_rows, old_read, new_read)

    pair_ids = list(range(args.pairs))
    new_fingerprint, new_hash = _timed(pool_fingerprint, pair_ids, pool)
    logger.info("Fingerprint, after: %.2f s (%s)", new_hash, new_fingerprint["sha256"][:12])
    _, old_hash = _timed(pool_fingerprint_json, pair_ids, pool)
    logger.info("Fingerprint, before: %.1f s", old_hash)

    per_pair = lambda seconds: f"{seconds / args.pairs * 1e6:.1f} µs"  # noqa: E731
    per_row = lambda seconds: f"{seconds / read_rows * 1e6:.1f} µs"  # noqa: E731
    rows = [
        [f"loader build (length sort), whole pool (before: {old_build_note})", _seconds(old_build), _seconds(new_build), f"{old_build / new_build:.0f}×", per_pair(old_build), per_pair(new_build)],
        [f"row reads, {read_rows:,} rows in batches of 32", _seconds(old_read), _seconds(new_read), f"{old_read / new_read:.0f}×", per_row(old_read), per_row(new_read)],
        ["pool fingerprint, whole pool", _seconds(old_hash), _seconds(new_hash), f"{old_hash / new_hash:.0f}×", per_pair(old_hash), per_pair(new_hash)],
    ]  # fmt: skip
    table = markdown_table(
        ["host work", "before", "after", "speed-up", "before per pair/row", "after per pair/row"], rows
    )
    text = f"""# Per-event host work on a {args.pairs:,}-pair pool

`OMP_NUM_THREADS=1 python -m benchmarks.host_work --pairs {args.pairs}` (token ids only, no model: prompt median 90
tokens, completions median 150, log-normal, capped at 1,024; {tokens:,} tokens in 1,000-row Arrow chunks).
**Machine:** {machine}.

{table}

- *Loader build* runs on every rank whenever a scoring loader over the pool is built (the engine builds the whole-pool
  loader once per run, a subset's at every event with `scoring_reuse`); before, it read each row's three token lists
  through `datasets` to sort by length. The orders were checked identical (longest first, ties by row) on the first
  {min(args.pairs, args.old_full_pairs):,} pairs.
- *Row reads* are what every scoring pass pays to collate its batches: before, one `datasets` lookup per row and
  column; after, one Arrow gather per batch.
- *Pool fingerprint* runs once per run, on rank 0 inside the first checkpoint save while the other ranks wait.
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    logger.info("Wrote %s", args.output)


if __name__ == "__main__":
    main()
