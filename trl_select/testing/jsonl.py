"""JSON-lines helpers for the shipped data sets. Not public API."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


__all__ = ["read_jsonl", "write_jsonl"]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as JSON lines to ``path`` (gzip-compressed, reproducibly, if it ends with ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if path.name.endswith(".gz"):
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
            gz.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines from ``path`` (gunzipped if it ends with ``.gz``); blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
