"""`pool_source.json`: what a run records about where its pool came from, and how the readers check it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from trl_select.pair_files import load_pairs
from trl_select.pool_source import (
    describe_pool_source,
    file_sha256,
    read_pool_source,
    record_pool_source,
    resolve_pool_source,
)


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(
        "".join(json.dumps({"id": 10 + i, "chosen": f"c{i}", "rejected": f"r{i}"}) + "\n" for i in range(6))
    )
    return path


def test_a_file_location_is_recorded_with_its_sha256_and_found_after_a_move(pool_file, tmp_path):
    run = tmp_path / "run"
    record_pool_source(run, load_pairs(str(pool_file)), location=pool_file)
    record = read_pool_source(run)
    assert record["format"] == "jsonl" and record["num_rows"] == 6 and record["id_column"] == "id"
    assert record["files"][0]["sha256"] == file_sha256(pool_file)
    assert resolve_pool_source(run)[0] == str(pool_file.resolve())
    # the run folder and the data move together: the relative path still finds the file
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "data").rename(moved / "data")
    run.rename(moved / "run")
    location, _, note = resolve_pool_source(moved / "run")
    assert location == str(moved / "run" / "selection" / ".." / ".." / "data" / "train.jsonl")
    assert load_pairs(location)["id"] == list(range(10, 16)) and "sha256 checked" in note


def test_a_changed_or_missing_file_is_not_used(pool_file, tmp_path):
    run = tmp_path / "run"
    record_pool_source(run, location=pool_file)
    pool_file.write_text(pool_file.read_text().replace("c1", "x1"))
    location, _, note = resolve_pool_source(run)
    assert location is None and "changed since the run" in note and "sha256 differs" in note
    pool_file.unlink()
    assert "no longer exists" in resolve_pool_source(run)[2]
    assert "recorded no pool source" in resolve_pool_source(tmp_path / "nothing")[2]


def test_a_loaded_dataset_records_its_arrow_file_an_in_memory_or_reordered_one_says_why_not(pool_file, tmp_path):
    loaded = load_dataset("json", data_files=str(pool_file), split="train")
    record = describe_pool_source(loaded)
    assert record["format"] == "arrow" and record["location"].endswith(".arrow")
    assert load_pairs(record["location"])["chosen"] == loaded["chosen"]  # the cache file reads back the same rows
    in_memory = describe_pool_source(Dataset.from_list([{"chosen": "a", "rejected": "b"}]))
    assert in_memory["format"] is None and "in memory" in in_memory["reason"]
    shuffled = describe_pool_source(loaded.shuffle(seed=0))
    assert shuffled["format"] is None and "row order" in shuffled["reason"]
    record_pool_source(tmp_path / "run", Dataset.from_list([{"chosen": "a", "rejected": "b"}]))
    location, _, note = resolve_pool_source(tmp_path / "run")
    assert location is None and "built in memory" in note


def test_unreadable_cache_files_give_a_record_that_says_so(pool_file, tmp_path):
    loaded = load_dataset("json", data_files=str(pool_file), split="train")
    cache = Path(loaded.cache_files[0]["filename"])
    moved = cache.with_suffix(".moved")
    cache.rename(moved)  # the cache was cleared under a live dataset
    try:
        record_pool_source(tmp_path / "run", loaded)
    finally:
        moved.rename(cache)
    record = read_pool_source(tmp_path / "run")
    assert record["format"] is None and "could not be read" in record["reason"]
    with pytest.raises(FileNotFoundError):
        record_pool_source(tmp_path / "run", loaded, location=tmp_path / "missing.jsonl")
