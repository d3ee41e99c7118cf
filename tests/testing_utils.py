"""Helpers the tests import: repository paths and a fast trainer config (conftest.py keeps only fixtures and hooks)."""

from __future__ import annotations

import copy
from pathlib import Path

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
