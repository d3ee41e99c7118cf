"""The aux model and the references it is aligned against, under configurations that were once wrong.

- `precompute_ref_log_probs=True`, no `ref_model`, a separate `validation_dataset`: the validation reference must be
  π_ref (the policy before training), never the policy at the first selection.
- `ref_chosen_logps`/`ref_rejected_logps` columns are TRL's precompute cache: read only when precomputing.
- A bf16 LoRA policy adapter: the aux adapter starts as an exact copy (same dtype), so LossDiff is exactly 0 before any
  alignment step.
- fp16: the aux stage scales its loss and skips non-finite steps, and says how many it skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

from trl_select import SelectiveDPOTrainer
from trl_select.auxiliary import AuxiliaryModel
from trl_select.scores import PairLogProbs, loss_difference, preference_loss, reference_normalised_margin
from trl_select.scoring import build_pass_loader, inference_mode, run_log_prob_pass, sequence_log_probs
from trl_select.testing import build_tiny_llama

from .testing_utils import fast_config


def _log_probs(model: torch.nn.Module, dataset, trainer) -> PairLogProbs:
    """`model`'s summed completion log-probs over a tokenized `dataset`, in row order, with the trainer's collator."""
    loader = build_pass_loader(dataset, trainer.data_collator, trainer.accelerator, 32)
    with inference_mode(model):
        return run_log_prob_pass(
            loader, lambda batch: sequence_log_probs(model, batch), trainer.accelerator, len(dataset), desc="test"
        )


def _assert_log_probs_close(actual: PairLogProbs, expected: PairLogProbs) -> None:
    # Different batch compositions pad differently; fp32 on the CPU agrees to well below a millinat
    torch.testing.assert_close(actual.chosen, expected.chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(actual.rejected, expected.rejected, rtol=0, atol=1e-4)


def test_precomputed_reference_of_a_separate_validation_set_is_the_initial_policy(
    tmp_path, tokenizer, pool, validation
):
    """The shipped recipe's default path with `eval_strategy="no"`: validation pairs passed apart from `eval_dataset`."""
    model = build_tiny_llama(tokenizer, seed=0)
    initial = copy.deepcopy(model)  # π_ref: the policy before any step
    add_fused_lm_head(initial)
    args = fast_config(tmp_path, num_train_epochs=1, precompute_ref_log_probs=True)
    trainer = SelectiveDPOTrainer(
        model, args=args, train_dataset=pool, validation_dataset=validation, processing_class=tokenizer
    )
    assert trainer.ref_model is None and trainer.eval_dataset is None
    trainer.train()  # one warm-up epoch: the policy moves away from π_ref
    engine = trainer.selection_engine
    validation_set = engine.validation_dataset

    true_validation_reference = _log_probs(initial, validation_set, trainer)
    _assert_log_probs_close(engine.reference_log_probs(), _log_probs(initial, trainer.train_dataset, trainer))
    _assert_log_probs_close(engine.validation_reference_log_probs(), true_validation_reference)

    result = engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    policy = _log_probs(trainer.accelerator.unwrap_model(trainer.model), validation_set, trainer)
    margin = reference_normalised_margin(policy, true_validation_reference)
    expected = float(preference_loss(margin, args.beta, "sigmoid").mean())
    # With the policy as its own reference every margin is 0 and the loss exactly log 2
    assert abs(result.validation_loss_before - math.log(2)) > 1e-3
    assert result.validation_loss_before == pytest.approx(expected, abs=1e-5)
    # Precomputing keeps no reference copy: a dataset without the columns has no reference to be scored with
    bare = validation_set.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    loader = build_pass_loader(bare, trainer.data_collator, trainer.accelerator, 32)
    with pytest.raises(RuntimeError, match="No reference model to score with"):
        trainer.reference_log_probs(bare, loader)


def test_reference_columns_are_read_only_when_precomputing(tmp_path, tokenizer, pool, validation):
    """Columns named like TRL's precompute cache, without `precompute_ref_log_probs`: the live `ref_model` decides."""

    def with_bogus_reference(dataset):
        return dataset.add_column("ref_chosen_logps", [0.0] * len(dataset)).add_column(
            "ref_rejected_logps", [0.0] * len(dataset)
        )

    model = build_tiny_llama(tokenizer, seed=0)
    reference = copy.deepcopy(model)
    args = fast_config(tmp_path, num_train_epochs=1)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=reference,
        args=args,
        train_dataset=with_bogus_reference(pool),
        validation_dataset=with_bogus_reference(validation),
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    assert "ref_chosen_logps" in trainer.train_dataset.column_names  # the columns survived TRL's preprocessing
    live = trainer.accelerator.unwrap_model(trainer.ref_model)
    pool_reference = engine.reference_log_probs()
    assert bool((pool_reference.chosen < -1).all())  # not the zeros in the columns
    _assert_log_probs_close(pool_reference, _log_probs(live, trainer.train_dataset, trainer))
    _assert_log_probs_close(
        engine.validation_reference_log_probs(), _log_probs(live, engine.validation_dataset, trainer)
    )


