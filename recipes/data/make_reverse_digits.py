"""Regenerate the reverse-digits preference data set shipped in ``recipes/data/reverse_digits/``.

Usage::

    python recipes/data/make_reverse_digits.py [--out_dir DIR]

Writes ``train.jsonl`` (2000 pairs, 30% label-flipped), ``validation.jsonl`` (256 clean pairs), ``test.jsonl`` (500
clean pairs) and ``sft.jsonl`` (1000 prompt/completion rows, half reversal and half copy rule). All prompts are
disjoint across the four files. Output is deterministic (byte-identical on every run). The splits are drawn by
``trl_select.testing.reverse_digits.build_splits``; this script only writes them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


try:
    from trl_select.testing import build_splits, write_jsonl
except ImportError:  # running as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from trl_select.testing import build_splits, write_jsonl

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "reverse_digits"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and write the four ``.jsonl`` files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the files")
    args = parser.parse_args(argv)
    for name, rows in build_splits().items():
        path = args.out_dir / f"{name}.jsonl"
        write_jsonl(rows, path)
        logger.info("wrote %d rows to %s", len(rows), path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
