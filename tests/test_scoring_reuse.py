"""`scoring_reuse`: the log-probs a selection event takes from the training steps instead of passes of its own."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig
from trl import DPOTrainer

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.checkpoint import STATE_FILENAME
from trl_select.sampler import SelectionSampler
from trl_select.scores import PairLogProbs
from trl_select.scoring import inference_mode, run_log_prob_pass, sequence_log_probs
from trl_select.testing import build_tiny_llama
from trl_select.training_log_probs import (
    POLICY,
    POOL_ROWS_KEY,
    REFERENCE,
    TrainingLogProbs,
    TrainingRowsCollator,
    active_dropout,
    combine_terms,
    fill_rows,
    missing_rows,
    record_terms,
)

from .recording import RecordingTrainer
from .test_model_families import build_tiny
from .testing_utils import fast_config, with_unequal_rejected


class _Scripted(torch.nn.Module):
    """Returns per-token log-probs `row value` at every position, so a pair's sum is `value * positions`, and, with
    `log_sum_sq`, that per-token `log Σ π²` (zero outside the completion, as the fused head's outputs are)."""

    def forward(self, values: torch.Tensor, width: int, log_sum_sq: float | None = None, mask=None):
        log_probs = values[:, None].expand(-1, width).clone()
        outputs = SimpleNamespace(log_probs=log_probs if mask is None else log_probs * mask)
        if log_sum_sq is not None:
            outputs.log_sum_sq_probs = torch.full_like(log_probs, log_sum_sq) * (1 if mask is None else mask)
        return outputs


def _micro_batch(recorder, module, chosen, rejected, rows, *, reference=None, width=4):
    mask = torch.ones(2 * len(chosen), width + 1, dtype=torch.long)
    with recorder.record([module], mask, torch.tensor(rows)):
        module(torch.tensor(chosen + rejected, dtype=torch.float32, requires_grad=True), width)
        if reference is not None:
            with torch.no_grad():
                module(torch.tensor(reference, dtype=torch.float32), width)


def test_records_each_pair_at_the_pool_row_its_batch_carries():
    recorder = TrainingLogProbs(pool_size=6)
    module = _Scripted()
    recorder.begin_epoch({POLICY, REFERENCE})
    # With grad: θ's forward; without: π_ref's (TRL runs the live reference under no_grad).
    _micro_batch(recorder, module, [1.0, 2.0], [-1.0, -2.0], [4, 1], reference=[0.5, 0.25, -0.5, -0.25])
    _micro_batch(recorder, module, [3.0, 4.0], [-3.0, -4.0], [0, 5])
    policy, reference = recorder.combined(POLICY), recorder.combined(REFERENCE)
    # 4 positions per sequence: the sum is 4 x the per-token value
    assert policy.chosen.tolist()[:2] == [12.0, 8.0] and policy.chosen[4] == 4.0 and policy.chosen[5] == 16.0
    assert policy.rejected[1] == -8.0 and policy.rejected[0] == -12.0
    assert reference.chosen[4] == 2.0 and reference.rejected[1] == -1.0
    assert missing_rows(policy) == [2, 3]
    assert missing_rows(reference) == [0, 2, 3, 5]  # the second batch had no live reference forward


def test_batches_in_any_order_record_the_same_values():
    # Worker processes with `dataloader_in_order=False`, or a resume, hand the planned batches in another order
    batches = [
        ([0, 1], [1.0, 2.0], [-1.0, -2.0]),
        ([2, 3], [3.0, 4.0], [-3.0, -4.0]),
        ([4, 5], [5.0, 6.0], [0.0, 1.0]),
    ]
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        recorder = TrainingLogProbs(pool_size=6)
        recorder.begin_epoch({POLICY})
        for index in order:
            rows, chosen, rejected = batches[index]
            _micro_batch(recorder, _Scripted(), chosen, rejected, rows)
        results.append(recorder.combined(POLICY))
    assert results[0].chosen.tolist() == results[1].chosen.tolist() == [4.0, 8.0, 12.0, 16.0, 20.0, 24.0]
    assert results[0].rejected.tolist() == results[1].rejected.tolist() == [-4.0, -8.0, -12.0, -16.0, 0.0, 4.0]


def test_a_batch_whose_pairs_do_not_match_its_rows_stops_recording(caplog):
    recorder = TrainingLogProbs(pool_size=4)
    recorder.begin_epoch({POLICY})
    _micro_batch(recorder, _Scripted(), [1.0, 1.0], [2.0, 2.0], [0, 1])
    _micro_batch(recorder, _Scripted(), [1.0], [2.0], [2, 3])  # one pair, two rows
    assert missing_rows(recorder.combined(POLICY)) == [0, 1, 2, 3]
    assert not recorder.recording
    assert "Not reusing the training steps' policy log-probs" in caplog.text


def test_nothing_is_recorded_when_not_asked():
    recorder = TrainingLogProbs(pool_size=2)
    recorder.begin_epoch(set())
    _micro_batch(recorder, _Scripted(), [1.0, 1.0], [2.0, 2.0], [0, 1])
    assert missing_rows(recorder.combined(POLICY)) == [0, 1]


def test_records_are_ld_dpo_sums_and_keep_the_policys_wpo_weight():
    recorder = TrainingLogProbs(pool_size=3, ld_alpha=0.25, use_weighting=True)
    module = _Scripted()
    recorder.begin_epoch({POLICY, REFERENCE})
    # 2 pairs, 6 positions: pair 0 has 4 vs 2 completion tokens (shared 2), pair 1 has 3 vs 3
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, (start, length) in enumerate([(1, 4), (2, 3), (3, 2), (2, 3)]):
        mask[row, start : start + length] = 1
    shift = mask[:, 1:].float()
    with recorder.record([module], mask, torch.tensor([2, 0])):
        module(torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True), 6, log_sum_sq=-0.5, mask=shift)
        with torch.no_grad():
            module(torch.tensor([-0.5, -0.5, -0.5, -0.5]), 6, log_sum_sq=-0.5, mask=shift)
    policy, reference = recorder.combined(POLICY), recorder.combined(REFERENCE)
    # Row 2 is pair 0: chosen 2 shared tokens + 0.25 x 2 tail tokens of -1, rejected 2 tokens of -3; row 0 is pair 1
    assert policy.chosen[2] == -2.5 and policy.rejected[2] == -6.0
    assert policy.chosen[0] == -6.0 and policy.rejected[0] == -12.0
    assert reference.chosen[2] == -1.25 and reference.rejected[2] == -1.0
    # WPO: log w = mean(log π - log Σπ²) over each completion's tokens, chosen + rejected; θ's only
    torch.testing.assert_close(policy.log_weight[[2, 0]], torch.tensor([(-1.0 + 0.5) + (-3.0 + 0.5), -1.5 + -3.5]))
    assert bool(policy.log_weight[1].isnan()) and reference.log_weight is None
    assert missing_rows(policy) == [1]
    # What a checkpoint restores comes back with its weight
    restored = TrainingLogProbs(pool_size=3, ld_alpha=0.25, use_weighting=True)
    restored.restore(POLICY, policy)
    torch.testing.assert_close(restored.combined(POLICY).log_weight, policy.log_weight, equal_nan=True)


