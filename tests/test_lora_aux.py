"""`aux_mode="lora"`: θ_aux = θ_t + a LoRA update injected into a fully fine-tuned policy for the aux stage only.

What must hold: no second copy of the weights and no second full optimizer state (only the adapter
trains); θ_aux = θ_t exactly before any aux step (B = 0); alignment lowers the validation loss; after the refresh no
LoRA module is left, and the policy's module tree, `requires_grad` flags, weights, gradients, optimizer state, LR
schedule and RNG streams are as before. The 2-process DDP and ZeRO-3 variants are in `test_distributed.py`.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer, read_history
from trl_select.auxiliary import INJECTED_AUX_ADAPTER, AuxiliaryModel
from trl_select.scores import loss_difference
from trl_select.testing import build_tiny_llama

from .test_model_families import FAMILIES, build_tiny
from .testing_utils import fast_config


def _trainer(tmp_path, tokenizer, pool, validation, model=None, **overrides) -> SelectiveDPOTrainer:
    model = model if model is not None else build_tiny_llama(tokenizer, seed=0)
    settings = {"num_train_epochs": 1, "aux_mode": "lora", "aux_max_steps": 4, **overrides}
    return SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=fast_config(tmp_path, **settings),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )


def _record_aux_parameters(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Each alignment stage's trainable parameters (name -> a copy at the stage's start), recorded inside `_align`."""
    stages: list[dict[str, torch.Tensor]] = []
    align = AuxiliaryModel._align

    def recording_align(self, aux):
        stages.append({n: p.detach().clone() for n, p in aux.module.named_parameters() if p.requires_grad})
        return align(self, aux)

    monkeypatch.setattr(AuxiliaryModel, "_align", recording_align)
    return stages


def _lora_numel(model: torch.nn.Module, rank: int) -> int:
    """r·(d_in + d_out) summed over every linear layer but the output head: what `all-linear` adapts."""
    head = model.get_output_embeddings()
    return sum(
        rank * (module.in_features + module.out_features)
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )


def _optimizer_state_bytes(trainer) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save((trainer.optimizer.state_dict(), trainer.lr_scheduler.state_dict()), buffer)
    return buffer.getvalue()


def test_lora_aux_equals_the_policy_before_any_step(tmp_path, tokenizer, pool, validation, monkeypatch):
    """B = 0 at injection: with learning rate 0 the aux pool log-probs are the policy's bit for bit, LossDiff is 0."""
    trainer = _trainer(tmp_path, tokenizer, pool, validation)
    trainer.train()
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0, max_steps=2)
    stages = _record_aux_parameters(monkeypatch)
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    policy, reference = engine.policy_log_probs(), engine.reference_log_probs()
    assert torch.equal(result.pool_log_probs.chosen, policy.chosen)
    assert torch.equal(result.pool_log_probs.rejected, policy.rejected)
    lossdiff = loss_difference(policy, result.pool_log_probs, reference, trainer.args.beta, "sigmoid")
    assert torch.equal(lossdiff, torch.zeros_like(lossdiff))
    assert result.validation_loss_before == result.validation_loss_after
    # Only the injected adapter trains, B starts at 0 and A does not (else the adapter could never move)
    (trainable,) = stages
    assert trainable and all(f".{INJECTED_AUX_ADAPTER}." in name for name in trainable)
    assert all(not value.any() for name, value in trainable.items() if ".lora_B." in name)
    assert all(value.abs().sum() > 0 for name, value in trainable.items() if ".lora_A." in name)