def test_bf16_lora_aux_adapter_starts_as_an_exact_copy(tmp_path, tokenizer, pool, validation):
    """θ_aux = θ_t before alignment (learning rate 0): LossDiff is exactly 0 for every pair, no dtype offset."""
    base = build_tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    # Random (non-zero) B so the adapter changes the outputs; bf16 like ZeRO-3 + LoRA or QLoRA policies
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    # bf16 weights without autocast, as under DeepSpeed bf16 (autocast would round an fp32 adapter's matmuls to bf16)
    args = fast_config(tmp_path, num_train_epochs=1)
    trainer = SelectiveDPOTrainer(
        model, args=args, train_dataset=pool, validation_dataset=validation, processing_class=tokenizer
    )
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0, max_steps=1)
    aux_dtypes: set[torch.dtype] = set()
    align = AuxiliaryModel._align

    def recording_align(self, aux):
        aux_dtypes.update(p.dtype for p in aux.module.parameters() if p.requires_grad)
        return align(self, aux)

    AuxiliaryModel._align = recording_align
    try:
        result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    finally:
        AuxiliaryModel._align = align
    policy, reference = engine.policy_log_probs(), engine.reference_log_probs()
    assert (result.pool_log_probs.chosen - policy.chosen).abs().max() == 0
    assert (result.pool_log_probs.rejected - policy.rejected).abs().max() == 0
    lossdiff = loss_difference(policy, result.pool_log_probs, reference, args.beta, "sigmoid")
    assert torch.equal(lossdiff, torch.zeros_like(lossdiff))
    assert result.validation_loss_before == result.validation_loss_after
    assert aux_dtypes == {torch.bfloat16}


def test_fp16_aux_stage_scales_its_loss_and_skips_non_finite_steps(tmp_path, tokenizer, pool, validation, monkeypatch):
    """A step whose gradients overflow is skipped (θ_aux stays finite), counted, and reported in the metrics."""
    model = build_tiny_llama(tokenizer, seed=0)
    args = fast_config(tmp_path, num_train_epochs=1, fp16=True, aux_max_steps=4)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pool,
        validation_dataset=validation,
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    assert engine.auxiliary().settings.loss_scaling  # fp16 without DeepSpeed: the aux stage scales its loss

    calls = {"n": 0}
    batch_loss = AuxiliaryModel._batch_loss

    def overflowing_second_step(self, module, batch):
        loss = batch_loss(self, module, batch)
        if module.training:  # alignment steps only, not the validation-loss passes
            calls["n"] += 1
            if calls["n"] == 2:
                return loss * float("inf")
        return loss

    monkeypatch.setattr(AuxiliaryModel, "_batch_loss", overflowing_second_step)
    metrics: dict[str, float] = {}
    aux_log_probs = trainer.selection_engine.auxiliary_log_probs(1, metrics)
    assert calls["n"] == 4
    assert metrics["selection/aux/steps"] == 4.0
    assert metrics["selection/aux/skipped_steps"] == 1.0
    assert bool(torch.isfinite(aux_log_probs.chosen).all() and torch.isfinite(aux_log_probs.rejected).all())
    assert metrics["selection/aux/val_loss_after"] < metrics["selection/aux/val_loss_before"]
    # The next refresh starts from the lowered scale instead of finding it again
    assert engine.auxiliary().grad_scaler_state["scale"] == 2.0**15


def test_fp16_loss_scaling_leaves_finite_steps_unchanged(tmp_path, tokenizer, pool, validation):
    """The scale is a power of two, undone before clipping and the step: a finite stage is the unscaled one."""
    model = build_tiny_llama(tokenizer, seed=0)
    args = fast_config(tmp_path, num_train_epochs=1, aux_max_steps=3)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pool,
        validation_dataset=validation,
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    assert not auxiliary.settings.loss_scaling
    plain = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    auxiliary.num_refreshes = 0  # the same shuffle
    auxiliary.settings = dataclasses.replace(auxiliary.settings, loss_scaling=True)
    scaled = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert scaled.skipped_steps == plain.skipped_steps == 0
    torch.testing.assert_close(scaled.pool_log_probs.chosen, plain.pool_log_probs.chosen, rtol=1e-6, atol=1e-6)
    assert scaled.validation_loss_after == pytest.approx(plain.validation_loss_after, rel=1e-6)
    assert scaled.validation_loss_after < scaled.validation_loss_before
