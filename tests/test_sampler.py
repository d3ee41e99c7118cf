"""The selection batch sampler: disjoint, equal-shaped rank shards of the live selection, reproducible per epoch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils.data import DataLoader, RandomSampler

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.sampler import SelectionSampler, balanced_sizes
from trl_select.testing import build_tiny_llama
from trl_select.training_log_probs import POOL_ROWS_KEY

from .testing_utils import fast_config


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


# ----- `train_sampling_strategy`: the order of an epoch's selected pairs -----


def _ordered_ranks(order: str, pool_size: int, world_size: int, batch: int = 4, accumulation: int = 1, seed: int = 0):
    lengths = [(row * 7) % 23 + 1 for row in range(pool_size)]  # varied, deterministic lengths
    return [
        SelectionSampler(
            pool_size,
            max_batch_size=batch,
            seed=seed,
            world_size=world_size,
            rank=rank,
            order=order,
            lengths=lengths if order == "group_by_length" else None,
            accumulation=accumulation,
        )
        for rank in range(world_size)
    ], lengths


def _global_order(ranks) -> list[int]:
    """The rows of every step over all ranks, rank 0's slice first: the order one process would train."""
    return [row for step in zip(*(list(sampler) for sampler in ranks), strict=True) for batch in step for row in batch]


@pytest.mark.parametrize("world_size", [1, 3])
def test_sequential_trains_the_selection_in_pool_order_every_epoch(world_size):
    ranks, _ = _ordered_ranks("sequential", 40, world_size)
    kept = [1, 3, 4, 8, 9, 10, 15, 16, 22, 23, 30, 31, 33, 38]
    for epoch in (1, 2):
        for sampler in ranks:
            sampler.set_selection(reversed(kept))
            sampler.set_epoch(epoch)
        cut = len(kept) - len(kept) % world_size
        assert _global_order(ranks) == kept[:cut]  # pool order, the same every epoch
        assert all(sampler.trimmed_rows() == kept[cut:] for sampler in ranks)  # always the last kept rows
        shards = [list(sampler) for sampler in ranks]
        assert len({tuple(map(len, shard)) for shard in shards}) == 1  # equal shapes on every rank
    assert ranks[0].pass_order(5).tolist() == list(range(40))


