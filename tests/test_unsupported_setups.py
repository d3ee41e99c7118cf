"""Setups selection cannot run are refused when the config or trainer is built, naming the setting and what to use.

Once, FSDP and tensor/context/sequence parallelism were neither supported nor refused, and a vision-language
dataset trained its warm-up epoch, then crashed at the first selection (TRL leaves it untokenized). Each refusal here
fires before any model forward, so a user learns it in seconds rather than after an epoch.
"""

from __future__ import annotations

import copy

import pytest
from accelerate import ParallelismConfig
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl import DPOTrainer

from trl_select import SelectiveDPOTrainer

from .testing_utils import fast_config


@pytest.fixture
def no_parent_init(monkeypatch):
    """Make reaching `DPOTrainer.__init__` an error: a refusal must come before TRL loads or prepares anything."""

    def reached(*args, **kwargs):
        raise AssertionError("DPOTrainer.__init__ was reached: the refusal came after the expensive work")

    monkeypatch.setattr(DPOTrainer, "__init__", reached)


# ----- FSDP and tensor / context / sequence parallelism -----

SUPPORTED = "DDP.*DeepSpeed ZeRO-2 or ZeRO-3.*FSDP2"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fsdp": True, "fsdp_config": {"version": 1}}, r"`fsdp=True`: FSDP version 1 .*only FSDP2"),
        (  # transformers turns the legacy string into True
            {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 1}},
            r"`fsdp=True`: FSDP version 1",
        ),
        ({"fsdp": True, "fsdp_config": {"cpu_offload": True}}, r"FSDP2 with CPU parameter offload"),
        ({"fsdp": True, "fsdp_config": {"activation_checkpointing": True}}, r"FSDP's own activation checkpointing"),
        ({"parallelism_config": ParallelismConfig(tp_size=2)}, r"`parallelism_config.tp_size=2`.*tensor parallelism"),
        ({"parallelism_config": ParallelismConfig(cp_size=2)}, r"`parallelism_config.cp_size=2`.*context parallelism"),
        ({"parallelism_config": ParallelismConfig(sp_size=2)}, r"`parallelism_config.sp_size=2`.*sequence paral"),
        ({"parallelism_config": ParallelismConfig(dp_shard_size=2)}, r"`parallelism_config.dp_shard_size=2`.*FSDP"),
        (
            {
                "deepspeed": {
                    "tensor_parallel": {"autotp_size": 2},
                    "zero_optimization": {"stage": 2},
                    "train_micro_batch_size_per_gpu": "auto",
                    "gradient_accumulation_steps": "auto",
                }
            },
            r"`tensor_parallel.autotp_size=2`",
        ),
    ],
    ids=[
        "fsdp1",
        "fsdp1_legacy_string",
        "fsdp2_offload",
        "fsdp2_own_checkpointing",
        "tp",
        "cp",
        "sp",
        "dp_shard",
        "deepspeed_autotp",
    ],
)
def test_sharded_and_model_parallel_setups_are_refused_by_the_config(tmp_path, settings, message):
    with pytest.raises(
        ValueError, match=f"{message}.*not supported with `selection_rule='lossdiff_irm'`.*{SUPPORTED}"
    ):
        fast_config(tmp_path, **settings)
    # Without selection the trainer is exactly DPOTrainer, so the setting stays the user's business
    fast_config(tmp_path, selection_rule="none", **settings)


def test_plain_data_parallel_settings_pass(tmp_path):
    config = fast_config(tmp_path, parallelism_config=ParallelismConfig(dp_replicate_size=1), fsdp_config={})
    assert config.parallelism_config.tp_size == 1 and not config.fsdp


