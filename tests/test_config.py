"""Config defaults, validation errors that name the field, and CLI parsing through TRL's parser."""

from __future__ import annotations

import pytest
from trl import ModelConfig, ScriptArguments, TrlParser

from trl_select import SelectiveDPOConfig, SelectiveSLiCConfig


def _config(config_class=SelectiveDPOConfig, **kwargs):
    return config_class(output_dir="unused", report_to="none", bf16=False, **kwargs)


def test_defaults_follow_the_paper():
    config = _config()
    assert config.selection_rule == "lossdiff_irm"
    assert config.percentile_bands() == {"lossdiff": (10.0, 90.0), "irm": (10.0, 90.0)}
    assert (config.selection_warmup_epochs, config.aux_refresh_epochs) == (1, 1)
    assert config.loss_type == ["sigmoid"]
    assert _config(SelectiveSLiCConfig).loss_type == ["hinge"]


def test_every_selection_field_has_help():
    import dataclasses

    from trl import DPOConfig

    base = {f.name for f in dataclasses.fields(DPOConfig)}
    added = [f for f in dataclasses.fields(SelectiveDPOConfig) if f.name not in base]
    assert len(added) == 24
    assert all(f.metadata.get("help") for f in added)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"selection_rule": "best"}, "selection_rule"),
        ({"irm_lo_percentile": 95.0}, "irm_lo_percentile"),
        ({"lossdiff_hi_percentile": 101.0}, "lossdiff_lo_percentile"),
        ({"influence_lo_percentile": -1.0}, "influence_lo_percentile"),
        ({"selection_fraction": 0.0}, "selection_fraction"),
        ({"selection_fraction": 1.5}, "selection_fraction"),
        ({"selection_warmup_epochs": 0}, "selection_warmup_epochs"),
        ({"aux_refresh_epochs": 0}, "aux_refresh_epochs"),
        ({"aux_num_train_epochs": 0.0}, "aux_num_train_epochs"),
        ({"aux_max_steps": 0}, "aux_max_steps"),
        ({"aux_learning_rate": -1.0}, "aux_learning_rate"),
        ({"scoring_batch_size": 0}, "scoring_batch_size"),
        ({"scoring_reuse": "policy"}, "scoring_reuse"),
        ({"aux_batch_size": 0}, "aux_batch_size"),
        ({"aux_mode": "copy"}, "aux_mode"),
        ({"aux_lora_r": 0}, "aux_lora_r"),
        ({"aux_lora_alpha": 0.0}, "aux_lora_alpha"),
        ({"aux_lora_target_modules": []}, "aux_lora_target_modules"),
        ({"loss_type": ["aot"]}, "loss_type"),
        ({"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]}, "ld_alpha"),  # TRL's SFT term reads unweighted sums
        ({"use_weighting": True, "loss_type": ["sft"]}, "use_weighting"),  # TRL 1.16 cannot train it
        ({"num_train_epochs": 0.0}, "num_train_epochs"),
        ({"selection_strategy": "batch"}, "selection_strategy"),
        ({"selection_steps": 1.5}, "selection_steps"),
        ({"selection_warmup_steps": -0.2}, "selection_warmup_steps"),
        ({"train_sampling_strategy": "batch_rebalance"}, "train_sampling_strategy"),
        ({"dataloader_drop_last": True}, "dataloader_drop_last"),
    ],
)
def test_invalid_fields_raise_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=f"`{field_name}"):
        _config(**kwargs)


@pytest.mark.parametrize("strategy", ["random", "sequential", "group_by_length"])
def test_sampling_strategies_the_selection_sampler_applies(strategy):
    assert _config(train_sampling_strategy=strategy).train_sampling_strategy == strategy


def test_refused_sampler_options_name_the_fix():
    with pytest.raises(ValueError, match="Use 'random' \\(default\\), 'sequential' or 'group_by_length'"):
        _config(train_sampling_strategy="batch_rebalance")
    with pytest.raises(ValueError, match="never makes a partial last batch.*Leave it at False"):
        _config(dataloader_drop_last=True)


def test_rule_none_accepts_anything_dpo_accepts():
    config = _config(selection_rule="none", loss_type=["ipo"], max_steps=10)
    assert not config.selection_enabled


def test_slic_config_refuses_other_losses():
    with pytest.raises(ValueError, match="hinge"):
        _config(SelectiveSLiCConfig, loss_type=["sigmoid"])


def test_trl_parser_reads_the_selection_flags():
    parser = TrlParser((ScriptArguments, SelectiveDPOConfig, ModelConfig))
    _, config, _ = parser.parse_args_and_config(
        args=[
            "--output_dir",
            "x",
            "--bf16",
            "False",
            "--report_to",
            "none",
            "--selection_rule",
            "irm_band",
            "--irm_lo_percentile",
            "20",
            "--aux_learning_rate",
            "3e-4",
            "--aux_mode",
            "lora",
            "--aux_lora_r",
            "8",
            "--aux_lora_target_modules",
            "q_proj",
            "v_proj",
        ]
    )
    assert isinstance(config, SelectiveDPOConfig)
    assert config.selection_rule == "irm_band" and config.irm_lo_percentile == 20.0
    assert config.aux_learning_rate == 3e-4
    assert (config.aux_mode, config.aux_lora_r, config.aux_lora_target_modules) == ("lora", 8, ["q_proj", "v_proj"])


def test_deepspeed_precision_mismatch_is_refused_when_the_config_is_built(tmp_path):
    deepspeed = {
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }
    with pytest.raises(ValueError, match=r"(?s)ds bf16.enabled=False vs hf bf16.*'auto'"):
        SelectiveDPOConfig(output_dir=str(tmp_path), deepspeed=deepspeed, bf16=True, use_cpu=True)
    deepspeed["bf16"]["enabled"] = "auto"
    config = SelectiveDPOConfig(output_dir=str(tmp_path), deepspeed=deepspeed, bf16=True, use_cpu=True)
    assert config.hf_deepspeed_config.config["bf16"]["enabled"] is True


def test_public_api_resolves_lazily_and_completely():
    import importlib
    import subprocess
    import sys

    import trl_select

    assert sorted(trl_select.__all__) == sorted(trl_select._EXPORTS)
    for name in trl_select.__all__:
        assert getattr(trl_select, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'SelectiveDPOTrainr'"):
        trl_select.SelectiveDPOTrainr  # noqa: B018
    assert importlib.import_module("trl_select.cli").main is not None
    # The CLI (e.g. `trl-select plot`) starts without importing the trainer stack
    code = "import sys, trl_select.cli; print(any(m.startswith(('trl.', 'transformers')) for m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