def test_the_ranks_records_combine_from_sums_and_counts():
    nan = float("nan")
    # Three ranks' (pool 5, 2) buffers: disjoint rows, row 3 held by two ranks (two warm-up epochs), row 4 by none
    ranks = torch.tensor(
        [
            [[-1.0, -2.0], [nan, nan], [nan, nan], [-7.0, -8.0], [nan, nan]],
            [[nan, nan], [-3.0, -4.0], [nan, nan], [-9.0, -10.0], [nan, nan]],
            [[nan, nan], [nan, nan], [-5.0, -6.0], [nan, nan], [nan, nan]],
        ]
    )
    terms = torch.stack([record_terms(buffer) for buffer in ranks])
    assert terms.shape == (3, 5, 4)  # 16 bytes per pair in fp32, whatever the world size
    combined = combine_terms(terms.sum(dim=0))
    expected = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0], [-8.0, -9.0], [nan, nan]])
    torch.testing.assert_close(combined, expected, equal_nan=True)
    torch.testing.assert_close(combined[:4], ranks[:, :4].nanmean(dim=0))  # what gathering every buffer gave
    # A restored row on one rank only comes back bit for bit
    value = torch.tensor([[-0.1 / 3, -2.0 / 7]])
    alone = combine_terms(record_terms(value) + record_terms(torch.full_like(value, nan)))
    assert torch.equal(alone, value)
    # With WPO a third column (the policy's log-weight) combines alike: 24 bytes per pair
    weighted = torch.cat([ranks, torch.where(ranks[..., :1].isnan(), nan, -0.5)], dim=2)
    terms = torch.stack([record_terms(buffer) for buffer in weighted])
    assert terms.shape == (3, 5, 6)
    combined = combine_terms(terms.sum(dim=0))
    torch.testing.assert_close(combined[:, :2], expected, equal_nan=True)
    torch.testing.assert_close(combined[:4, 2], torch.full((4,), -0.5))


