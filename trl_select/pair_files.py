"""Preference pairs read from files: a `save_to_disk` folder or a .jsonl/.json/.parquet/.arrow file, and their stable ids.

Used by the CLI (`score`, `select`, `overlap`) and by `trl-select suspects`; `datasets` is imported when called.
"""

from __future__ import annotations


def load_pairs(path: str, split: str = "train"):
    """A preference dataset from a `save_to_disk` directory (a `DatasetDict` picks `split`), or a .jsonl/.json/.parquet
    file, or an Arrow file (the cache file `datasets` writes, which `pool_source.json` may name)."""
    from pathlib import Path

    from datasets import Dataset, DatasetDict, load_from_disk

    location = Path(path)
    if location.is_dir():
        dataset = load_from_disk(str(location))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} holds splits {list(dataset)}; pick one with --split.")
            dataset = dataset[split]
        return dataset
    if location.suffix in (".jsonl", ".json"):
        return Dataset.from_json(str(location))
    if location.suffix == ".parquet":
        return Dataset.from_parquet(str(location))
    if location.suffix == ".arrow":
        return Dataset.from_file(str(location))
    if not location.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a `save_to_disk` directory or a .jsonl/.parquet file.")
    raise ValueError(f"{path}: expected a `save_to_disk` directory or a .jsonl, .json or .parquet file.")


def pair_ids_of(dataset) -> list:
    """The stable id of each row: the `id` column if there is one, else the row index (the trainer's convention)."""
    return list(dataset["id"]) if "id" in dataset.column_names else list(range(len(dataset)))


__all__ = ["load_pairs", "pair_ids_of"]
