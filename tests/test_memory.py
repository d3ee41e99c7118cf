"""The memory model (`trl_select.memory`) against hand-computed values, and the construction-time aux warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from tests.testing_utils import fast_config, reference_copy
from trl_select import SelectiveDPOTrainer
from trl_select.memory import (
    BF16_MIXED,
    FP32,
    GIB,
    LinearShape,
    ModelShape,
    memory_breakdown,
    warn_if_aux_memory_costly,
)


# Llama-2-7B and Llama-2-70B (grouped-query attention, 8 KV heads)
LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
LLAMA_70B = {
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
# embedding + LM head 2·32000·4096 = 262,144,000; per layer 4·4096² (attention) + 3·4096·11008 (MLP) + 2·4096 (norms)
# = 202,383,360, times 32 = 6,476,267,520; final norm 4096
P7 = 6_738_415_616
# per layer: q, o 8192² each, k, v 8192·1024 each, MLP 3·8192·28672, norms 2·8192 = 855,654,400; ·80 + 2·32000·8192
# + 8192
P70 = 68_976_648_192


def test_parameter_counts_of_llama_7b_and_70b():
    assert ModelShape.from_config(LLAMA_7B).num_parameters == P7
    assert ModelShape.from_config(LLAMA_70B).num_parameters == P70
    # tied embeddings drop the LM head, 32000·4096 parameters
    assert ModelShape.from_config({**LLAMA_7B, "tie_word_embeddings": True}).num_parameters == P7 - 32000 * 4096


def test_lora_adapter_sizes():
    shape = ModelShape.from_config(LLAMA_7B)
    # r·(d_in + d_out) per matrix: q, k, v, o are 4096 → 4096: 16·8192 each, 4 per layer, 32 layers
    assert shape.lora_parameters(16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 32 * 4 * 16 * 8192 == 16_777_216
    # all linear layers but the LM head: + gate, up (4096 → 11008) and down (11008 → 4096), 16·15104 each
    assert shape.lora_parameters(16) == 32 * (4 * 16 * 8192 + 3 * 16 * 15104) == 39_976_960
    # grouped-query attention: k and v are 8192 → 1024
    shape_70b = ModelShape.from_config(LLAMA_70B)
    assert shape_70b.lora_parameters(8, ["k_proj"]) == 80 * 8 * (8192 + 1024)


def test_plain_dpo_is_16_bytes_per_parameter_plus_2_for_the_reference():
    shape = ModelShape.from_config(LLAMA_7B)
    plain = memory_breakdown(shape, strategy="ddp", world_size=8)
    assert (plain.policy_weights, plain.policy_gradients, plain.policy_master, plain.policy_optimizer) == (
        2 * P7,
        2 * P7,
        4 * P7,
        8 * P7,
    )
    assert plain.reference == 2 * P7 and plain.frozen_base == 0 and plain.aux == 0
    assert plain.plain == plain.peak == 18 * P7
    assert plain.plain / GIB == pytest.approx(112.96, abs=0.01)


def test_full_copy_aux_adds_another_16_bytes_per_parameter():
    shape = ModelShape.from_config(LLAMA_7B)
    ddp = memory_breakdown(shape, aux="full", strategy="ddp", world_size=8)
    assert ddp.aux == 16 * P7
    assert ddp.peak == 34 * P7  # DDP's gradient buckets persist through the refresh
    assert ddp.ratio == pytest.approx(34 / 18)
    # single process: the policy's gradients are freed before the refresh, so the aux replaces them
    single = memory_breakdown(shape, aux="full")
    assert single.refresh == (2 + 4 + 8 + 2 + 16) * P7 and single.ratio == pytest.approx(32 / 18)
    assert memory_breakdown(shape, aux="full", gradients_persist=True).peak == 34 * P7


def test_zero_stages_divide_what_they_shard():
    shape = ModelShape(num_parameters=800, linears=(LinearShape("q_proj", 10, 10, 4),))
    zero3 = memory_breakdown(shape, aux="full", strategy="zero3", world_size=8)
    assert zero3.plain == 18 * 800 // 8 and zero3.aux == 16 * 800 // 8
    zero2 = memory_breakdown(shape, strategy="zero2", world_size=8)
    # weights and reference whole, gradients + master + moments divided
    assert zero2.plain == (2 + 2) * 800 + (2 + 4 + 8) * 800 // 8
    zero1 = memory_breakdown(shape, strategy="zero1", world_size=8)
    assert zero1.plain == (2 + 2 + 2) * 800 + (4 + 8) * 800 // 8
    with pytest.raises(ValueError, match="strategy"):
        memory_breakdown(shape, strategy="fsdp", world_size=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world_size"):
        memory_breakdown(shape, strategy="single", world_size=2)


def test_lora_aux_on_a_full_fine_tuned_policy_adds_only_the_adapter():
    shape = ModelShape.from_config(LLAMA_7B)
    adapter = 39_976_960  # r 16, all linear layers but the LM head
    ddp = memory_breakdown(shape, aux="lora", strategy="ddp", world_size=8, aux_lora_r=16)
    assert ddp.aux == 16 * adapter and ddp.peak  # fp32 adapter + gradient + AdamW moments == 18 * P7 + 16 * adapter
    # ZeRO-3: the model states are divided by 8, the adapter is whole on every rank
    zero3 = memory_breakdown(shape, aux="lora", strategy="zero3", world_size=8, aux_lora_r=16)
    assert zero3.peak == 18 * P7 // 8 + 16 * adapter
    # single process: the adapter fits in the freed gradients' place, so the peak is plain DPO's
    assert memory_breakdown(shape, aux="lora").ratio == 1.0


def test_lora_policy_holds_a_frozen_base_and_no_reference():
    shape = ModelShape.from_config(LLAMA_7B)
    adapter = 16_777_216  # r 16 on q, k, v, o
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    plain = memory_breakdown(shape, policy="lora", lora_target_modules=targets, strategy="ddp", world_size=8)
    assert plain.frozen_base == 2 * P7 and plain.reference == 0
    assert plain.plain == 2 * P7 + 16 * adapter
    selective = memory_breakdown(
        shape, policy="lora", aux="full", lora_target_modules=targets, strategy="ddp", world_size=8
    )
    assert selective.aux == 16 * adapter  # the aux is a second adapter of the same shape
    assert selective.peak == 2 * P7 + 32 * adapter


def test_fp32_single_process_figures():
    shape = ModelShape(num_parameters=1000)
    full = memory_breakdown(shape, aux="full", precision=FP32)
    assert full.plain == 20 * 1000  # 4 + 4 + 8, reference 4
    assert full.refresh == (4 + 8 + 4 + 16) * 1000
    assert full.ratio == pytest.approx(1.6)
    assert BF16_MIXED.total == FP32.total == 16


def test_from_model_matches_from_config(tiny_model):
    from_model = ModelShape.from_model(tiny_model)
    assert from_model.num_parameters == sum(p.numel() for p in tiny_model.parameters())
    from_config = ModelShape.from_config(tiny_model.config)
    assert from_model.num_parameters == from_config.num_parameters
    for r in (1, 8):
        assert from_model.lora_parameters(r) == from_config.lora_parameters(r)
        assert from_model.lora_parameters(r, ["q_proj", "v_proj"]) == from_config.lora_parameters(
            r, ["q_proj", "v_proj"]
        )


# ----- the construction-time warning -----


def test_full_copy_aux_warns_and_names_the_lora_aux(tmp_path, tiny_model, tokenizer, pool, validation, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_select.memory"):
        SelectiveDPOTrainer(
            tiny_model,
            ref_model=reference_copy(tiny_model),
            args=fast_config(tmp_path, aux_mode="full"),
            train_dataset=pool,
            validation_dataset=validation,
            processing_class=tokenizer,
        )
    warnings = [r for r in caplog.records if r.name == "trl_select.memory"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert 'aux_mode="lora"' in message and "full copy" in message
    assert "+60%" in message  # fp32, one process: (4 + 8 + 4 + 16) / (4 + 4 + 8 + 4) = 1.6


@pytest.mark.parametrize("setting", ["peft", "no_aux", "lora_aux"])
def test_no_warning_without_a_full_copy_aux(tmp_path, tiny_model, tokenizer, pool, validation, caplog, setting):
    overrides = {"no_aux": {"selection_rule": "irm_band"}, "lora_aux": {"aux_mode": "lora"}}.get(setting, {})
    if setting == "peft":
        kwargs = {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])}
    else:
        kwargs = {"ref_model": reference_copy(tiny_model)}
    with caplog.at_level(logging.WARNING, logger="trl_select.memory"):
        SelectiveDPOTrainer(
            tiny_model,
            args=fast_config(tmp_path, **overrides),
            train_dataset=pool,
            validation_dataset=validation,
            processing_class=tokenizer,
            **kwargs,
        )
    assert not [r for r in caplog.records if r.name == "trl_select.memory"]


def test_warning_threshold_and_aux_mode(tiny_model, caplog):
    accelerator = SimpleNamespace(num_processes=1, state=SimpleNamespace(deepspeed_plugin=None))
    args = SimpleNamespace(selection_enabled=True, needs_auxiliary=True, bf16=False, fp16=False)
    with caplog.at_level(logging.WARNING, logger="trl_select.memory"):
        # the full copy's +60% is under a 0.7 threshold: judged, not logged
        judged = warn_if_aux_memory_costly(args, tiny_model, accelerator, fraction=0.7)
        assert judged is not None and judged.ratio == pytest.approx(1.6)
        assert not caplog.records
        # aux_mode="lora" is the cheap mode: nothing to judge
        lora_args = SimpleNamespace(**vars(args), aux_mode="lora")
        assert warn_if_aux_memory_costly(lora_args, tiny_model, accelerator) is None
        assert not caplog.records
        # bf16 without DeepSpeed: bf16 weights, gradients and AdamW moments (2 + 2 + 4), a 2-byte reference: +60% too
        warn_if_aux_memory_costly(args, tiny_model.to(torch.bfloat16), accelerator)
    assert len(caplog.records) == 1 and "+60%" in caplog.records[0].getMessage()