@pytest.mark.parametrize("world_size, accumulation", [(1, 1), (2, 2)])
def test_group_by_length_orders_the_selection_as_transformers_length_grouped_sampler(world_size, accumulation):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    ranks, lengths = _ordered_ranks("group_by_length", 400, world_size, batch=4, accumulation=accumulation)
    kept = list(range(0, 400, 2))
    for sampler in ranks:
        sampler.set_selection(kept)
        sampler.set_epoch(3)
    # transformers' order over the kept pairs' lengths, megabatches of one optimizer step's pairs over all ranks
    generator = torch.Generator().manual_seed(0 + 3)
    step_rows = 4 * accumulation * world_size
    expected = [
        kept[i] for i in get_length_grouped_indices([lengths[r] for r in kept], step_rows, generator=generator)
    ]
    cut = len(kept) - len(kept) % world_size
    assert _global_order(ranks) == expected[:cut]
    assert sorted(expected) == kept  # the kept set, nothing else
    # megabatches sorted by decreasing length (the first one starts with the longest pair of all)
    megabatch = min(len(kept) // (step_rows * 4), 50) * step_rows
    for start in range(0, len(expected), megabatch):
        chunk = [lengths[row] for row in expected[start : start + megabatch]]
        assert chunk[1:] == sorted(chunk[1:], reverse=True)
    assert lengths[expected[0]] == max(lengths[row] for row in kept)
    # another epoch, another grouping; the pass order of the in-epoch strategy is the same function of the pool
    other = ranks[0].ordered(torch.as_tensor(kept), 4).tolist()
    assert sorted(other) == kept and other != expected
    full = list(get_length_grouped_indices(lengths, step_rows, generator=torch.Generator().manual_seed(7)))
    assert ranks[0].pass_order(7).tolist() == full


@pytest.mark.parametrize("order", ["random", "sequential", "group_by_length"])
def test_a_resumed_sampler_gives_the_same_batches(order):
    """A resume rebuilds the sampler and restores the selection and the epoch (`restore_selection_state`), or the
    segment with the micro-batches already trained: the batches that follow are the uninterrupted run's."""
    kept = list(range(3, 90, 2))
    (first, *_), _ = _ordered_ranks(order, 90, 1, batch=4, accumulation=2)
    first.set_selection(kept)
    first.set_epoch(2)
    (resumed, *_), _ = _ordered_ranks(order, 90, 1, batch=4, accumulation=2)
    resumed.set_selection(kept)
    resumed.set_epoch(2)
    assert list(resumed) == list(first)
    segment = first.pass_order(1)[:24].tolist()
    first.set_segment(segment, accumulation=2)
    resumed.set_segment(resumed.pass_order(1)[:24].tolist(), accumulation=2, skip_batches=2)
    assert list(resumed) == list(first)[2:]


def test_order_errors_name_the_problem():
    with pytest.raises(ValueError, match="order must be one of"):
        SelectionSampler(10, max_batch_size=2, seed=0, order="batch_rebalance")
    with pytest.raises(ValueError, match="one length per pool row"):
        SelectionSampler(10, max_batch_size=2, seed=0, order="group_by_length", lengths=[1, 2])


# ----- the orders in real runs -----


class _RowsTrainer(SelectiveDPOTrainer):
    """Records the pool rows of every training micro-batch, with the optimizer step it belongs to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_seen: list[tuple[int, list[int]]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training and POOL_ROWS_KEY in inputs:
            self.rows_seen.append((self.state.global_step + 1, inputs[POOL_ROWS_KEY].tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _run(output_dir, tokenizer, pool, validation, events=None, resume=None, **overrides):
    model = build_tiny_llama(tokenizer, seed=0)
    settings = {"num_train_epochs": 3, "per_device_train_batch_size": 16, "selection_rule": "irm_band", **overrides}
    args = fast_config(output_dir, **settings)
    trainer = _RowsTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        selection_reporters=[lambda event, *_: events.append(event)] if events is not None else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture
def pool64(reverse_rows):
    return Dataset.from_list(reverse_rows["train"][:64])


@pytest.mark.parametrize("order", ["sequential", "group_by_length"])
def test_epochs_train_the_selection_in_the_configured_order(tmp_path, tokenizer, pool64, validation, order):
    events = []
    trainer = _run(tmp_path, tokenizer, pool64, validation, events, train_sampling_strategy=order)
    sampler = trainer.selection_sampler
    epoch_of_step = {}
    for event in events:
        epoch_of_step[event.global_step + 1] = event.epoch
    epochs: dict[int, list[int]] = {}
    epoch = 0
    for step, rows in trainer.rows_seen:
        epoch = epoch_of_step.get(step, epoch)
        epochs.setdefault(epoch, []).extend(rows)
    assert set(epochs) == {0, 1, 2}
    for event in events:
        kept = torch.as_tensor(np.flatnonzero(event.keep))
        assert epochs[event.epoch] == sampler.ordered(kept, event.epoch).tolist()
        if order == "sequential":
            assert epochs[event.epoch] == sorted(epochs[event.epoch])


def test_in_epoch_events_walk_the_pass_in_pool_order(tmp_path, tokenizer, pool64, validation):
    events = []
    trainer = _run(
        tmp_path,
        tokenizer,
        pool64,
        validation,
        events,
        train_sampling_strategy="sequential",
        num_train_epochs=1,
        selection_strategy="steps",
        selection_warmup_steps=1,
        selection_steps=1,
        per_device_train_batch_size=8,
    )
    trained = [row for _, rows in trainer.rows_seen for row in rows]
    assert trained == sorted(trained) and len(trained) < 64  # pool order; the events dropped some pairs
    selections = [event for event in events if event.kind == "selection"]
    assert selections
    for event in selections:  # each chunk is the next pairs of the pool not yet trained or dropped
        assert event.rows.tolist() == sorted(event.rows.tolist())


def test_a_resumed_sequential_run_trains_the_same_rows(tmp_path, tokenizer, pool64, validation):
    first = _run(
        tmp_path / "first",
        tokenizer,
        pool64,
        validation,
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=1,
    )
    history = read_history(tmp_path / "first")
    step = history[1]["global_step"] + 1  # inside the first selected epoch
    resumed = _run(
        tmp_path / "resumed",
        tokenizer,
        pool64,
        validation,
        train_sampling_strategy="sequential",
        resume=str(tmp_path / "first" / f"checkpoint-{step}"),
    )
    assert resumed.rows_seen == [entry for entry in first.rows_seen if entry[0] > step]
