"""Helpers the tests import: repository paths and a fast trainer config (conftest.py keeps only fixtures and hooks)."""

from __future__ import annotations

import copy
from pathlib import Path

from datasets import Dataset

from trl_select import SelectiveDPOConfig


REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "data" / "reverse_digits"
# The first 72 pairs of Anthropic HH-RLHF (harmless-base, test split), MIT; see tests/data/hh_rlhf/README.md.
HH_RLHF_SLICE = REPO / "tests" / "data" / "hh_rlhf" / "harmless-base-test.first72.jsonl"


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


def with_unequal_rejected(dataset: Dataset) -> Dataset:
    """`dataset` (reverse-digits pairs, whose completions all have equal lengths) with each rejected completion 2
    characters shorter, as long, or 1-3 longer than the chosen one (a rotation of its own digits), so LD-DPO's shared
    prefix and down-weighted tail differ from pair to pair."""
    rows = []
    for index, row in enumerate(dataset):
        rejected, change = row["rejected"], index % 5 - 1  # -1 .. 3
        rejected = rejected[:-2] if change < 0 else rejected + (rejected * 2)[1 : 1 + change]
        rows.append({**row, "rejected": rejected})
    return Dataset.from_list(rows)
