"""The training batch sampler whose pool rows the selection replaces between epochs, sharded over ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler, get_length_grouped_indices

from .segments import whole_step_batch_sizes


# `train_sampling_strategy` values the sampler orders an epoch by (`SelectionSampler.ordered`).
ORDERS = ("random", "sequential", "group_by_length")


def balanced_sizes(total: int, num_chunks: int) -> list[int]:
    """Split `total` items into `num_chunks` chunks whose sizes differ by at most one, larger chunks first."""
    return [total // num_chunks + (1 if i < total % num_chunks else 0) for i in range(num_chunks)]


def num_rank_batches(num_rows: int, world_size: int, max_batch_size: int) -> int:
    """Batches each rank runs over `num_rows` rows sharded by `shard_batches`."""
    return -(-(num_rows // world_size) // max_batch_size)  # ceil


def shard_batches(
    order: torch.Tensor, world_size: int, rank: int, max_batch_size: int, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """`rank`'s batches over the rows in `order`, for data-parallel training where every step must match on all ranks.

    `order` is cut to a multiple of `world_size` (the tail, fewer than `world_size` rows, is left out). Step `j` takes
    the next `world_size * size_j` rows and gives each rank a contiguous `size_j` of them; the sizes are balanced and
    at most `max_batch_size`. So every rank gets the same number of batches with the same sizes, the ranks' rows are
    disjoint, and a step's rows across ranks are those one process with `world_size` times the batch size would take.
    `sizes` overrides the per-rank batch sizes (e.g. `segments.whole_step_batch_sizes`); rows past them are left out.
    """
    rows_per_rank = len(order) // world_size
    if sizes is None:
        sizes = balanced_sizes(rows_per_rank, num_rank_batches(len(order), world_size, max_batch_size))
    batches, start = [], 0
    for size in sizes:
        step_rows = order[start : start + size * world_size]
        batches.append(step_rows[rank * size : (rank + 1) * size].tolist())
        start += size * world_size
    return batches


class SelectionSampler(BatchRebalanceSampler):
    """Yields this rank's batches of the current selection, reshuffled every epoch.

    Each epoch, the selected pool rows are ordered identically on every rank (`ordered`): permuted with a generator
    seeded by `seed + epoch` (`order="random"`, the default), in pool order (`"sequential"`), or permuted and then
    grouped by length as transformers' `LengthGroupedSampler` does (`"group_by_length"`). The order is cut to a multiple of the world size (the at most `world_size - 1` rows cut are
    `trimmed_rows()`, a different few each epoch), and each micro-step hands every rank an equal, contiguous slice of
    the next rows (balanced sizes, at most `max_batch_size`; see `shard_batches`). So every rank runs the same
    number of batches with the same sizes (DDP and ZeRO collectives never wait on a missing batch, and TRL's per-pair
    metric gathers see equal shapes), the ranks' rows are disjoint, and their union is the selection minus the
    trimmed rows.

    It subclasses `BatchRebalanceSampler` only so that the HF Trainer treats it as a rank-aware batch sampler: it
    passes it as the dataloader's `batch_sampler` and keeps accelerate from sharding it a second time. None of the
    parent's logic is used. `len()` is live, so the dataloader built once sees every new selection's length.

    Args:
        pool_size (`int`):
            Number of rows in the training pool; the initial selection is all of them.
        max_batch_size (`int`):
            Largest batch a rank gets (`per_device_train_batch_size`). The trainer sets it again to its live batch
            size each time it builds the training dataloader (`auto_find_batch_size` lowers it).
        seed (`int`):
            Base seed of the per-epoch permutations.
        world_size (`int`, *optional*, defaults to `1`):
            Number of data-parallel ranks.
        rank (`int`, *optional*, defaults to `0`):
            This rank.
        order (`str`, *optional*, defaults to `"random"`):
            How an epoch orders its rows: `"random"`, `"sequential"` or `"group_by_length"` (`train_sampling_strategy`).
        lengths (`Sequence[int]`, *optional*):
            Each pool row's length, required by `order="group_by_length"`.
        accumulation (`int`, *optional*, defaults to `1`):
            Micro-batches per optimizer step: `"group_by_length"` groups the rows of one optimizer step over all ranks
            (`max_batch_size * accumulation * world_size`), as transformers groups `train_batch_size *
            gradient_accumulation_steps`.
    """

    def __init__(
        self,
        pool_size: int,
        *,
        max_batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        order: str = "random",
        lengths: Sequence[int] | None = None,
        accumulation: int = 1,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"The training pool is empty (pool_size={pool_size}); selection needs at least one pair.")
        if pool_size < world_size:
            raise ValueError(f"The training pool has {pool_size} pairs, fewer than the {world_size} ranks.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}.")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}.")
        if order == "group_by_length" and (lengths is None or len(lengths) != pool_size):
            raise ValueError(f"order='group_by_length' needs one length per pool row ({pool_size}).")
        self.order = order
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.accumulation = accumulation
        self.pool_size = pool_size
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self._rows = torch.arange(pool_size)
        # In-epoch selection (`selection_strategy="steps"`): the current segment's rows in training order, in whole
        # optimizer steps of `accumulation` micro-batches, and how many of its micro-batches were already trained.
        self._segment: torch.Tensor | None = None
        self._segment_accumulation = 1
        self._segment_skip = 0

    @property
    def rows(self) -> list[int]:
        """The pool rows of the current selection, in ascending order."""
        return self._rows.tolist()

    @property
    def epoch_size(self) -> int:
        """Pairs an epoch trains over all ranks: the selection less the `trimmed_rows()`."""
        return len(self._rows) - len(self._rows) % self.world_size

    def set_selection(self, rows: Sequence[int]) -> None:
        """Replace the selection; takes effect at the next `iter()`."""
        selection = torch.as_tensor(sorted({int(row) for row in rows}), dtype=torch.long)
        if selection.numel() < self.world_size:
            raise ValueError(
                f"A selection must keep at least one pair per rank ({self.world_size}), got {selection.numel()}."
            )
        if selection[0] < 0 or selection[-1] >= self.pool_size:
            raise IndexError(f"Selected rows must lie in [0, {self.pool_size}), got {selection[0]}..{selection[-1]}.")
        self._rows = selection

    def set_segment(self, order: Sequence[int], accumulation: int, skip_batches: int = 0) -> list[int]:
        """Train `order` (pool rows, over all ranks, in this order) next, in whole optimizer steps; return the rows
        that will be trained (the others, fewer than one step's worth, are left out). `skip_batches` micro-batches of
        it were trained already (a resume). Until `end_segments`, `iter()` yields this segment's batches only."""
        self._segment = torch.as_tensor(list(order), dtype=torch.long)
        self._segment_accumulation = accumulation
        self._segment_skip = skip_batches
        return self._segment[: self.segment_size].tolist()

    def end_segments(self) -> None:
        """Back to whole-epoch iteration over the selection (`set_selection`)."""
        self._segment = None
        self._segment_skip = 0

    @property
    def segment_rows(self) -> list[int]:
        """The current segment's rows in training order (over all ranks)."""
        return [] if self._segment is None else self._segment.tolist()

    def _segment_sizes(self) -> list[int]:
        return whole_step_batch_sizes(
            len(self._segment) // self.world_size, self.max_batch_size, self._segment_accumulation
        )

    @property
    def segment_size(self) -> int:
        """Rows the current segment trains over all ranks."""
        return sum(self._segment_sizes()) * self.world_size if self._segment is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch."""
        self.epoch = epoch

    def ordered(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """`rows` (pool rows, ascending) in epoch `epoch`'s training order over all ranks, the same on every rank.

        `"random"`: permuted by a generator seeded with `seed + epoch`. `"sequential"`: as given, in pool order, every
        epoch. `"group_by_length"`: permuted the same way, cut into megabatches of up to 50 optimizer steps' rows, each
        sorted by decreasing length, the longest row first (transformers' `get_length_grouped_indices`).
        """
        if self.order == "sequential":
            return rows
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.order == "group_by_length":
            step_rows = self.max_batch_size * self.accumulation * self.world_size
            indices = get_length_grouped_indices(self.lengths[rows.numpy()].tolist(), step_rows, generator=generator)
            return rows[torch.as_tensor(indices, dtype=torch.long)]
        return rows[torch.randperm(len(rows), generator=generator)]

    def pass_order(self, pass_index: int) -> np.ndarray:
        """The order of the whole pool in pass `pass_index` of the in-epoch strategy (`segments.py`)."""
        return self.ordered(torch.arange(self.pool_size), pass_index).numpy()

    def _epoch_order(self) -> torch.Tensor:
        return self.ordered(self._rows, self.epoch)

    def trimmed_rows(self) -> list[int]:
        """The selected rows this epoch leaves out so that every rank gets as many rows as the others."""
        order = self._epoch_order()
        return order[len(order) - len(order) % self.world_size :].tolist()

    def trained_rows(self, num_batches: int) -> list[int]:
        """The rows, over all ranks, of this epoch's (or segment's) first `num_batches` micro-batches (for compute
        accounting)."""
        sizes = [len(batch) for batch in self.rank_batches(0)[: max(0, num_batches)]]
        order = self._segment if self._segment is not None else self._epoch_order()
        return order[: sum(sizes) * self.world_size].tolist()

    def rank_batches(self, rank: int | None = None) -> list[list[int]]:
        """The batches `rank` (default: this one) trains on this epoch (see `shard_batches`)."""
        rank = self.rank if rank is None else rank
        if self._segment is not None:
            return shard_batches(self._segment, self.world_size, rank, self.max_batch_size, self._segment_sizes())
        return shard_batches(self._epoch_order(), self.world_size, rank, self.max_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        if self._segment is not None:
            batches, self._segment_skip = batches[self._segment_skip :], 0
        yield from batches

    def __len__(self) -> int:
        if self._segment is not None:
            return len(self._segment_sizes())
        return num_rank_batches(len(self._rows), self.world_size, self.max_batch_size)


class SegmentedLoader:
    """An epoch of in-epoch selection (`selection_strategy="steps"`) as one iterable of training batches.

    It iterates `loader` (whose sampler holds the current segment) once per segment, and between two segments calls
    `next_segment()`, which runs the selection event, sets the sampler's next segment and returns `False` once the
    pass has no pairs left; then `on_exhausted()` ends the epoch. The event thus runs when the Trainer asks for the
    first batch of the next optimizer step, after the previous step's optimizer update, logging and checkpoint, and
    before any batch of the new segment exists: accelerate's one-batch look-ahead stays inside a segment.
    Everything else (`set_epoch`, `batch_sampler`, ...) is `loader`'s.
    """

    def __init__(self, loader, next_segment, on_exhausted) -> None:
        self.loader = loader
        self.next_segment = next_segment
        self.on_exhausted = on_exhausted
        self.num_yielded = 0

    def __iter__(self) -> Iterator:
        while True:
            for batch in self.loader:
                self.num_yielded += 1
                yield batch
            if not self.next_segment():
                self.on_exhausted()
                return

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
