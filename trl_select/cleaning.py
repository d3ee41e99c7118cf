"""From a reviewer's decisions to a cleaned dataset: `trl-select clean`.

The review loop: `trl-select suspects OUTPUT_DIR --out suspects.csv` writes every pair ranked by suspicion with an
empty `decision` column; a reviewer fills it with `keep`, `drop` or `flip` (an empty cell is `keep`); `trl-select
clean OUTPUT_DIR --decisions suspects.csv --out cleaned.jsonl` writes the dataset without the dropped pairs and with
the flipped ones' chosen and rejected swapped, in the input's format, with a JSON manifest of every change and the
sha256 of the source; the next run trains on it. A policy stands in for a reviewer: `--drop-top 10%` drops the most
suspect tenth of the pool, `--flip-top 50` flips the 50 most suspect pairs.

Every decision is checked before anything is written: an id that is not in the dataset, an id decided twice and a
decision that is not keep/drop/flip are refused with the line of the decisions file that holds them.

A flip swaps the values of `chosen` and `rejected`, whatever they hold: strings (standard or implicit-prompt format,
as the HH-RLHF transcripts) or lists of `{"role", "content"}` messages (conversational format). Columns that come in
chosen/rejected pairs (`score_chosen`/`score_rejected`, `chosen_rating`/`rejected_rating`, ...) are swapped with them;
every other column is kept as it is.

`datasets` is imported when a dataset is read; importing this module imports neither torch, transformers nor TRL.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pair_files import load_pairs, pair_ids_of
from .pool_source import data_format, fingerprint_files
from .suspects import DEFAULT_STATISTIC, find_suspects


logger = logging.getLogger(__name__)

DECISIONS = ("keep", "drop", "flip")
DECISION_COLUMN = "decision"
ID_COLUMN = "pair_id"
MANIFEST_VERSION = 1


@dataclass
class Decision:
    """One pair's decision: `decision` in `DECISIONS`; `line` where it was read (1 = a CSV's header, a JSONL's first
    record), `None` for a policy's; `rank` and `suspicion` from the ranking when known."""

    pair_id: Any
    decision: str
    line: int | None = None
    rank: int | None = None
    suspicion: float | None = None


@dataclass
class CleaningResult:
    """What `clean_dataset` wrote: the cleaned dataset, its manifest, and the counts."""

    output: Path
    manifest: Path
    source_rows: int
    output_rows: int
    dropped: int
    flipped: int
    changes: list[dict[str, Any]] = field(default_factory=list)


# ----- decisions -----


def _where(path: str | os.PathLike, line: int | None) -> str:
    return f"{path} line {line}" if line is not None else str(path)


def _optional_number(value: Any, cast: type) -> Any:
    if value in (None, ""):
        return None
    try:
        number = cast(float(value))
    except (TypeError, ValueError):
        return None
    return number if not isinstance(number, float) or math.isfinite(number) else None


