"""Where a run's pool came from: `output_dir/selection/pool_source.json`, written once, read by `trl-select suspects`
and `trl-select clean` to find each pair's text without `--dataset`.

The record names the files that hold the pool as the trainer saw it (before TRL's tokenization and filtering), with
the sha256 of each, so a reader can tell whether they are still the same bytes:

```json
{"format_version": 1, "format": "jsonl", "location": "/data/train.jsonl", "relative_location": "../../data/train.jsonl",
 "split": null, "num_rows": 2000, "id_column": "id", "datasets_fingerprint": "66b301adbeb85834",
 "files": [{"path": "/data/train.jsonl", "relative_path": "../../data/train.jsonl", "sha256": "…", "bytes": 232846}]}
```

`format` is `jsonl`, `json`, `parquet`, `save_to_disk` (a folder, `split` naming the `DatasetDict` split) or `arrow`
(the Arrow cache file `datasets` wrote for a pool loaded with `load_dataset`, read back with `Dataset.from_file`). A
pool built in memory (`Dataset.from_list`), or one whose rows are a selection of its files' rows (`.select`,
`.shuffle`, `.train_test_split`), has no file to re-read: `format` is `null` and `reason` says why.

The file format layer: the standard library only (the `datasets` import happens in the readers that load the pool).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

POOL_SOURCE_FILENAME = "pool_source.json"
POOL_SOURCE_VERSION = 1
_FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def pool_source_path(output_dir: str | os.PathLike) -> Path:
    """`output_dir/selection/pool_source.json`."""
    return Path(output_dir) / "selection" / POOL_SOURCE_FILENAME


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def data_format(path: str | os.PathLike) -> str:
    """`save_to_disk` for a folder, else `jsonl`, `json`, `parquet` or `arrow` by the extension.

    Raises `ValueError` naming the formats read for any other path.
    """
    location = Path(path)
    if location.is_dir():
        return "save_to_disk"
    found = _FORMATS_BY_SUFFIX.get(location.suffix.lower())
    if found is None:
        raise ValueError(f"{path}: expected a `save_to_disk` folder or a .jsonl, .json, .parquet or .arrow file.")
    return found


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes make up the dataset at `path`: the file itself, or every file of a folder (sorted)."""
    location = Path(path)
    if location.is_dir():
        return sorted(child for child in location.rglob("*") if child.is_file())
    return [location]


