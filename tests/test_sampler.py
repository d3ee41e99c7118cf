"""The selection sampler: permutations of the live selection, reproducible per epoch, kept by accelerate."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, RandomSampler

from trl_select.sampler import SelectionSampler


def test_iterates_a_permutation_of_the_selection():
    sampler = SelectionSampler(pool_size=50, seed=3)
    assert sorted(sampler) == list(range(50))
    sampler.set_selection([40, 2, 7, 7, 19])
    assert len(sampler) == 4
    assert sorted(sampler) == [2, 7, 19, 40]


def test_order_depends_on_seed_plus_epoch_only():
    a, b = SelectionSampler(100, seed=1), SelectionSampler(100, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)  # two ranks with the same seed agree
    b.set_epoch(3)
    assert list(a) != list(b)
    c = SelectionSampler(100, seed=0)
    c.set_epoch(3)
    assert list(c) == list(a)  # seed 1 + epoch 2 == seed 0 + epoch 3, by design


def test_selection_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        SelectionSampler(0, seed=0)
    sampler = SelectionSampler(10, seed=0)
    with pytest.raises(ValueError, match="at least one pair"):
        sampler.set_selection([])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        sampler.set_selection([3, 10])


def test_accelerate_keeps_the_sampler_and_its_live_length():
    sampler = SelectionSampler(30, seed=0)
    assert not isinstance(sampler, RandomSampler)  # accelerate would swap a RandomSampler for its own
    loader = prepare_data_loader(
        DataLoader(list(range(30)), batch_size=4, sampler=sampler),
        num_processes=1,
        process_index=0,
        put_on_device=False,
    )
    assert len(loader) == 8
    sampler.set_selection(range(0, 30, 3))  # 10 rows -> 3 batches, seen by the already-built loader
    assert len(loader) == 3
    loader.set_epoch(5)
    assert sampler.epoch == 5
    seen = torch.cat(list(loader)).tolist()
    assert sorted(seen) == list(range(0, 30, 3))