def test_active_dropout_finds_layers_and_functional_rates_in_training_mode_only():
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.1  # handed to the attention kernel when `self.training`, as HF models do
            self.is_causal = True

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0), Attention(), torch.nn.Dropout(0.2))
    assert active_dropout(model) == ["2.attention_dropout", "3"]
    model[2].attention_dropout = 0.0
    assert active_dropout(model) == ["3"]
    model.eval()
    assert active_dropout(model) == []


def test_active_dropout_with_adapters_off_leaves_out_the_adapters_dropout(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1)
    ).train()
    assert active_dropout(model) and all("lora_dropout" in name for name in active_dropout(model))
    assert active_dropout(model, adapters_off=True) == []  # the base model with the adapters off runs no dropout


def test_the_training_collator_tags_each_pair_with_its_pool_row():
    def collator(examples):
        return {"prompt": [example["prompt"] for example in examples]}

    # TRL dropped the pair of index 1: indices 0, 2, 3 are pool rows 0, 1, 2
    tagging = TrainingRowsCollator(collator, "index", np.array([0, -1, 1, 2]))
    batch = tagging([{"prompt": "c", "index": 3}, {"prompt": "a", "index": 0}])
    assert batch["prompt"] == ["c", "a"] and batch[POOL_ROWS_KEY].tolist() == [2, 0]


def test_fill_rows_replaces_only_the_given_rows():
    base = PairLogProbs(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([4.0, float("nan"), 6.0]))
    filled = fill_rows(base, [1], PairLogProbs(torch.tensor([9.0]), torch.tensor([8.0])))
    assert filled.chosen.tolist() == [1.0, 9.0, 3.0] and filled.rejected.tolist() == [4.0, 8.0, 6.0]
    assert torch.isnan(base.chosen[1])  # the input is not modified


def test_config_refuses_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="scoring_reuse"):
        fast_config(tmp_path, scoring_reuse="policy")


# ----- end to end with the tiny model -----


def _trainer(output_dir, tokenizer, pool, validation, mode, ref_seed=None, **overrides):
    model = build_tiny_llama(tokenizer, seed=0)
    ref_model = copy.deepcopy(model) if ref_seed is None else build_tiny_llama(tokenizer, seed=ref_seed)
    args = fast_config(
        output_dir,
        scoring_reuse=mode,
        # 100 pairs in batches of 10: every pair is trained in the warm-up epoch
        **{"num_train_epochs": 3, "per_device_train_batch_size": 10, **overrides},
    )
    return RecordingTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )


