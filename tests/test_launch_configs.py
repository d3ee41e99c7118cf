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
        ("fsdp2.yaml", "FSDP", None),
    ],
)
def test_launch_config(name, distributed_type, zero_stage):
    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).endswith(distributed_type)
    assert config.mixed_precision == "bf16"  # consistent with the trainers' default bf16=True on GPUs
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage
    assert Path(CONFIGS / name).read_text().startswith("# trl-select")
    if distributed_type == "FSDP":  # what selection supports: FSDP2, no parameter offload, no FSDP checkpointing
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_offload_params"] is False
        assert config.fsdp_config["fsdp_activation_checkpointing"] is False


def test_the_fsdp2_launch_config_passes_selection():
    """The environment `accelerate launch --config_file fsdp2.yaml` gives each process passes the selection checks."""
    from argparse import Namespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from trl_select.validation import fsdp_setup, unsupported_distributed_settings

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp2.yaml"), "recipe.py"])
    args, _, _ = _validate_launch_command(args)
    environ = prepare_multi_gpu_env(args)
    assert fsdp_setup(Namespace(), environ=environ).version == 2
    assert unsupported_distributed_settings(Namespace(), environ=environ) == []