def test_lora_aux_refresh_aligns_and_leaves_the_policy_exactly_as_it_was(
    tmp_path, tokenizer, pool, validation, monkeypatch
):
    model = build_tiny_llama(tokenizer, seed=0)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model=model)
    trainer.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # a mixed set of flags, to be restored as it was
    for parameter in model.parameters():  # gradients left over from the training step must survive too
        parameter.grad = torch.full_like(parameter, 0.25)
    modules_before = list(model.named_modules())
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    optimizer_before = _optimizer_state_bytes(trainer)
    stages = _record_aux_parameters(monkeypatch)

    engine = trainer.selection_engine
    result = engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)

    assert result.num_steps == 4
    assert result.validation_loss_after < result.validation_loss_before - 1e-3
    # The same module objects under the same names: no LoRA layer left, the original modules (and their hooks) back
    modules_after = list(model.named_modules())
    assert [(n, id(m)) for n, m in modules_after] == [(n, id(m)) for n, m in modules_before]
    assert not any(isinstance(m, LoraLayer) for _, m in modules_after)
    assert not any(INJECTED_AUX_ADAPTER in n for n, _ in model.named_parameters())
    assert "peft_config" not in model.__dict__
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights_before[name]), name
        assert torch.equal(parameter.grad, torch.full_like(parameter, 0.25)), name
        assert parameter.requires_grad == flags_before[name], name
    assert _optimizer_state_bytes(trainer) == optimizer_before
    # No second copy: the stage trained r·(d_in + d_out) parameters per linear layer, nothing of the policy
    (trainable,) = stages
    assert sum(t.numel() for t in trainable.values()) == _lora_numel(model, trainer.args.aux_lora_r)
    assert {t.dtype for t in trainable.values()} == {torch.float32}
    # The aux scores are not the policy's: the adapter moved
    assert not torch.equal(result.pool_log_probs.chosen, engine.policy_log_probs().chosen)


def test_lora_aux_is_seeded_the_same_on_every_refresh_of_the_same_index(tmp_path, tokenizer, pool, validation):
    """A is drawn from `seed + refresh`: the same refresh twice gives the same θ_aux (what keeps ranks identical)."""
    trainer = _trainer(tmp_path, tokenizer, pool, validation)
    trainer.train()
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    index = auxiliary.num_refreshes  # the run's in-epoch events have refreshed it already
    first = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    second = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    auxiliary.num_refreshes = index
    again = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert torch.equal(again.pool_log_probs.chosen, first.pool_log_probs.chosen)
    assert not torch.equal(second.pool_log_probs.chosen, first.pool_log_probs.chosen)


def test_lora_aux_adapter_takes_the_dtype_of_a_bf16_policy(tmp_path, tokenizer, pool, validation, monkeypatch):
    """PEFT upcasts a bf16 adapter to fp32; the injected aux adapter is cast back, like the PEFT aux adapter."""
    model = build_tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model=model)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0, max_steps=1)
    stages = _record_aux_parameters(monkeypatch)
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert {t.dtype for t in stages[0].values()} == {torch.bfloat16}
    assert torch.equal(result.pool_log_probs.chosen, engine.policy_log_probs().chosen)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_lora_aux_target_modules_and_rank(tmp_path, tokenizer, pool, validation, monkeypatch):
    trainer = _trainer(
        tmp_path, tokenizer, pool, validation, aux_lora_r=2, aux_lora_alpha=4, aux_lora_target_modules=["q_proj"]
    )
    stages = _record_aux_parameters(monkeypatch)
    engine = trainer.selection_engine
    engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    model = trainer.accelerator.unwrap_model(trainer.model)
    q_proj = [m for n, m in model.named_modules() if n.endswith("q_proj")]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in stages[0]} == {"q_proj"}
    assert sum(t.numel() for t in stages[0].values()) == sum(2 * (m.in_features + m.out_features) for m in q_proj)


def test_lora_aux_target_that_matches_nothing_is_an_error_and_leaves_the_policy_alone(
    tmp_path, tokenizer, pool, validation
):
    trainer = _trainer(tmp_path, tokenizer, pool, validation, aux_lora_target_modules=["no_such_layer"])
    model = trainer.accelerator.unwrap_model(trainer.model)
    modules_before = [(n, id(m)) for n, m in model.named_modules()]
    engine = trainer.selection_engine
    with pytest.raises(ValueError, match="no_such_layer"):
        engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert [(n, id(m)) for n, m in model.named_modules()] == modules_before
    assert all(p.requires_grad for p in model.parameters()) and "peft_config" not in model.__dict__


def test_lora_aux_with_gradient_checkpointing(tmp_path, tokenizer, pool, validation):
    """The aux backward runs with the trainer's activation checkpointing (the base frozen: the embedding outputs are
    made to require grad, as transformers does for PEFT), and checkpointing is still on afterwards."""
    trainer = _trainer(tmp_path, tokenizer, pool, validation, gradient_checkpointing=True)
    trainer.train()  # the Trainer turns checkpointing on when training starts
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.is_gradient_checkpointing
    engine = trainer.selection_engine
    result = engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert result.validation_loss_after < result.validation_loss_before - 1e-3
    assert model.is_gradient_checkpointing