def _run(tmp_path, tokenizer, pool, validation, mode, **overrides):
    trainer = _trainer(tmp_path / mode, tokenizer, pool, validation, mode, **overrides)
    trainer.train()
    return trainer


@pytest.fixture
def runs(tmp_path, tokenizer, pool, validation):
    return {
        mode: _run(tmp_path, tokenizer, pool, validation, mode)
        for mode in ("none", "reference", "reference_and_policy")
    }


def test_reused_reference_equals_the_reference_pass_and_costs_nothing(runs):
    exact, reused = runs["none"].selection_engine, runs["reference"].selection_engine
    # cached by the runs' events: reading them back runs no pass
    exact_reference, reused_reference = exact.reference_log_probs(), reused.reference_log_probs()
    torch.testing.assert_close(reused_reference.chosen, exact_reference.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(reused_reference.rejected, exact_reference.rejected, atol=1e-4, rtol=0)
    assert exact.compute.fte["reference"] > reused.compute.fte["reference"]
    # only the validation pairs' π_ref pass is left: every pool pair was trained in the warm-up epoch
    assert reused.compute.fte["reference"] == exact.token_counts("validation").sum()
    history = [record["selected_ids"] for record in read_history(runs["reference"].args.output_dir)]
    assert history == [record["selected_ids"] for record in read_history(runs["none"].args.output_dir)]


def test_reused_policy_rescores_only_the_pairs_the_last_epoch_did_not_train(runs):
    stale = runs["reference_and_policy"]
    records = read_history(stale.args.output_dir)
    logged = [entry for entry in stale.state.log_history if "selection/policy_rescored_fraction" in entry]
    # Epoch 1's event: the warm-up trained every pair. Epoch 2's: the pairs epoch 1 did not train.
    assert logged[0]["selection/policy_rescored_fraction"] == 0.0
    trained_epoch_1 = records[1]["num_selected"] - len(records[1]["trimmed_ids"])
    assert logged[1]["selection/policy_rescored_fraction"] == pytest.approx(1 - trained_epoch_1 / 100)
    exact = runs["none"].selection_engine.compute.fte["policy_scoring"]
    assert stale.selection_engine.compute.fte["policy_scoring"] < 0.5 * exact


def test_with_a_frozen_policy_every_mode_selects_the_same_pairs(tmp_path, tokenizer, pool, validation):
    # θ never moves (learning rate 0), so the training steps' θ log-probs are the fresh ones: same scores, same pairs.
    # π_ref is another model and θ_aux trains, so that IRM and LossDiff spread.
    histories, scores = {}, {}
    for mode in ("none", "reference_and_policy"):
        trainer = _run(
            tmp_path, tokenizer, pool, validation, mode, ref_seed=1, learning_rate=0.0, aux_learning_rate=1e-2
        )
        histories[mode] = [record["selected_ids"] for record in read_history(trainer.args.output_dir)]
        scores[mode] = [
            entry["selection/irm/p50"] for entry in trainer.state.log_history if "selection/irm/p50" in entry
        ]
    assert len(histories["none"][1]) < 100  # a real selection, not a tie that keeps every pair
    assert histories["none"] == histories["reference_and_policy"]
    np.testing.assert_allclose(scores["none"], scores["reference_and_policy"], atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.5, "use_weighting": True}], ids=["dpo", "ld-wpo"])
