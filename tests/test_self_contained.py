"""The repository runs from a fresh clone: no test, benchmark, recipe or library module reads outside it.

CI machines have a sibling `../shared/data` folder that a user's clone does not; a path into it made the README's test
command fail for users. Data a test needs lives under `tests/data/`, with its licence and source.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .testing_utils import REPO


SCANNED = ("tests", "benchmarks", "recipes", "trl_select")
# `../shared`, `<path>.parent / "shared"`, `parents[2] / 'shared'`, an absolute path into the CI machine's shared folder.
OUTSIDE_REFERENCE = re.compile(r"\.\./shared\b|parents?(\[\d+\])?\s*/\s*[\"']shared[\"']|/work/share[d]\b")
THIS_FILE = Path(__file__).resolve()
TEXT_SUFFIXES = {".py", ".md", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}


def _text_files() -> list[Path]:
    return sorted(
        path
        for folder in SCANNED
        for path in (REPO / folder).rglob("*")
        if path.is_file()
        and path.suffix in TEXT_SUFFIXES
        and "__pycache__" not in path.parts
        and path != THIS_FILE  # it spells the patterns out
    )


def test_nothing_references_the_shared_folder_outside_the_repository():
    files = _text_files()
    assert len(files) > 50  # the scan really ran over the repository
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if OUTSIDE_REFERENCE.search(line)
    ]
    assert not offenders, "Files reading outside the repository (copy the data under tests/data/):\n" + "\n".join(
        offenders
    )


@pytest.mark.parametrize(
    "line", ['SHARED = REPO.parent / "shared" / "data"', "open('../shared/data/x.jsonl')", "Path('/work/shared/d')"]
)
def test_the_scan_catches_each_form(line):
    assert OUTSIDE_REFERENCE.search(line)
