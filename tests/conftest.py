"""Shared fixtures: a locally built tokenizer and tiny Llama, the shipped reverse-digits data, fast trainer configs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from datasets import Dataset


REPO = Path(__file__).resolve().parents[1]
# Subprocess tests (recipes, 2-process launches) must import this checkout, whatever the editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from trl_select import SelectiveDPOConfig  # noqa: E402
from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl  # noqa: E402


DEMO_DATA = REPO / "recipes" / "data" / "reverse_digits"
# The first 72 pairs of Anthropic HH-RLHF (harmless-base, test split), MIT; see tests/data/hh_rlhf/README.md.
HH_RLHF_SLICE = REPO / "tests" / "data" / "hh_rlhf" / "harmless-base-test.first72.jsonl"


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


def fast_config(output_dir: str | Path, config_class=SelectiveDPOConfig, **overrides) -> SelectiveDPOConfig:
    """A config that trains the tiny model in seconds on the CPU, with nothing written but the history."""
    settings = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "beta": 0.5,
        "max_length": 32,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "aux_max_steps": 2,
    }
    settings.update(overrides)
    return config_class(**settings)


def reference_copy(model):
    return copy.deepcopy(model)
