"""In-epoch selection (`selection_strategy="steps"`): the arithmetic of passes, events and segments.

A **pass** is one walk over the pool in a fixed random order (seeded by `seed + pass index`); the Trainer's epochs are
the passes. Within a pass every pair is either trained once or dropped once, never both and never twice. The pass is
cut into **segments**, each a whole number of optimizer steps:

- a *warm-up* segment trains the next pairs of the order as they come (until `selection_warmup_steps`);
- after the warm-up, an *event* at the segment's first step scores a **chunk**, the next pairs of the pass that are
  neither trained nor dropped yet, with the current policy, and applies the rule to the chunk alone. Its kept pairs,
  in pass order, fill the segment until the next scheduled event (`selection_steps`); its dropped pairs are done for
  this pass; kept pairs the segment has no room for go back to the pass and are scored again at the next event.

The chunk is sized so that the rule's expected kept fraction fills the segment (`chunk_size`). If the rule keeps
fewer, the segment is shorter and the next event comes early; when the pass has no pairs left, the epoch ends and the
next pass begins. So an event scores about `1 / kept fraction` pairs per pair trained, whatever the pool size: the
cost of a pass's events is one scoring pass over the pool, not one per event.

Everything here is pure (NumPy / integers); `callback.py` runs the events and `sampler.py` shards the segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


# How many more candidates than the expected kept fraction needs an event scores: a shortfall ends the segment early
# and costs an extra event (an aux alignment), a surplus is scored again at the next event.
CHUNK_MARGIN = 1.1
# Below this kept-fraction estimate a chunk would be most of the pass anyway; it bounds the chunk for degenerate priors.
MIN_KEEP_ESTIMATE = 0.05


def resolve_steps(value: float, horizon: int) -> int:
    """`value` optimizer steps: an int >= 1 as is, a float in (0, 1) as `ceil(value * horizon)` (as transformers
    resolves a fractional `eval_steps` against the run's `max_steps`)."""
    if 0 < value < 1:
        return max(1, math.ceil(value * horizon))
    return int(value)


def next_event_step(step: int, warmup_steps: int, interval: int) -> int:
    """The first scheduled event strictly after optimizer step `step`: `warmup_steps + k * interval`, k >= 0."""
    if step < warmup_steps:
        return warmup_steps
    return warmup_steps + ((step - warmup_steps) // interval + 1) * interval


def expected_keep_fraction(bands: dict[str, tuple[float, float]], fraction: float | None) -> float:
    """A prior for the kept fraction of a rule: `fraction` for a fraction rule, else the product of its percentile
    bands' widths (independent scores), else 1/2."""
    if fraction is not None:
        return fraction
    if bands:
        return math.prod((hi - lo) / 100 for lo, hi in bands.values())
    return 0.5


def chunk_size(needed: int, keep_estimate: float, available: int) -> int:
    """Candidates an event scores to keep about `needed` pairs at kept fraction `keep_estimate` (at most
    `available`)."""
    return min(available, math.ceil(CHUNK_MARGIN * needed / max(keep_estimate, MIN_KEEP_ESTIMATE)))


def split_kept(chunk: Sequence[int], keep: np.ndarray, needed: int) -> tuple[list[int], list[int], list[int]]:
    """`(segment, surplus, dropped)` of an event's `chunk` (pass order) and the rule's `keep` mask over it.

    The segment is the first `needed` kept pairs, the surplus the kept pairs after them (they go back to the pass),
    the dropped pairs are done for this pass.
    """
    chunk = np.asarray(chunk, dtype=np.int64)
    kept = chunk[keep]
    return kept[:needed].tolist(), kept[needed:].tolist(), chunk[~keep].tolist()


def whole_step_batch_sizes(rows_per_rank: int, max_batch_size: int, accumulation: int) -> list[int]:
    """Micro-batch sizes for `rows_per_rank` rows in whole optimizer steps (a multiple of `accumulation` batches).

    As few batches as fit `max_batch_size`, rounded up to whole steps, with balanced sizes; if there are fewer rows than
    that many batches, only the whole steps the rows fill (at most `max_batch_size` each) are kept and the rest of the
    rows is left out.
    """
    if rows_per_rank <= 0:
        return []
    num_batches = math.ceil(math.ceil(rows_per_rank / max_batch_size) / accumulation) * accumulation
    if num_batches > rows_per_rank:
        num_batches = (rows_per_rank // accumulation) * accumulation
        rows_per_rank = min(rows_per_rank, num_batches * max_batch_size)
    if num_batches == 0:
        return []
    return [rows_per_rank // num_batches + (1 if i < rows_per_rank % num_batches else 0) for i in range(num_batches)]


def estimated_steps(num_pairs: float, keep_fraction: float, pairs_per_step: int) -> int:
    """Optimizer steps to train the kept share of `num_pairs` candidates, `pairs_per_step` pairs a step."""
    return math.ceil(num_pairs * keep_fraction / pairs_per_step)


__all__ = [
    "chunk_size",
    "estimated_steps",
    "expected_keep_fraction",
    "next_event_step",
    "resolve_steps",
    "split_kept",
    "whole_step_batch_sizes",
]
