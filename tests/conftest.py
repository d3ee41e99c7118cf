"""Fixtures and session set-up: a locally built tokenizer and tiny Llama, the shipped reverse-digits data.

Helpers that tests import (paths, `fast_config`) live in `tests/testing_utils.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from datasets import Dataset


_REPO = Path(__file__).resolve().parents[1]
# Subprocess tests (recipes, 2-process launches) must import this checkout, whatever the editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl  # noqa: E402

from .testing_utils import DEMO_DATA  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_llama(tokenizer, seed=0)


@pytest.fixture(scope="session")
def reverse_rows() -> dict[str, list[dict]]:
    return {split: read_jsonl(DEMO_DATA / f"{split}.jsonl") for split in ("train", "validation", "test")}


@pytest.fixture
def pool(reverse_rows) -> Dataset:
    """100 training pairs (30% flipped); not divisible by the batch sizes used below, on purpose."""
    return Dataset.from_list(reverse_rows["train"][:100])


@pytest.fixture
def validation(reverse_rows) -> Dataset:
    return Dataset.from_list(reverse_rows["validation"][:32])
