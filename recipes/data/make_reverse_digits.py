"""Regenerate the reverse-digits preference data set shipped in ``recipes/data/reverse_digits/``.

Usage::

    python recipes/data/make_reverse_digits.py [--out_dir DIR]

Writes ``train.jsonl`` (2000 pairs, 30% label-flipped), ``validation.jsonl`` (256 clean pairs), ``test.jsonl`` (500
clean pairs) and ``sft.jsonl`` (1000 prompt/completion rows, half reversal and half copy rule). All prompts are
disjoint across the four files. Output is deterministic (byte-identical on every run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


try:
    from trl_select.toy import make_reverse_digits_pairs, make_sft_texts, sample_digit_prompts, write_jsonl
except ImportError:  # running as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from trl_select.toy import make_reverse_digits_pairs, make_sft_texts, sample_digit_prompts, write_jsonl

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "reverse_digits"

NUM_TRAIN, TRAIN_FLIP_FRACTION, TRAIN_SEED = 2000, 0.3, 0
NUM_VALIDATION, VALIDATION_SEED = 256, 1
NUM_TEST, TEST_SEED = 500, 2
NUM_SFT, SFT_PROMPT_SEED, SFT_SEED = 1000, 3, 4


def build_splits(seed_offset: int = 0) -> dict[str, list[dict]]:
    """Build the four splits (train, validation, test, sft) with mutually disjoint prompts.

    Every split's seed is its fixed seed plus ``seed_offset``; offset 0 gives the shipped files, and
    ``benchmarks/quality.py`` draws a fresh task per benchmark seed with offset ``1000 * seed``.
    """
    train = make_reverse_digits_pairs(NUM_TRAIN, flip_fraction=TRAIN_FLIP_FRACTION, seed=TRAIN_SEED + seed_offset)
    used = {row["prompt"] for row in train}
    validation = make_reverse_digits_pairs(
        NUM_VALIDATION, flip_fraction=0.0, seed=VALIDATION_SEED + seed_offset, exclude_prompts=used
    )
    used |= {row["prompt"] for row in validation}
    test = make_reverse_digits_pairs(NUM_TEST, flip_fraction=0.0, seed=TEST_SEED + seed_offset, exclude_prompts=used)
    used |= {row["prompt"] for row in test}
    sft_prompts = sample_digit_prompts(NUM_SFT, seed=SFT_PROMPT_SEED + seed_offset, exclude_prompts=used)
    sft = make_sft_texts(sft_prompts, correct_fraction=0.5, seed=SFT_SEED + seed_offset)
    return {"train": train, "validation": validation, "test": test, "sft": sft}


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