def read_decisions(path: str | os.PathLike) -> list[Decision]:
    """The decided rows of a decisions file: the `trl-select suspects --out` CSV or JSONL, its `decision` column filled.

    A row needs `pair_id` and `decision`; `keep`, `drop` and `flip` are read case-insensitively, an empty decision is
    an undecided pair (kept, not listed). Raises `ValueError` naming the file and line of the first unknown decision,
    missing id or duplicate id (the line of both occurrences), and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--decisions {path} does not exist: write one with `trl-select suspects ... --out FILE`."
        )
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = [(index + 2, row) for index, row in enumerate(reader)]  # line 1 is the header
    elif suffix in (".jsonl", ".json"):
        columns = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{_where(path, number)} is not JSON ({error.msg}): one JSON object a line."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{_where(path, number)} is not a JSON object: one object a line, with pair_id and decision."
                )
            columns = list(dict.fromkeys([*columns, *row]))
            rows.append((number, row))
    else:
        raise ValueError(f"--decisions {path}: expected the .csv or .jsonl that `trl-select suspects --out` writes.")
    for column in (ID_COLUMN, DECISION_COLUMN):
        if rows and column not in columns:
            raise ValueError(
                f"--decisions {path} has no `{column}` column (it has {columns}): use the file `trl-select suspects "
                f"--out suspects.csv` writes, with its `{DECISION_COLUMN}` column filled with keep, drop or flip."
            )
    decisions: list[Decision] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        pair_id = row.get(ID_COLUMN)
        if pair_id is None or str(pair_id).strip() == "":
            raise ValueError(f"{_where(path, line)} has no {ID_COLUMN}: every row names the pair it decides.")
        key = _id_key(pair_id)
        if key in seen:
            raise ValueError(
                f"{_where(path, line)} decides pair_id {pair_id} again (first on line {seen[key]}): keep one row per "
                "pair."
            )
        seen[key] = line
        value = row.get(DECISION_COLUMN)
        decision = "" if value is None else str(value).strip().lower()
        if decision == "":
            continue
        if decision not in DECISIONS:
            raise ValueError(
                f"{_where(path, line)} (pair_id {pair_id}): decision {value!r} is not one of keep, drop, flip (an empty "
                "cell keeps the pair)."
            )
        decisions.append(
            Decision(
                pair_id=pair_id,
                decision=decision,
                line=line,
                rank=_optional_number(row.get("rank"), int),
                suspicion=_optional_number(row.get("suspicion"), float),
            )
        )
    return decisions


def parse_count(text: str | int, pool_size: int, flag: str) -> int:
    """`"10%"` -> 10% of `pool_size` (rounded), `"50"` -> 50; raises `ValueError` naming `flag` for anything else."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            fraction = float(value[:-1]) / 100.0
            if not 0.0 <= fraction <= 1.0:
                raise ValueError
            return round(fraction * pool_size)
        count = int(value)
    except ValueError:
        raise ValueError(
            f"{flag} {text}: expected a number of pairs (e.g. 50) or a percentage of the pool (e.g. 10%)."
        ) from None
    if count < 0:
        raise ValueError(f"{flag} {text}: expected a non-negative number of pairs.")
    return min(count, pool_size)


def policy_decisions(
    output_dir: str | os.PathLike | Sequence[str | os.PathLike],
    drop_top: str | int | None = None,
    flip_top: str | int | None = None,
    statistic: str = DEFAULT_STATISTIC,
) -> tuple[list[Decision], dict[str, Any]]:
    """The decisions of a policy over a run's suspects ranking: drop (`drop_top`) or flip (`flip_top`) the most suspect
    pairs, a count or a percentage of the pool (`"10%"`). Returns the decisions and a description for the manifest."""
    if (drop_top is None) == (flip_top is None):
        raise ValueError("Give one policy: --drop-top N|P% or --flip-top N|P%.")
    suspects = find_suspects(output_dir, statistic=statistic)
    flag, text, decision = (
        ("--drop-top", drop_top, "drop") if drop_top is not None else ("--flip-top", flip_top, "flip")
    )
    count = parse_count(text, len(suspects), flag)
    decisions = [
        Decision(pair_id=row.pair_id, decision=decision, rank=row.rank, suspicion=round(row.statistic, 2))
        for row in suspects[:count]
    ]
    paths = [output_dir] if isinstance(output_dir, (str, os.PathLike)) else list(output_dir)
    policy = {
        "policy": f"{flag} {text}",
        "pairs": count,
        "pool_size": len(suspects),
        "statistic": statistic,
        "scores": [str(path) for path in paths],
    }
    return decisions, policy


# ----- the dataset -----


def _id_key(pair_id: Any) -> str:
    """Ids compared as text: a CSV's "17" is the dataset's 17."""
    if isinstance(pair_id, float) and pair_id.is_integer():
        pair_id = int(pair_id)
    return str(pair_id).strip()


def paired_columns(column_names: Sequence[str]) -> list[tuple[str, str]]:
    """The columns a flip swaps: `(chosen, rejected)`, and every `X_chosen`/`X_rejected` and `chosen_X`/`rejected_X`
    pair present."""
    names = set(column_names)
    pairs = [("chosen", "rejected")]
    for name in column_names:
        if name.endswith("_chosen"):
            other = name.removesuffix("_chosen") + "_rejected"
        elif name.startswith("chosen_"):
            other = "rejected_" + name.removeprefix("chosen_")
        else:
            continue
        if other in names:
            pairs.append((name, other))
    return pairs


