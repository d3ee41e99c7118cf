"""The selection history file: one JSON object per epoch in `output_dir/selection_history.jsonl`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


HISTORY_FILENAME = "selection_history.jsonl"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a process killed mid-write) sees the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SelectionHistory:
    """Append-only record of selection events, rewritten atomically on every append.

    Records hold no timestamps or timings, so the same seed and data give a byte-identical file.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / HISTORY_FILENAME

    def reset(self) -> None:
        write_atomically(self.path, b"")

    def rewrite(self, data: bytes) -> None:
        """Replace the whole file (a resume restores the checkpoint's copy)."""
        write_atomically(self.path, data)

    def append(self, record: dict[str, Any]) -> None:
        existing = self.path.read_bytes() if self.path.exists() else b""
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        write_atomically(self.path, existing + line)

    def read(self) -> list[dict[str, Any]]:
        return read_history(self.path)


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `selection_history.jsonl` file (or of the one in a given output directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILENAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
