"""The accelerate launch configs shipped beside the recipes parse as accelerate configs of the documented kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from .testing_utils import REPO


CONFIGS = REPO / "recipes" / "accelerate_configs"


@pytest.mark.parametrize(
    "name, distributed_type, zero_stage",
    [
        ("multi_gpu.yaml", "MULTI_GPU", None),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 3),
    ],
)
def test_launch_config(name, distributed_type, zero_stage):
    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).endswith(distributed_type)
    assert config.mixed_precision == "bf16"  # consistent with the trainers' default bf16=True on GPUs
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage
    assert Path(CONFIGS / name).read_text().startswith("# trl-select")