def fingerprint_files(path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """`[{"path", "relative_path", "sha256", "bytes"}]` of `source_files(path)`; `relative_path` is relative to
    `relative_to` (for a record that moves with its folder), `None` without it."""
    rows = []
    for file in source_files(path):
        resolved = file.resolve()
        rows.append(
            {
                "path": str(resolved),
                "relative_path": os.path.relpath(resolved, Path(relative_to).resolve()) if relative_to else None,
                "sha256": file_sha256(resolved),
                "bytes": resolved.stat().st_size,
            }
        )
    return rows


def describe_pool_source(
    dataset: Any = None,
    location: str | os.PathLike | None = None,
    split: str | None = None,
    relative_to: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The record of where a pool came from (the module docstring has the layout).

    Args:
        dataset (`datasets.Dataset`, *optional*):
            The training pool as passed to the trainer. Without `location`, its Arrow cache file(s) are recorded when
            its rows are exactly theirs (no indices mapping); otherwise the record says there is no file.
        location (`str` or `os.PathLike`, *optional*):
            The file or `save_to_disk` folder the pool was read from (what a user passes to `--dataset`). Preferred
            over the cache files: it is the file a reviewer knows and `trl-select clean` rewrites.
        split (`str`, *optional*):
            The split of a `save_to_disk` `DatasetDict` folder.
        relative_to (`str` or `os.PathLike`, *optional*):
            Also record each path relative to this folder (the record's own), so the record survives a move of both.

    Returns:
        `dict`: the JSON-serialisable record.
    """
    record: dict[str, Any] = {"format_version": POOL_SOURCE_VERSION, "format": None, "location": None}
    record["relative_location"] = None
    record["split"] = split
    record["num_rows"] = len(dataset) if dataset is not None else None
    record["id_column"] = "id" if dataset is not None and "id" in dataset.column_names else None
    record["datasets_fingerprint"] = getattr(dataset, "_fingerprint", None)
    record["files"] = []
    if location is None and dataset is not None:
        cache_files = [Path(entry["filename"]) for entry in getattr(dataset, "cache_files", None) or []]
        if not cache_files:
            record["reason"] = "the pool was built in memory (no file holds it)"
            return record
        if getattr(dataset, "_indices", None) is not None:
            record["reason"] = (
                "the pool is a selection of its files' rows (.select, .shuffle, .filter or a split): the files' row "
                "order is not the pool's"
            )
            return record
        if len(cache_files) > 1:
            record["reason"] = f"the pool spans {len(cache_files)} Arrow cache files"
            return record
        location = cache_files[0]
    if location is None:
        raise ValueError("describe_pool_source needs a dataset or a location.")
    record["format"] = data_format(location)
    record["location"] = str(Path(location).resolve())
    if relative_to is not None:
        record["relative_location"] = os.path.relpath(Path(location).resolve(), Path(relative_to).resolve())
    record["files"] = fingerprint_files(location, relative_to)
    return record


def record_pool_source(
    output_dir: str | os.PathLike,
    dataset: Any = None,
    location: str | os.PathLike | None = None,
    split: str | None = None,
) -> Path:
    """Write `output_dir/selection/pool_source.json` (`describe_pool_source`) and return its path.

    Called once per run on the main process with the raw training dataset, as the trainer received it (before TRL
    tokenizes and filters it). With only `dataset`, files that cannot be read give a record that says so rather than
    an error. A later call replaces the record (e.g. a script that knows the file it loaded the pool from passes
    `location=`).
    """
    path = pool_source_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = describe_pool_source(dataset, location, split, relative_to=path.parent)
    except (OSError, ValueError) as error:  # a dataset whose files cannot be read must not stop a training run
        if location is not None or dataset is None:
            raise
        record = {
            "format_version": POOL_SOURCE_VERSION,
            "format": None,
            "location": None,
            "num_rows": len(dataset),
            "files": [],
            "reason": f"the pool's files could not be read ({error})",
        }
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if record["format"] is None:
        logger.info(
            "No file to re-read the pool from (%s): pass --dataset to `trl-select suspects`.", record["reason"]
        )
    return path


def read_pool_source(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of `output_dir` (a run's output_dir or its `selection` folder), or `None` if there is none."""
    for candidate in (pool_source_path(output_dir), Path(output_dir) / POOL_SOURCE_FILENAME):
        if candidate.is_file():
            record = json.loads(candidate.read_text(encoding="utf-8"))
            record["_record_path"] = str(candidate)
            return record
    return None


def resolve_pool_source(output_dir: str | os.PathLike) -> tuple[str | None, str | None, str]:
    """`(location, split, note)` of the recorded pool of a run, checked against its sha256s.

    `location` is a path `load_pairs` reads (the recorded one, else the one relative to the record, for a folder
    that moved), or `None` when there is no usable record; `note` says in one sentence where the text comes from, or
    why there is none.
    """
    record = read_pool_source(output_dir)
    if record is None:
        return None, None, f"{output_dir} recorded no pool source ({POOL_SOURCE_FILENAME})"
    if record.get("format") is None:
        return None, None, f"the run recorded no file for its pool ({record.get('reason', 'no reason given')})"
    base = Path(record["_record_path"]).parent
    candidates = [Path(record["location"])]
    if record.get("relative_location"):
        candidates.append(base / record["relative_location"])
    location = next((path for path in candidates if path.exists()), None)
    if location is None:
        return None, None, f"the recorded pool {record['location']} no longer exists"
    files = [Path(row["path"]) for row in record["files"]]
    if location != candidates[0]:  # the relative copy: its files are relative to the record too
        files = [base / row["relative_path"] for row in record["files"]]
    for file, row in zip(files, record["files"], strict=True):
        if not file.is_file() or file_sha256(file) != row["sha256"]:
            return None, None, f"the recorded pool {location} changed since the run ({file.name}: sha256 differs)"
    return str(location), record.get("split"), f"text from {location} (recorded by the run, sha256 checked)"


__all__ = [
    "POOL_SOURCE_FILENAME",
    "data_format",
    "describe_pool_source",
    "file_sha256",
    "fingerprint_files",
    "read_pool_source",
    "record_pool_source",
    "resolve_pool_source",
    "source_files",
]