def test_lora_aux_in_a_selective_run(tmp_path, tokenizer, pool, validation):
    """Warm-up, then two selection epochs, each after a LoRA aux refresh: the run selects, and ends with no adapter."""
    trainer = _trainer(tmp_path, tokenizer, pool, validation, num_train_epochs=3)
    trainer.train()
    history = read_history(tmp_path)
    assert [r["event"] for r in history] == ["warmup", "selection", "selection"]
    assert all(r["aux_refreshed"] for r in history[1:])
    assert 0 < history[1]["num_selected"] < 100
    logged = [log for log in trainer.state.log_history if "selection/aux/val_loss_after" in log]
    assert len(logged) == 2
    assert all(log["selection/aux/val_loss_after"] < log["selection/aux/val_loss_before"] for log in logged)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_peft_policy_ignores_aux_mode(tmp_path, tokenizer, pool, validation, monkeypatch):
    """With a PEFT policy θ_aux is always the second adapter: `aux_mode` changes nothing."""
    built: list[str] = []
    for name in ("_build_adapter", "_build_injected_lora"):
        original = getattr(AuxiliaryModel, name)

        def recording(self, _original=original, _name=name):
            built.append(_name)
            yield from _original(self)

        monkeypatch.setattr(AuxiliaryModel, name, recording)
    model = build_tiny_llama(tokenizer, seed=0)
    trainer = SelectiveDPOTrainer(
        model,
        args=fast_config(tmp_path, num_train_epochs=1, aux_mode="lora"),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    engine = trainer.selection_engine
    engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert built == ["_build_adapter"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aux_mode": "copy"}, r"`aux_mode` must be one of \['full', 'lora'\], got 'copy'"),
        ({"aux_lora_r": 0}, "`aux_lora_r` must be an integer >= 1, got 0"),
        ({"aux_lora_r": 2.5}, "`aux_lora_r` must be an integer >= 1"),
        ({"aux_lora_alpha": -1.0}, "`aux_lora_alpha` must be a number > 0"),
        ({"aux_lora_target_modules": []}, "`aux_lora_target_modules` must be unset"),
        ({"aux_lora_target_modules": ["q_proj", ""]}, "`aux_lora_target_modules` must be unset"),
    ],
)
def test_config_refuses_bad_lora_aux_fields(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SelectiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **overrides)


def test_config_lora_aux_defaults(tmp_path):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert (args.aux_lora_r, args.aux_lora_alpha, args.aux_lora_target_modules) == (16, 32.0, None)
    assert args.aux_mode == "lora"  # chosen on benchmarks/results/aux_fidelity.md: it selects as the full copy does


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_aux_on_each_model_family(tmp_path, tokenizer, pool, validation, monkeypatch, family):
    """Injection and removal across module layouts: GQA, fused QKV, GPT-2's Conv1D (`fan_in_fan_out`), MoE routers,
    tied embeddings. Each family's θ_aux starts at θ_t (lr 0), aligns (the validation loss falls), and leaves the
    policy's modules and weights as they were."""
    model = build_tiny(family, tokenizer)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=build_tiny(family, tokenizer),
        train_dataset=pool.select(range(48)),
        eval_dataset=validation.select(range(16)),
        processing_class=tokenizer,
        args=fast_config(
            tmp_path,
            num_train_epochs=1,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=16,
            aux_mode="lora",
            aux_max_steps=3,
            learning_rate=1e-2,
            aux_lora_r=4,
        ),
    )
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    modules_before = [(n, id(m)) for n, m in model.named_modules()]
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stages = _record_aux_parameters(monkeypatch)

    settings = auxiliary.settings
    auxiliary.settings = dataclasses.replace(settings, learning_rate=0.0, max_steps=1)
    identity = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert torch.equal(identity.pool_log_probs.chosen, engine.policy_log_probs().chosen)
    auxiliary.settings = settings
    aligned = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert aligned.validation_loss_after < aligned.validation_loss_before

    assert stages[0] and all(f".{INJECTED_AUX_ADAPTER}." in n for n in stages[0])
    assert not any("lm_head" in n or "embed_out" in n for n in stages[0])  # `all-linear` leaves the output head
    assert [(n, id(m)) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and "peft_config" not in model.__dict__