def test_resume_with_reused_policy_selects_as_the_uninterrupted_run(tmp_path, tokenizer, pool, validation, options):
    mode = "reference_and_policy"
    if options:  # LD-DPO's tails need unequal lengths; θ's records then carry WPO's weights through the checkpoint
        pool = with_unequal_rejected(pool)
    full = _run(tmp_path / "full", tokenizer, pool, validation, mode, save_strategy="steps", save_steps=3, **options)
    checkpoint = tmp_path / "full" / mode / "checkpoint-15"  # mid epoch 1: 10 warm-up steps, then 5 of about 7
    state = json.loads((checkpoint / STATE_FILENAME).read_text())
    assert "training_policy.chosen" in state["log_probs"]  # epoch 1's steps so far, for epoch 2's event
    assert ("training_policy.log_weight" in state["log_probs"]) == bool(options)
    assert ("auxiliary.log_weight" in state["log_probs"]) == bool(options)
    resumed = _trainer(tmp_path / "resumed", tokenizer, pool, validation, mode, **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = [record["selected_ids"] for record in read_history(full.args.output_dir)]
    assert [record["selected_ids"] for record in read_history(resumed.args.output_dir)] == expected
    np.testing.assert_allclose(
        [entry["selection/irm/p50"] for entry in resumed.state.log_history if "selection/irm/p50" in entry][-1:],
        [entry["selection/irm/p50"] for entry in full.state.log_history if "selection/irm/p50" in entry][-1:],
        atol=1e-6,
    )


class _ReversedSampler(SelectionSampler):
    """Hands this rank's batches last first: what worker processes with `dataloader_in_order=False` may do."""

    def __iter__(self):
        yield from reversed(self.rank_batches())


def test_batches_out_of_order_record_each_pair_at_its_own_row(tmp_path, tokenizer, pool, validation):
    # 100 pairs in batches of 10: equal sizes, so only the rows a batch carries tell the batches apart
    trainer = _trainer(
        tmp_path,
        tokenizer,
        pool,
        validation,
        "reference",
        ref_seed=1,
        num_train_epochs=2,
        dataloader_num_workers=2,
        dataloader_in_order=False,
    )
    trainer.selection_sampler.__class__ = _ReversedSampler
    trainer.train()
    engine = trainer.selection_engine
    # Epoch 1's event took π_ref's pool log-probs from the warm-up steps' records (no pool pass) ...
    assert engine.compute.fte["reference"] == engine.token_counts("validation").sum()
    recorded = engine.reference_log_probs()
    # ... and each pair's are its own: those of an exact pass
    exact = trainer.reference_log_probs(trainer.train_dataset, engine.pool_loader())
    torch.testing.assert_close(recorded.chosen, exact.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(recorded.rejected, exact.rejected, atol=1e-4, rtol=0)


def _with_attention_dropout(model, rate: float):
    """Llama drops attention weights inside the attention kernel, from a float attribute (no `nn.Dropout` layer)."""
    model.config.attention_dropout = rate
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = rate
    return model


@pytest.mark.parametrize(
    "family, reference",
    [("gpt2", "eval"), ("gpt2", "train"), ("gpt2", "lora"), ("llama", "lora")],
    ids=["gpt2-ref-model", "gpt2-ref-model-in-train-mode", "gpt2-lora", "llama-attention-dropout-lora"],
)
def test_dropout_noise_never_reaches_the_cached_reference(
    tmp_path, tokenizer, pool, validation, caplog, family, reference
):
    # GPT-2's config drops 10% of embeddings, attention weights and residuals (`nn.Dropout` layers, which
    # `disable_dropout=False` leaves on); the Llama drops attention weights through an attribute.
    model = build_tiny(family, tokenizer)
    if family == "llama":
        model = _with_attention_dropout(model, 0.1)
    lora = (
        {"target_modules": ["c_attn"], "fan_in_fan_out": True} if family == "gpt2" else {"target_modules": ["q_proj"]}
    )
    if reference == "lora":
        models = {"peft_config": LoraConfig(r=4, lora_alpha=8, **lora)}
    else:  # `from_pretrained` loads in eval mode, a model built from its config is in train mode; TRL keeps either
        models = {"ref_model": copy.deepcopy(model).train(reference == "train")}
    args = fast_config(
        tmp_path, num_train_epochs=2, per_device_train_batch_size=10, disable_dropout=False, scoring_reuse="reference"
    )
    trainer = SelectiveDPOTrainer(
        model, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer, **models
    )
    with caplog.at_level(logging.WARNING, logger="trl_select.training_log_probs"):
        trainer.train()
    engine = trainer.selection_engine
    reused = engine.reference_log_probs()  # cached by epoch 1's event
    exact = trainer.reference_log_probs(trainer.train_dataset, engine.pool_loader())  # eval mode: π_ref itself
    torch.testing.assert_close(reused.chosen, exact.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(reused.rejected, exact.rejected, atol=1e-4, rtol=0)
    pool_tokens = engine.token_counts("pool").sum()
    validation_tokens = engine.token_counts("validation").sum()
    row_of_id = {pair_id: row for row, pair_id in enumerate(trainer.pair_ids)}
    epoch_1 = read_history(tmp_path)[1]["selected_ids"]  # one process trims nothing: epoch 1 trains them all
    trained = engine.token_counts("pool")[[row_of_id[pair_id] for pair_id in epoch_1]].sum()
    if reference != "eval":
        # π_ref's training forwards are noised (the policy with its adapters off, in training mode, or a `ref_model`
        # in training mode): the event ran a pass of its own, and the steps keep TRL's live (noised) reference forward
        assert "dropout is active in its training forward" in caplog.text
        assert engine.compute.fte["reference"] == pool_tokens + validation_tokens
        assert engine.compute.fte["train"] == pytest.approx(4 * pool_tokens + 4 * trained)
    else:
        # The `ref_model` in eval mode: recorded in the warm-up, then served from the cache to epoch 1's steps
        assert engine.compute.fte["reference"] == validation_tokens
        assert engine.compute.fte["train"] == pytest.approx(4 * pool_tokens + 3 * trained)


@pytest.mark.parametrize(
    "peft, options",
    [(False, {}), (True, {}), (False, {"ld_alpha": 0.5, "use_weighting": True})],
    ids=["ref-model", "lora", "ref-model-ld-wpo"],
)
def test_the_cached_reference_stands_in_for_the_live_reference_forward_exactly(
    tmp_path, tokenizer, pool, validation, peft, options
):
    # With LD-DPO the cache holds LD-weighted sums, what TRL's live reference forward sums too (unequal lengths)
    if options:
        pool = with_unequal_rejected(pool)
    model = build_tiny_llama(tokenizer, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    models = {"peft_config": lora} if peft else {"ref_model": build_tiny_llama(tokenizer, seed=1)}
    trainer = SelectiveDPOTrainer(
        model,
        args=fast_config(tmp_path, per_device_train_batch_size=10, **options),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        **models,
    )
    engine = trainer.selection_engine
    engine.reference_log_probs()  # one pass over the pool, as an event or the warm-up's records leave it cached
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    reference_module = trainer.accelerator.unwrap_model(trainer.ref_model if not peft else trainer.model)
    no_grad_forwards = []
    handle = reference_module.register_forward_hook(
        lambda module, args, output: no_grad_forwards.append(1) if not torch.is_grad_enabled() else None
    )
    try:
        injected = trainer.compute_loss(trainer.model, batch)
        assert no_grad_forwards == []  # no reference forward ran
        assert trainer.precompute_ref_logps is False  # restored after the call
        live = DPOTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != POOL_ROWS_KEY})
        assert no_grad_forwards == [1]
    finally:
        handle.remove()
    torch.testing.assert_close(injected, live)
    assert engine._reference_forwards == {"live": 0, "cached": 1}


@pytest.mark.parametrize(
    "options", [{"ld_alpha": 0.5}, {"ld_alpha": 0.5, "use_weighting": True}], ids=["ld", "ld-wpo"]
)
def test_training_step_records_equal_the_exact_passes_with_ld_dpo_and_wpo(
    tmp_path, tokenizer, pool, validation, options
):
    # Unequal completion lengths, so LD-DPO's tails matter; θ's records keep WPO's weight (the recorder does not give
    # up with WPO: it reads the step's `log_sum_sq_probs`).
    trainer = SelectiveDPOTrainer(
        build_tiny_llama(tokenizer, seed=0),
        ref_model=build_tiny_llama(tokenizer, seed=1),
        args=fast_config(tmp_path, per_device_train_batch_size=10, **options),
        train_dataset=with_unequal_rejected(pool),
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    recorder = engine.training_log_probs
    recorder.begin_epoch({POLICY, REFERENCE})
    trainer.model.train()
    for batch in trainer.get_train_dataloader():  # the training steps' forwards, with TRL's loss (no optimizer step)
        trainer.compute_loss(trainer.model, batch)
    assert recorder.recording == {POLICY, REFERENCE}  # nothing given up
    recorded = {kind: recorder.combined(kind) for kind in (POLICY, REFERENCE)}
    exact = {
        POLICY: engine.policy_log_probs(),  # a pass of its own, in eval mode
        REFERENCE: trainer.reference_log_probs(trainer.train_dataset, engine.pool_loader()),
    }
    for kind in (POLICY, REFERENCE):
        assert missing_rows(recorded[kind]) == []
        torch.testing.assert_close(recorded[kind].chosen, exact[kind].chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(recorded[kind].rejected, exact[kind].rejected, atol=1e-5, rtol=0)
    assert recorded[REFERENCE].log_weight is None and exact[REFERENCE].log_weight is None
    if options.get("use_weighting"):
        torch.testing.assert_close(recorded[POLICY].log_weight, exact[POLICY].log_weight, atol=1e-5, rtol=0)
    else:
        assert recorded[POLICY].log_weight is None and exact[POLICY].log_weight is None
    # The LD weighting changed the sums: the plain ones differ wherever a pair's completions differ in length
    model = trainer.accelerator.unwrap_model(trainer.model)
    with inference_mode(model):
        plain = run_log_prob_pass(
            engine.pool_loader(),
            lambda batch: sequence_log_probs(model, batch),
            trainer.accelerator,
            100,
            desc="plain",
        )
    assert (recorded[POLICY].rejected - plain.rejected).abs().max() > 1e-2


def test_in_epoch_segments_take_the_reference_of_their_scored_pairs_from_the_cache(
    tmp_path, tokenizer, pool, validation
):
    # One epoch selects inside it (`selection_strategy="steps"`): π_ref's cache holds only the pairs events scored or
    # warm-up steps recorded, and each segment after an event trains scored pairs only.
    trainer = _trainer(
        tmp_path, tokenizer, pool, validation, "reference", num_train_epochs=1, per_device_train_batch_size=4
    )
    engine, forwards = trainer.selection_engine, []  # per micro-batch: whether π_ref ran live
    note = engine.note_reference_forward
    engine.note_reference_forward = lambda live: (forwards.append(live), note(live=live))
    trainer.train()
    assert trainer.selection_callback.strategy == "steps"
    history = read_history(tmp_path)
    assert [record["event"] for record in history][:2] == ["warmup", "selection"]
    row_of_id = {pair_id: row for row, pair_id in enumerate(trainer.pair_ids)}
    tokens = engine.token_counts("pool")
    segments = [(record["event"], sum(tokens[row_of_id[i]] for i in record["selected_ids"])) for record in history]
    warmup_steps = sum(len(record["selected_ids"]) for record in history if record["event"] == "warmup") // 4
    assert forwards == [True] * warmup_steps + [False] * (len(forwards) - warmup_steps)
    assert len(forwards) > warmup_steps
    expected = sum((4 if event == "warmup" else 3) * count for event, count in segments)
    assert engine.compute.fte["train"] == pytest.approx(expected)
