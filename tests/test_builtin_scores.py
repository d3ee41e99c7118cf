"""The built-in reward-gap and DavIR scorers against plain per-pair forwards, and their rules in a training run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trl_select import SelectiveDPOTrainer, read_score_files

from .independent import pair_log_probs, token_rows
from .testing_utils import fast_config


BETA = 0.5


@pytest.fixture
def moved_trainer(tmp_path, tokenizer, tiny_model, pool):
    """A trainer whose policy is the tiny model plus noise, its reference the tiny model itself."""
    reference = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in tiny_model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    args = fast_config(tmp_path, selection_rule="reward_gap", beta=BETA, max_length=64, per_device_train_batch_size=2)
    trainer = SelectiveDPOTrainer(
        tiny_model, ref_model=reference, args=args, train_dataset=pool.select(range(24)), processing_class=tokenizer
    )
    return trainer, tiny_model, reference


def test_reward_gap_and_davir_match_per_pair_forwards(moved_trainer):
    trainer, policy, reference = moved_trainer
    scores = trainer.selection_callback._compute_scores(1, {}, ("reward_gap", "davir", "irm"))
    expected_gap, expected_davir = [], []
    with torch.no_grad():
        for row in token_rows(trainer.train_dataset):
            chosen, rejected = pair_log_probs(policy, row)
            ref_chosen, ref_rejected = pair_log_probs(reference, row)
            expected_gap.append(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)).item())
            # DavIR as the paper states it: mean per-token NLL of the chosen completion, relative reduction.
            num_tokens = len(row["chosen_ids"])
            nll_policy, nll_reference = -chosen.item() / num_tokens, -ref_chosen.item() / num_tokens
            expected_davir.append((nll_reference - nll_policy) / nll_reference)
    assert np.std(expected_gap) > 1e-2 and np.std(expected_davir) > 1e-3  # the policy really moved
    np.testing.assert_allclose(scores["reward_gap"], expected_gap, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores["davir"], expected_davir, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(scores["irm"], scores["reward_gap"])  # the same number under the paper's name


@pytest.mark.parametrize("rule, score, smallest", [("reward_gap", "reward_gap", True), ("davir", "davir", False)])
def test_fraction_rules_select_in_a_training_run(tmp_path, tokenizer, tiny_model, pool, rule, score, smallest):
    args = fast_config(tmp_path, num_train_epochs=2, selection_rule=rule, selection_fraction=0.2)
    trainer = SelectiveDPOTrainer(
        tiny_model, ref_model=copy.deepcopy(tiny_model), args=args, train_dataset=pool, processing_class=tokenizer
    )
    trainer.train()
    event = read_score_files(tmp_path)[-1].event
    assert event.rule == rule and set(event.scores) == {score} and event.keep.sum() == 20
    values = event.scores[score]
    if smallest:
        assert values[event.keep].max() <= values[~event.keep].min()
    else:
        assert values[event.keep].min() >= values[~event.keep].max()
    assert event.bands[score].hi_percentile == (20.0 if smallest else 100.0)
