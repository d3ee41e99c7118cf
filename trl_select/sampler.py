"""The training sampler whose index list the selection replaces between epochs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class SelectionSampler(Sampler[int]):
    """Yields a fresh permutation of the currently selected pool rows each epoch.

    The permutation is drawn from a generator seeded with `seed + epoch`, so every rank that holds the same selection
    iterates it in the same order; accelerate's batch sharding then hands each rank its own batches. `__len__` is
    live: it is the size of the current selection, so a dataloader built once sees every new selection's length.

    This deliberately does not subclass `RandomSampler`: accelerate swaps `RandomSampler` instances for its own
    seedable sampler when preparing a dataloader, which would drop the index list.

    Args:
        pool_size: Number of rows in the training pool; the initial selection is all of them.
        seed: Base seed of the per-epoch permutations.
    """

    def __init__(self, pool_size: int, seed: int) -> None:
        if pool_size < 1:
            raise ValueError(f"The training pool is empty (pool_size={pool_size}); selection needs at least one pair.")
        self.pool_size = pool_size
        self.seed = seed
        self.epoch = 0
        self._indices = torch.arange(pool_size)

    @property
    def indices(self) -> list[int]:
        """The pool rows of the current selection, in ascending order."""
        return self._indices.tolist()

    def set_selection(self, indices: Sequence[int]) -> None:
        """Replace the selection; takes effect at the next `iter()`."""
        selection = torch.as_tensor(sorted({int(i) for i in indices}), dtype=torch.long)
        if selection.numel() == 0:
            raise ValueError("A selection must keep at least one pair.")
        if selection[0] < 0 or selection[-1] >= self.pool_size:
            raise IndexError(f"Selected rows must lie in [0, {self.pool_size}), got {selection[0]}..{selection[-1]}.")
        self._indices = selection

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's dataloader at the start of each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._indices), generator=generator)
        yield from self._indices[order].tolist()

    def __len__(self) -> int:
        return len(self._indices)
