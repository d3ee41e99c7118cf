"""Host work per selection event that grows with the pool: the scoring loader's length sort and row reads, the pool
fingerprint of checkpoints, and the batch size of a pass over a few rows. Timings: benchmarks/host_work.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset

import trl_select.checkpoint as checkpoint
from trl_select.checkpoint import SelectionState, check_resumable, pool_fingerprint
from trl_select.scoring import (
    ROW_KEY,
    TOKEN_COLUMNS,
    _TokenizedRows,
    build_pass_loader,
    length_sorted_rows,
    pass_batch_size,
)


def _token_pool(num_rows: int, seed: int = 0, max_len: int = 6) -> Dataset:
    rng = np.random.default_rng(seed)
    columns = {
        name: [rng.integers(0, 1000, rng.integers(0, max_len)).tolist() for _ in range(num_rows)]
        for name in TOKEN_COLUMNS
    }
    return Dataset.from_dict({"id": list(range(num_rows)), **columns})


def _count_row_lookups(monkeypatch) -> list[object]:
    """Every `Dataset.__getitem__` with one row index (what reading a pool row by row costs, ~100 µs each)."""
    lookups: list[object] = []
    getitem = Dataset.__getitem__

    def counting(self, key):
        if isinstance(key, (int, np.integer)):
            lookups.append(key)
        return getitem(self, key)

    monkeypatch.setattr(Dataset, "__getitem__", counting)
    return lookups


@pytest.mark.parametrize("subset", [False, True], ids=["table", "indices-mapping"])
def test_length_sort_is_the_row_by_row_order_without_reading_rows(monkeypatch, subset):
    """Longest padded pair first, ties by row (many ties: lengths 0-5), also through a `select` indices mapping."""
    dataset = _token_pool(3000)
    if subset:
        dataset = dataset.select(np.random.default_rng(1).permutation(3000)[:1100].tolist())
    rows = [dataset[i] for i in range(len(dataset))]
    expected = sorted(
        range(len(rows)),
        key=lambda i: (
            -(len(rows[i]["prompt_ids"]) + max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"]))),
            i,
        ),
    )
    lookups = _count_row_lookups(monkeypatch)
    assert length_sorted_rows(_TokenizedRows(dataset)) == expected
    assert lookups == []  # the old sort read every row, one `datasets` lookup per row and column (~256 µs a row)


def test_pass_loader_reads_a_batch_in_one_gather(monkeypatch):
    dataset = _token_pool(200).select(list(range(199, -1, -2)))  # an indices mapping, reversed
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    lookups = _count_row_lookups(monkeypatch)
    loader = build_pass_loader(dataset, lambda examples: {"examples": examples}, accelerator, 16)
    seen = {}
    for batch in loader:
        for example, row in zip(batch["examples"], batch[ROW_KEY].tolist(), strict=True):
            seen[row] = example
    assert lookups == []  # was 3 per row (one per token column)
    assert sorted(seen) == list(range(100))
    for row in (0, 37, 99):
        assert seen[row] == {name: dataset[row][name] for name in TOKEN_COLUMNS}


def test_pass_batch_size_shrinks_to_the_rows_per_rank():
    assert pass_batch_size(1_000_000, 8, 32) == 32
    assert pass_batch_size(5, 2, 32) == 3
    assert pass_batch_size(1, 256, 32) == 1
    assert pass_batch_size(0, 4, 32) == 1
    assert pass_batch_size(64, 2, 32) == 32


@pytest.mark.parametrize("num_rows", [1, 5, 13])
def test_a_pass_over_a_few_rows_pads_no_rank_to_a_full_batch(num_rows):
    """Two ranks, `scoring_batch_size` 32: each rank forwards at most ceil(rows / 2) rows (was 32 each), all rows seen."""
    dataset = _token_pool(num_rows)
    per_rank = []
    for rank in range(2):
        accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=rank)
        loader = build_pass_loader(dataset, lambda examples: {"n": len(examples)}, accelerator, 32)
        per_rank.append([batch[ROW_KEY].tolist() for batch in loader])
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: a ZeRO-3 forward is a collective
    assert all(len(batch) <= -(-num_rows // 2) for batches in per_rank for batch in batches)
    assert {row for batches in per_rank for batch in batches for row in batch} == set(range(num_rows))


# ----- the pool fingerprint -----


def _with_token(dataset: Dataset, row: int, column: str, position: int, value: int) -> Dataset:
    def change(example, index):
        if index == row:
            tokens = list(example[column])
            tokens[position] = value
            return {column: tokens}
        return {}

    return dataset.map(change, with_indices=True)


def test_fingerprint_changes_when_any_token_changes():
    dataset = _token_pool(300, max_len=8).map(lambda e: {n: e[n] + [7] for n in TOKEN_COLUMNS})  # no empty lists
    ids = list(range(300))
    base = pool_fingerprint(ids, dataset)
    seen = {base["sha256"]}
    for row, column in [(0, "prompt_ids"), (150, "chosen_ids"), (299, "rejected_ids")]:
        changed = pool_fingerprint(ids, _with_token(dataset, row, column, -1, 8))
        assert changed["sha256"] not in seen
        seen.add(changed["sha256"])
    # The same tokens with a row boundary moved (the last token of row 0's prompt becomes row 1's first)
    prompts = dataset["prompt_ids"][:]
    moved = [list(p) for p in prompts]
    moved[1] = [moved[0].pop()] + moved[1]
    assert (
        pool_fingerprint(ids, dataset.remove_columns("prompt_ids").add_column("prompt_ids", moved))["sha256"]
        not in seen
    )
    # Another id, or the rows in another order
    assert pool_fingerprint([*ids[:-1], "x"], dataset)["sha256"] not in seen
    assert pool_fingerprint(ids, dataset.select(list(range(299, -1, -1))))["sha256"] not in seen


def test_fingerprint_depends_on_the_contents_only():
    """Chunking, int32 storage and an indices mapping do not change it; the scheme is recorded."""
    dataset = _token_pool(500)
    ids = list(range(500))
    base = pool_fingerprint(ids, dataset)
    assert base["scheme"] == checkpoint.POOL_FINGERPRINT_SCHEME and base["num_pairs"] == 500
    rechunked = Dataset(pa.concat_tables([dataset.data.table.slice(s, 37) for s in range(0, 500, 37)]))
    assert len(rechunked.data.table.column("prompt_ids").chunks) > 1
    assert pool_fingerprint(ids, rechunked) == base
    int32 = Dataset(
        dataset.data.table.cast(
            pa.schema([pa.field("id", pa.int64())] + [pa.field(n, pa.list_(pa.int32())) for n in TOKEN_COLUMNS])
        )
    )
    assert pool_fingerprint(ids, int32) == base
    shuffled = dataset.select(list(range(499, -1, -1)))
    assert pool_fingerprint(ids, shuffled.select(list(range(499, -1, -1)))) == base
    assert pool_fingerprint(ids, dataset.select(list(range(500)))) == base


def test_fingerprint_encodes_no_token_as_json(monkeypatch):
    """The old fingerprint JSON-encoded every token on rank 0 (~2 min per 1M pairs while the other ranks waited)."""
    encoded: list[int] = []
    dumps = json.dumps

    def counting(value, *args, **kwargs):
        text = dumps(value, *args, **kwargs)
        encoded.append(len(text))
        return text

    monkeypatch.setattr(checkpoint, "json", SimpleNamespace(dumps=counting, loads=json.loads))
    dataset = _token_pool(3000)
    pool_fingerprint(list(range(3000)), dataset)
    assert len(encoded) == 1  # the pair ids only


def test_a_checkpoint_fingerprinted_by_the_old_scheme_is_refused_with_the_reason():
    state = SelectionState(
        global_step=3,
        epoch=1,
        epoch_start_step=2,
        batches_in_epoch=4,
        selected_rows=[0],
        previous_selection=None,
        aux_num_refreshes=1,
        pool={"num_pairs": 300, "sha256": "ab" * 32},
        config={},
    )
    now = pool_fingerprint(list(range(300)), _token_pool(300))
    with pytest.raises(ValueError, match="fingerprinted by an earlier trl_select.*'json-v1'.*version that wrote"):
        check_resumable(state, now, {}, "checkpoint-3")