def flip_row(row: dict[str, Any], columns: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A copy of `row` with each pair of `columns` swapped."""
    flipped = dict(row)
    for left, right in columns:
        if left in row and right in row:
            flipped[left], flipped[right] = row[right], row[left]
    return flipped


def _output_format(source_format: str, out: Path) -> str:
    """The format of the cleaned dataset: the source's; `out` must say the same (a folder for save_to_disk)."""
    written = "save_to_disk" if source_format in ("save_to_disk", "arrow") else source_format
    suffix = out.suffix.lower()
    if written == "save_to_disk":
        if suffix in (".jsonl", ".json", ".parquet", ".arrow", ".csv"):
            raise ValueError(
                f"--out {out}: the dataset is a `datasets` folder ({source_format}), so the cleaned one is written with "
                "`save_to_disk` into a folder: pass a folder name without an extension."
            )
    elif suffix != f".{written}":
        raise ValueError(f"--out {out}: the dataset is .{written}, so the cleaned one is too: name it *.{written}.")
    return written


def _check_ids(
    decisions: Sequence[Decision], ids: Sequence[Any], dataset_path: str, has_id_column: bool, where: str
) -> dict[str, int]:
    row_of: dict[str, int] = {}
    for row, pair_id in enumerate(ids):
        key = _id_key(pair_id)
        if key in row_of:
            raise ValueError(
                f"--dataset {dataset_path}: rows {row_of[key]} and {row} have the same id {pair_id!r}; ids must be "
                "unique to decide pairs by id."
            )
        row_of[key] = row
    for decision in decisions:
        if _id_key(decision.pair_id) not in row_of:
            known = "its `id` column" if has_id_column else f"row indices 0..{len(ids) - 1} (no `id` column)"
            raise ValueError(
                f"{_where(where, decision.line)}: pair_id {decision.pair_id} is not in --dataset {dataset_path} (ids: "
                f"{known}). Pass the dataset the run trained on, or remove the row."
            )
    return row_of


def clean_dataset(
    dataset_path: str | os.PathLike,
    decisions: Sequence[Decision],
    out: str | os.PathLike,
    split: str = "train",
    manifest: str | os.PathLike | None = None,
    decisions_source: dict[str, Any] | None = None,
) -> CleaningResult:
    """Write `dataset_path` without its dropped pairs and with its flipped pairs' chosen and rejected swapped.

    Args:
        dataset_path (`str` or `os.PathLike`):
            The dataset the decisions are about: a .jsonl, .json or .parquet file, a `save_to_disk` folder (a
            `DatasetDict` has `split` cleaned and its other splits copied) or an Arrow file.
        decisions (`Sequence[Decision]`):
            From `read_decisions` or `policy_decisions`; `keep` changes nothing.
        out (`str` or `os.PathLike`):
            Where to write, in the input's format: a file with the same extension, or a folder for `save_to_disk`
            (and Arrow) input. A .jsonl is rewritten line by line: the kept lines unchanged, byte for byte.
        split (`str`, *optional*, defaults to `"train"`):
            The split of a `DatasetDict` folder.
        manifest (`str` or `os.PathLike`, *optional*):
            Where to write the manifest (default: `out` + `.manifest.json`).
        decisions_source (`dict`, *optional*):
            What the decisions came from, copied into the manifest.

    Returns:
        `CleaningResult`. Raises `ValueError` (before writing anything) for an id not in the dataset, a dataset with
        duplicate ids or without chosen/rejected columns, and an `out` in another format or on the source itself.
    """
    source = Path(dataset_path)
    out = Path(out)
    source_format = data_format(source)
    written_format = _output_format(source_format, out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} would overwrite the source {source}: write the cleaned dataset elsewhere.")
    dataset = load_pairs(str(source), split)
    missing = [name for name in ("chosen", "rejected") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"--dataset {source} has no {missing} column(s) (it has {dataset.column_names}): nothing to flip."
        )
    ids = pair_ids_of(dataset)
    where = str((decisions_source or {}).get("file", "the decisions"))
    row_of = _check_ids(decisions, ids, str(source), "id" in dataset.column_names, where)
    action = {row_of[_id_key(d.pair_id)]: d for d in decisions if d.decision != "keep"}
    drop = {row for row, d in action.items() if d.decision == "drop"}
    flip = {row for row, d in action.items() if d.decision == "flip"}
    columns = paired_columns(dataset.column_names)
    kept_rows = [row for row in range(len(dataset)) if row not in drop]

    out.parent.mkdir(parents=True, exist_ok=True)
    if written_format == "jsonl":
        _write_jsonl(source, out, len(dataset), drop, flip, columns)
    else:
        cleaned = dataset.select(kept_rows)
        if flip:
            flipped_positions = {position for position, row in enumerate(kept_rows) if row in flip}
            cleaned = cleaned.map(
                lambda row, index: flip_row(row, columns) if index in flipped_positions else row,
                with_indices=True,
                keep_in_memory=True,  # no cache file next to the source's
                desc="Flipping pairs",
            )
        if written_format == "parquet":
            cleaned.to_parquet(str(out))
        elif written_format == "json":
            cleaned.to_json(str(out), lines=True, force_ascii=False)
        else:
            _save_to_disk(source, source_format, split, cleaned, out)

    changes = [
        {
            "pair_id": ids[row],
            "row": row,
            "decision": action[row].decision,
            **({"line": action[row].line} if action[row].line is not None else {}),
            **({"rank": action[row].rank} if action[row].rank is not None else {}),
            **({"suspicion": action[row].suspicion} if action[row].suspicion is not None else {}),
        }
        for row in sorted(action)
    ]
    manifest_path = Path(manifest) if manifest is not None else out.with_name(out.name + ".manifest.json")
    record = {
        "format_version": MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(source.resolve()),
            "format": source_format,
            "split": split if source_format == "save_to_disk" else None,
            "num_rows": len(dataset),
            "files": fingerprint_files(source),
        },
        "decisions": decisions_source or {},
        "output": {
            "path": str(out.resolve()),
            "format": written_format,
            "num_rows": len(kept_rows),
            "files": fingerprint_files(out),
        },
        "counts": {
            "dropped": len(drop),
            "flipped": len(flip),
            "kept_unchanged": len(kept_rows) - len(flip),
            "decided_keep": sum(d.decision == "keep" for d in decisions),
        },
        "flip_swaps": [list(pair) for pair in columns if pair[0] in dataset.column_names],
        "changes": changes,
    }
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return CleaningResult(out, manifest_path, len(dataset), len(kept_rows), len(drop), len(flip), changes)


