"""Selection trains on tiny random models of the common causal-LM families, full fine-tuning and LoRA.

Each case runs the whole loop on the CPU in about a second: a warm-up epoch on 48 reverse-digits pairs, one
LossDiff-IRM selection (reference pass, policy pass, a one-step auxiliary model, the rule), and a second epoch on the
selected pairs. What differs between families, and so what this guards: attention and MLP modules (GQA, sliding
window, soft-capping, fused QKV, Conv1D), position schemes, tied embeddings (Gemma, GPT-2, OPT), `pad_token_id`
defaults, and for Qwen3-MoE TRL's router auxiliary loss (`output_router_logits`), which must train alongside the
selection passes. Models use their default attention (SDPA), as users get it; Gemma 2 uses eager, as transformers asks.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig

from trl_select import SelectiveDPOTrainer, read_history

from .testing_utils import fast_config


WIDTH = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
ROPE = {**WIDTH, "num_key_value_heads": 1, "max_position_embeddings": 64}  # GQA: 2 query heads share 1 key/value head

# family -> (config class, model class, config fields beyond the vocabulary and special tokens)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", ROPE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", ROPE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**ROPE, "head_dim": 8}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            **ROPE,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "decoder_sparse_step": 1,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.01,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**ROPE, "sliding_window": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**ROPE, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**ROPE, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ROPE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**WIDTH, "max_position_embeddings": 64}),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 16,
            "ffn_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 16,
            "max_position_embeddings": 64,
        },
    ),
}
# LoRA on two families with different module layouts: separate q/v projections, and GPT-2's fused Conv1D `c_attn`
# (whose weight is stored transposed, hence `fan_in_fan_out`).
LORA: dict[str, dict[str, Any]] = {
    "qwen2": {"target_modules": ["q_proj", "v_proj"]},
    "gpt2": {"target_modules": ["c_attn"], "fan_in_fan_out": True},
}


def build_tiny(family: str, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedModel:
    """A randomly initialised fp32 model of `family`, sized for the char tokenizer, with its special tokens."""
    config_name, model_name, fields = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    if family == "gemma2":
        config._attn_implementation = "eager"  # its attention soft-capping is implemented in eager attention only
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


CASES = [pytest.param(family, None, id=family) for family in FAMILIES] + [
    pytest.param(family, lora, id=f"{family}-lora") for family, lora in LORA.items()
]


@pytest.mark.parametrize("family, lora", CASES)
def test_selection_trains_each_model_family(tmp_path, tokenizer, pool, validation, family, lora):
    model = build_tiny(family, tokenizer)
    extra: dict[str, Any] = (
        {"peft_config": LoraConfig(r=4, lora_alpha=8, **lora)}
        if lora
        else {"ref_model": build_tiny(family, tokenizer)}  # same seed: identical weights, no hub path needed
    )
    args = fast_config(
        tmp_path,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        aux_max_steps=1,
        learning_rate=5e-3,
    )
    trainer = SelectiveDPOTrainer(
        model,
        args=args,
        train_dataset=pool.select(range(48)),
        eval_dataset=validation.select(range(16)),
        processing_class=tokenizer,
        **extra,
    )
    trainer.train()

    warmup, selection = read_history(tmp_path)
    assert warmup["event"] == "warmup" and len(warmup["selected_ids"]) == 48
    assert selection["event"] == "selection"
    assert set(selection["selected_ids"]) < set(warmup["selected_ids"])  # a strict subset
    assert selection["num_selected"] >= 8  # at least one batch
    logs = trainer.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    assert len(losses) == 6 + math.ceil(selection["num_selected"] / 8)  # each epoch trained exactly its pairs
    assert all(math.isfinite(loss) for loss in losses)
    if family == "qwen3_moe":
        assert trainer.aux_loss_enabled
        router_losses = [h["aux_loss"] for h in logs if "aux_loss" in h]
        assert len(router_losses) == len(losses) and all(math.isfinite(v) and v > 0 for v in router_losses)
    if lora:
        trained = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert trained and any(p.abs().sum() > 0 for p in trained)  # the adapter moved from its zero init