def test_fsdp2_passes(tmp_path):
    # transformers 5.23 builds an FSDP2 plugin for `fsdp=True` unless `fsdp_config['version'] = 1`
    assert fast_config(tmp_path, fsdp=True).fsdp
    assert fast_config(tmp_path, fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": False}).fsdp


def test_fsdp1_from_accelerate_launch_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --use_fsdp` (or an FSDP accelerate config) reaches the trainer only as these variables;
    # accelerate 1.15 reads a missing `FSDP_VERSION` as FSDP1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=f"`ACCELERATE_USE_FSDP=true`.*FSDP version 1.*{SUPPORTED}"):
        fast_config(tmp_path)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1"):
        fast_config(tmp_path)
    fast_config(tmp_path, selection_rule="none")


def test_fsdp2_from_accelerate_launch_passes_without_offload(tmp_path, monkeypatch):
    # what `accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml` sets
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    fast_config(tmp_path)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="FSDP2 with CPU parameter offload"):
        fast_config(tmp_path)


def test_full_copy_aux_under_fsdp2_is_refused_before_trl_runs(
    tmp_path, tokenizer, tiny_model, pool, validation, no_parent_init
):
    # torch cannot deep-copy a `fully_shard`-ed module (tests/test_distributed.py runs it: refused at construction)
    with pytest.raises(
        ValueError, match=r"`aux_mode='full'` under FSDP2.*FSDP does not support deepcopy.*aux_mode='lora'"
    ):
        SelectiveDPOTrainer(
            tiny_model,
            args=fast_config(tmp_path, fsdp=True, aux_mode="full"),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )


def test_full_copy_aux_under_fsdp2_is_fine_for_a_peft_policy_or_a_rule_without_aux(tmp_path):
    from trl_select.validation import check_fsdp_aux_supported

    args = fast_config(tmp_path, fsdp=True, aux_mode="full")
    check_fsdp_aux_supported(args, peft_policy=True)  # θ_aux is a second adapter
    check_fsdp_aux_supported(fast_config(tmp_path, fsdp=True, aux_mode="lora"), peft_policy=False)
    check_fsdp_aux_supported(fast_config(tmp_path, fsdp=True, aux_mode="full", selection_rule="none"), False)
    check_fsdp_aux_supported(fast_config(tmp_path, aux_mode="full"), peft_policy=False)  # no FSDP


def test_fsdp1_switched_on_after_the_config_is_refused_by_the_trainer(
    tmp_path, monkeypatch, tokenizer, tiny_model, pool, validation, no_parent_init
):
    args = fast_config(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    with pytest.raises(ValueError, match="`ACCELERATE_USE_FSDP=1`"):
        SelectiveDPOTrainer(
            tiny_model, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer
        )


def test_a_tensor_parallel_model_is_refused(tmp_path, tokenizer, tiny_model, pool, validation, no_parent_init):
    tiny_model._tp_size = 2  # what `from_pretrained(..., tp_plan="auto")` sets on 2 ranks
    with pytest.raises(ValueError, match=f"tensor-parallel.*`tp_plan`.*{SUPPORTED}"):
        SelectiveDPOTrainer(
            tiny_model,
            args=fast_config(tmp_path),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )
    # ... and a model TRL would load tensor-parallel from its path
    with pytest.raises(ValueError, match=f"`model_init_kwargs\\['tp_plan'\\]='auto'`.*{SUPPORTED}"):
        SelectiveDPOTrainer(
            "local/checkpoint",
            args=fast_config(tmp_path, model_init_kwargs={"tp_plan": "auto"}),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )


def test_dispatched_batches_are_refused_before_trl_runs(
    tmp_path, tokenizer, tiny_model, pool, validation, no_parent_init
):
    # The main process would read each training batch and split it over the ranks, but each rank's batch is its own
    with pytest.raises(
        ValueError, match=r"`accelerator_config=\{'dispatch_batches': True\}`.*Leave `dispatch_batches` unset"
    ):
        SelectiveDPOTrainer(
            tiny_model,
            args=fast_config(tmp_path, accelerator_config={"dispatch_batches": True}),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )


def test_fsdp_of_unknown_version_in_a_preconfigured_accelerate_state_is_refused(
    tmp_path, monkeypatch, tokenizer, tiny_model, pool, validation
):
    # `use_configured_state=True` reuses an AcceleratorState whose FSDP plugin no argument shows; stand one in
    original = DPOTrainer.__init__

    def with_fsdp_plugin(self, *args, **kwargs):
        original(self, *args, **kwargs)
        monkeypatch.setattr(type(self.accelerator.state), "fsdp_plugin", object(), raising=False)

    monkeypatch.setattr(DPOTrainer, "__init__", with_fsdp_plugin)
    with pytest.raises(ValueError, match=f"Accelerator's FSDP plugin: FSDP of unknown version.*{SUPPORTED}"):
        SelectiveDPOTrainer(
            tiny_model,
            ref_model=copy.deepcopy(tiny_model),
            args=fast_config(tmp_path),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )


# ----- vision-language datasets -----


class TextOnlyProcessor(ProcessorMixin):
    """The cheapest `ProcessorMixin` TRL accepts: the char tokenizer, images ignored (the rows below carry none).

    With it and an `images` column, TRL takes its vision path (no tokenization up front, the vision collator) and the
    tiny Llama trains on the text; on the old code that warm-up epoch ran and the first selection then failed with
    "The dataset has no ['prompt_ids', 'chosen_ids', 'rejected_ids'] column(s)".
    """

    attributes = ["tokenizer"]
    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)

    def __call__(self, images=None, text=None, **kwargs):
        return self.tokenizer(text, **kwargs)


def _with_images(dataset: Dataset, column: str = "images") -> Dataset:
    return dataset.add_column(column, [[] if column == "images" else None] * len(dataset))


def _build_vision(tmp_path, model, processor, train, validation, **overrides):
    return SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=fast_config(tmp_path, **overrides),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
    )


VISION_FIX = r"selection rescores the pool from tokenized text pairs.*`selection_rule='none'`"


def test_a_vision_dataset_is_refused_before_trl_runs(
    tmp_path, tokenizer, tiny_model, pool, validation, no_parent_init
):
    with pytest.raises(ValueError, match=f"`train_dataset` has an `images` column.*{VISION_FIX}"):
        _build_vision(tmp_path, tiny_model, TextOnlyProcessor(tokenizer), _with_images(pool), validation)
    # TRL's other spelling, a single `image`, and with a plain tokenizer (TRL would blame the model instead)
    with pytest.raises(ValueError, match=f"`train_dataset` has an `image` column.*{VISION_FIX}"):
        _build_vision(tmp_path, tiny_model, tokenizer, _with_images(pool, "image"), validation)
    with pytest.raises(ValueError, match=f"`validation_dataset` has an `images` column.*{VISION_FIX}"):
        _build_vision(tmp_path, tiny_model, tokenizer, pool, _with_images(validation))


def test_a_vision_dataset_without_selection_is_left_to_trl(tmp_path, tokenizer, tiny_model, pool, no_parent_init):
    with pytest.raises(AssertionError, match="DPOTrainer.__init__ was reached"):
        _build_vision(
            tmp_path, tiny_model, TextOnlyProcessor(tokenizer), _with_images(pool), None, selection_rule="none"
        )


def test_the_vision_dataset_that_crashed_after_warm_up_now_fails_at_construction(
    tmp_path, tokenizer, tiny_model, pool, validation
):
    """End to end, no patching: the exact setup that trained one epoch and then crashed at the first selection."""
    train = _with_images(pool.select(range(48)))
    with pytest.raises(ValueError, match=f"`train_dataset` has an `images` column.*{VISION_FIX}"):
        trainer = _build_vision(
            tmp_path,
            tiny_model,
            TextOnlyProcessor(tokenizer),
            train,
            _with_images(validation.select(range(16))),
            num_train_epochs=2,
            per_device_train_batch_size=8,
            aux_max_steps=1,
        )
        trainer.train()  # the old code got here, trained the warm-up epoch, then failed
    assert not (tmp_path / "selection_history.jsonl").exists()  # nothing trained


@pytest.mark.parametrize(
    "plugin_kwargs, message",
    [
        ({"fsdp_version": 2}, None),
        ({"fsdp_version": 2, "cpu_offload": True}, "FSDP2 with CPU parameter offload"),
        ({"fsdp_version": 2, "activation_checkpointing": True}, "FSDP's own activation checkpointing"),
        ({"fsdp_version": 1}, "FSDP version 1"),
    ],
    ids=["fsdp2", "fsdp2_offload", "fsdp2_own_checkpointing", "fsdp1"],
)
def test_an_accelerate_fsdp_plugin_is_read_by_version_and_options(tmp_path, plugin_kwargs, message):
    """The plugin a trainer's accelerator carries (from `fsdp=True`, an accelerate config, or a configured state)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from trl_select.validation import unsupported_distributed_settings

    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**plugin_kwargs)))
    found = unsupported_distributed_settings(fast_config(tmp_path), environ={}, accelerator=accelerator)
    if message is None:
        assert found == []
    else:
        assert len(found) == 1 and message in found[0] and "the Accelerator's FSDP plugin" in found[0]