def _write_jsonl(
    source: Path, out: Path, num_rows: int, drop: set[int], flip: set[int], columns: Sequence[tuple[str, str]]
) -> None:
    """Rewrite a JSON-lines file: kept lines as they were, flipped ones re-serialised, dropped ones left out."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != num_rows:
        raise ValueError(f"{source} has {len(lines)} non-empty lines but {num_rows} rows: one JSON object a line.")
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent, delete=False, suffix=".tmp") as f:
        for row, line in enumerate(lines):
            if row in drop:
                continue
            f.write(
                (json.dumps(flip_row(json.loads(line), columns), ensure_ascii=False) if row in flip else line) + "\n"
            )
    os.replace(f.name, out)


def _save_to_disk(source: Path, source_format: str, split: str, cleaned: Any, out: Path) -> None:
    """`save_to_disk` the cleaned split; a `DatasetDict` source keeps its other splits as they were."""
    from datasets import DatasetDict, load_from_disk

    if out.exists():
        shutil.rmtree(out)
    if source_format == "save_to_disk":
        original = load_from_disk(str(source))
        if isinstance(original, DatasetDict):
            splits = {name: (cleaned if name == split else original[name]) for name in original}
            DatasetDict(splits).save_to_disk(str(out))
            return
    cleaned.save_to_disk(str(out))


__all__ = [
    "DECISIONS",
    "CleaningResult",
    "Decision",
    "clean_dataset",
    "flip_row",
    "paired_columns",
    "parse_count",
    "policy_decisions",
    "read_decisions",
]
