"""`scoring_reuse`: the log-probs a selection event takes from the training steps instead of passes of its own."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trl_select import read_history
from trl_select.checkpoint import STATE_FILENAME
from trl_select.scores import PairLogProbs
from trl_select.testing import build_tiny_llama
from trl_select.training_log_probs import POLICY, REFERENCE, TrainingLogProbs, fill_rows, missing_rows

from .recording import RecordingTrainer
from .testing_utils import fast_config


class _Scripted(torch.nn.Module):
    """Returns per-token log-probs `row value` at every position, so a pair's sum is `value * positions`."""

    def forward(self, values: torch.Tensor, width: int):
        return SimpleNamespace(log_probs=values[:, None].expand(-1, width).clone())


def _micro_batch(recorder, module, chosen, rejected, *, reference=None, width=4):
    mask = torch.ones(2 * len(chosen), width + 1, dtype=torch.long)
    with recorder.record([module], mask):
        module(torch.tensor(chosen + rejected, dtype=torch.float32, requires_grad=True), width)
        if reference is not None:
            with torch.no_grad():
                module(torch.tensor(reference, dtype=torch.float32), width)


def test_records_each_micro_batch_at_the_rows_the_sampler_planned():
    recorder = TrainingLogProbs(pool_size=6)
    module = _Scripted()
    recorder.begin_epoch([[4, 1], [0, 5]], first_batch=0, kinds={POLICY, REFERENCE})
    # With grad: θ's forward; without: π_ref's (TRL runs the live reference under no_grad).
    _micro_batch(recorder, module, [1.0, 2.0], [-1.0, -2.0], reference=[0.5, 0.25, -0.5, -0.25])
    _micro_batch(recorder, module, [3.0, 4.0], [-3.0, -4.0])
    policy, reference = recorder.gathered(POLICY), recorder.gathered(REFERENCE)
    # 4 positions per sequence: the sum is 4 x the per-token value
    assert policy.chosen.tolist()[:2] == [12.0, 8.0] and policy.chosen[4] == 4.0 and policy.chosen[5] == 16.0
    assert policy.rejected[1] == -8.0 and policy.rejected[0] == -12.0
    assert reference.chosen[4] == 2.0 and reference.rejected[1] == -1.0
    assert missing_rows(policy) == [2, 3]
    assert missing_rows(reference) == [0, 2, 3, 5]  # the second batch had no live reference forward


def test_a_resumed_epoch_starts_at_the_first_untrained_micro_batch():
    recorder = TrainingLogProbs(pool_size=4)
    recorder.begin_epoch([[0], [1], [2], [3]], first_batch=2, kinds={POLICY})
    _micro_batch(recorder, _Scripted(), [1.0], [2.0])
    assert missing_rows(recorder.gathered(POLICY)) == [0, 1, 3]


def test_a_batch_that_does_not_match_the_plan_voids_the_epoch(caplog):
    recorder = TrainingLogProbs(pool_size=4)
    recorder.begin_epoch([[0, 1], [2, 3]], first_batch=0, kinds={POLICY})
    _micro_batch(recorder, _Scripted(), [1.0, 1.0], [2.0, 2.0])
    _micro_batch(recorder, _Scripted(), [1.0], [2.0])  # one pair where the sampler planned two
    assert missing_rows(recorder.gathered(POLICY)) == [0, 1, 2, 3]
    assert not recorder.recording
    assert "Not reusing the training log-probs" in caplog.text


def test_nothing_is_recorded_when_not_asked():
    recorder = TrainingLogProbs(pool_size=2)
    recorder.begin_epoch([[0, 1]], first_batch=0, kinds=set())
    _micro_batch(recorder, _Scripted(), [1.0, 1.0], [2.0, 2.0])
    assert missing_rows(recorder.gathered(POLICY)) == [0, 1]


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


def test_resume_with_reused_policy_selects_as_the_uninterrupted_run(tmp_path, tokenizer, pool, validation):
    mode = "reference_and_policy"
    full = _run(tmp_path / "full", tokenizer, pool, validation, mode, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "full" / mode / "checkpoint-15"  # mid epoch 1: 10 warm-up steps, then 5 of about 7
    state = json.loads((checkpoint / STATE_FILENAME).read_text())
    assert "training_policy.chosen" in state["log_probs"]  # epoch 1's steps so far, for epoch 2's event
    resumed = _trainer(tmp_path / "resumed", tokenizer, pool, validation, mode)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = [record["selected_ids"] for record in read_history(full.args.output_dir)]
    assert [record["selected_ids"] for record in read_history(resumed.args.output_dir)] == expected
    np.testing.assert_allclose(
        [entry["selection/irm/p50"] for entry in resumed.state.log_history if "selection/irm/p50" in entry][-1:],
        [entry["selection/irm/p50"] for entry in full.state.log_history if "selection/irm/p50" in entry][-1:],
        atol=1e-6,
    )
