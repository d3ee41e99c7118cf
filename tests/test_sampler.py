"""The selection batch sampler: disjoint, equal-shaped rank shards of the live selection, reproducible per epoch."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, RandomSampler

from trl_select.sampler import SelectionSampler, balanced_sizes


def _ranks(pool_size: int, world_size: int, batch: int = 4, seed: int = 0):
    return [
        SelectionSampler(pool_size, max_batch_size=batch, seed=seed, world_size=world_size, rank=rank)
        for rank in range(world_size)
    ]


def test_balanced_sizes():
    assert balanced_sizes(10, 3) == [4, 3, 3]
    assert balanced_sizes(9, 3) == [3, 3, 3]
    assert sum(balanced_sizes(41, 3)) == 41


def test_one_rank_iterates_a_permutation_of_the_selection_in_balanced_batches():
    (sampler,) = _ranks(50, world_size=1, batch=16)
    batches = list(sampler)
    assert [len(b) for b in batches] == [13, 13, 12, 12] and len(sampler) == 4
    assert sorted(sum(batches, [])) == list(range(50))
    sampler.set_selection([40, 2, 7, 7, 19])
    assert len(sampler) == 1 and sorted(next(iter(sampler))) == [2, 7, 19, 40]


@pytest.mark.parametrize("pool_size, world_size, batch", [(100, 2, 16), (37, 3, 4), (8, 8, 2), (65, 4, 64)])
def test_ranks_are_disjoint_equal_shaped_and_cover_the_selection(pool_size, world_size, batch):
    ranks = _ranks(pool_size, world_size, batch)
    for sampler in ranks:
        sampler.set_selection(range(0, pool_size))
        sampler.set_epoch(3)
    shards = [list(sampler) for sampler in ranks]
    assert len({len(shard) for shard in shards}) == 1  # same number of batches on every rank
    for step in zip(*shards, strict=True):
        assert len({len(batch_) for batch_ in step}) == 1  # same batch size on every rank, step by step
        assert all(0 < len(batch_) <= batch for batch_ in step)
    trained = [row for shard in shards for batch_ in shard for row in batch_]
    assert len(trained) == len(set(trained))  # disjoint
    trimmed = ranks[0].trimmed_rows()
    assert len(trimmed) == pool_size % world_size
    assert sorted(trained + trimmed) == list(range(pool_size))  # the union is the selection
    assert all(sampler.trimmed_rows() == trimmed for sampler in ranks)


def test_order_depends_on_seed_plus_epoch_only():
    a, b = _ranks(100, 1)[0], _ranks(100, 1)[0]
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    c = SelectionSampler(100, max_batch_size=4, seed=1)
    c.set_epoch(1)
    assert list(c) == list(a)  # seed 1 + epoch 1 == seed 0 + epoch 2, by design


def test_selection_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        SelectionSampler(0, max_batch_size=2, seed=0)
    sampler = SelectionSampler(10, max_batch_size=2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="at least one pair per rank"):
        sampler.set_selection([3])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        sampler.set_selection([3, 10])


def test_accelerate_keeps_it_as_a_live_batch_sampler():
    sampler = SelectionSampler(30, max_batch_size=4, seed=0)
    assert not isinstance(sampler, RandomSampler)  # accelerate would swap a RandomSampler for its own
    loader = prepare_data_loader(
        DataLoader(list(range(30)), batch_sampler=sampler), num_processes=1, process_index=0, put_on_device=False
    )
    assert len(loader) == 8
    sampler.set_selection(range(0, 30, 3))  # 10 rows -> 3 batches, seen by the already-built loader
    assert len(loader) == 3
    seen = torch.cat(list(loader)).tolist()
    assert sorted(seen) == list(range(0, 30, 3))
