"""Compute accounting in forward-token equivalents: the ledger's arithmetic, and a tiny run's logged FTE against hand counts."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.compute import (
    CATEGORIES,
    SELECTION_CATEGORIES,
    ComputeLedger,
    batch_tokens,
    pair_token_counts,
    rows_tokens,
)
from trl_select.sampler import SelectionSampler, shard_batches

from .testing_utils import fast_config


def test_ledger_arithmetic():
    ledger = ComputeLedger()
    assert ledger.share == 0.0 and ledger.selection_total == 0.0
    ledger.add("train", 100, 4)
    ledger.add("reference", 50)
    ledger.add("aux_alignment", 10, 3)
    ledger.add("aux_pool", 30)
    assert ledger.training_total == 400
    assert ledger.selection_total == 50 + 30 + 30
    assert ledger.share == pytest.approx(110 / 510)
    metrics = ledger.as_metrics()
    assert {f"selection/compute/{name}" for name in CATEGORIES} <= set(metrics)
    assert metrics["selection/compute/train"] == 400 and metrics["selection/compute/aux_alignment"] == 30
    assert metrics["selection/compute/selection_share"] == pytest.approx(110 / 510)
    assert "training 400 FTE, selection 110 FTE (21.6% of the run)" in ledger.summary()
    with pytest.raises(KeyError):
        ledger.add("eval", 1)
    with pytest.raises(ValueError):
        ledger.add("train", -1)


def test_pair_token_counts_match_the_collators_attention_mask(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=fast_config(tmp_path, max_length=10),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    dataset = trainer.train_dataset
    counts = pair_token_counts(dataset, 10)
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(*(dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    ]
    assert max(lengths) > 10  # some pairs are truncated, so the cut is exercised
    for start in range(0, len(dataset), 16):
        rows = list(range(start, min(start + 16, len(dataset))))
        batch = trainer.data_collator([dataset[row] for row in rows])
        assert batch_tokens(batch) == rows_tokens(counts, rows)
        assert batch["input_ids"].numel() > batch_tokens(batch) or len(set(counts[rows])) == 1  # padding not counted


class _MetricsProbe(TrainerCallback):
    """The first logged value of every `selection/compute/*` metric after each selection event, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, float]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "num_tokens" in logs:  # TRL's own count of the trained batches' non-padding tokens
            self.num_tokens = float(logs["num_tokens"])
        if "selection/epoch" in logs:
            epoch = int(logs["selection/epoch"])
            self.by_epoch.setdefault(epoch, {k: v for k, v in logs.items() if k.startswith("selection/")})


@pytest.mark.parametrize("scoring_reuse", ["none", "reference"])
def test_logged_compute_equals_hand_counts(tmp_path, tokenizer, tiny_model, pool, validation, caplog, scoring_reuse):
    probe = _MetricsProbe()
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=fast_config(tmp_path, scoring_reuse=scoring_reuse),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    with caplog.at_level(logging.INFO, logger="trl_select.callback"):
        trainer.train()

    # Hand counts: each pair's two sequences, prompt included, cut to max_length=32 as the collator does
    def tokens(dataset) -> np.ndarray:
        prompt = np.array([len(ids) for ids in dataset["prompt_ids"]])
        chosen = np.array([len(ids) for ids in dataset["chosen_ids"]])
        rejected = np.array([len(ids) for ids in dataset["rejected_ids"]])
        return np.minimum(prompt + chosen, 32) + np.minimum(prompt + rejected, 32)

    pool_tokens, validation_tokens = tokens(trainer.train_dataset), tokens(trainer.eval_dataset)
    row_of_id = {pair_id: row for row, pair_id in enumerate(trainer.pair_ids)}
    history = read_history(tmp_path)
    # One process: nothing trimmed; each step is policy forward + backward (3), plus the live reference forward (1)
    # until π_ref's pool log-probs are cached (by epoch 1's event): later steps take them from the cache
    trained = [pool_tokens[[row_of_id[i] for i in record["selected_ids"]]].sum() for record in history]
    train_fte = np.cumsum([(4 if epoch == 0 else 3) * tokens for epoch, tokens in enumerate(trained)])
    # The aux stage (aux_max_steps=2, batch 16) trains the first two batches of the shuffle seeded `seed + refresh`
    aux_rows = [
        sum(shard_batches(torch.randperm(32, generator=torch.Generator().manual_seed(refresh)), 1, 0, 16)[:2], [])
        for refresh in range(2)
    ]
    for epoch in (1, 2):
        m = {k.removeprefix("selection/compute/"): v for k, v in probe.by_epoch[epoch].items() if "compute/" in k}
        assert m["train"] == pytest.approx(train_fte[epoch - 1])
        # π_ref once over the validation pairs, and over the pool unless the warm-up steps' forwards are reused (the
        # warm-up trained every pool pair: one process trims nothing)
        reference = validation_tokens.sum() + (pool_tokens.sum() if scoring_reuse == "none" else 0)
        assert m["reference"] == pytest.approx(reference)
        assert m["policy_scoring"] == pytest.approx(epoch * pool_tokens.sum())
        assert m["aux_alignment"] == pytest.approx(3 * sum(validation_tokens[rows].sum() for rows in aux_rows[:epoch]))
        assert m["aux_validation"] == pytest.approx(2 * epoch * validation_tokens.sum())
        assert m["aux_pool"] == pytest.approx(epoch * pool_tokens.sum())
        selection = sum(m[name] for name in SELECTION_CATEGORIES)
        assert m["selection_total"] == pytest.approx(selection)
        assert 0 < m["selection_share"] < 1
        assert m["selection_share"] == pytest.approx(selection / (selection + m["train"]))
    assert trainer.selection_engine.compute.fte["train"] == pytest.approx(train_fte[-1])
    assert sum(trained) == pytest.approx(probe.num_tokens)  # TRL agrees on the tokens trained
    summary = [r.getMessage() for r in caplog.records if "Compute: training" in r.getMessage()]
    assert len(summary) == 1 and "% of the run): reference" in summary[0]
    print(summary[0])  # noqa: T201 - shown with -s, for the docs
    # The history stays timing- and compute-free
    expected_keys = {
        "epoch",
        "event",
        "global_step",
        "pool_size",
        "num_selected",
        "rule",
        "thresholds",
        "selected_ids",
        "trimmed_ids",
    }
    assert set(history[0]) == expected_keys
    assert set(history[1]) == expected_keys | {"percentiles", "aux_refreshed"}


def test_precomputed_reference_costs_training_once_and_nothing_per_step(
    tmp_path, tokenizer, tiny_model, pool, validation
):
    probe = _MetricsProbe()
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=fast_config(tmp_path, num_train_epochs=2, precompute_ref_log_probs=True),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    trainer.train()
    pool_tokens = pair_token_counts(trainer.train_dataset, 32).sum()
    validation_tokens = pair_token_counts(trainer.eval_dataset, 32).sum()
    m = probe.by_epoch[1]
    assert m["selection/compute/train"] == pytest.approx(pool_tokens + 3 * pool_tokens)  # precompute pass + epoch 0
    assert m["selection/compute/reference"] == pytest.approx(validation_tokens)  # the pool's columns are read


def test_trained_rows_leave_out_the_trimmed_rows_and_the_batches_not_run():
    samplers = [SelectionSampler(100, max_batch_size=8, seed=3, world_size=3, rank=rank) for rank in range(3)]
    for sampler in samplers:
        sampler.set_selection(range(0, 100, 2))  # 50 rows over 3 ranks: 2 trimmed
        sampler.set_epoch(1)
    every_rank = [row for sampler in samplers for batch in sampler.rank_batches() for row in batch]
    trained = samplers[0].trained_rows(len(samplers[0]))
    assert sorted(trained) == sorted(every_rank) and len(trained) == 48
    assert set(trained).isdisjoint(samplers[0].trimmed_rows())
    first = [row for sampler in samplers for row in sampler.rank_batches()[0]]
    assert sorted(samplers[0].trained_rows(1)) == sorted(first)  # a run stopped after one micro-batch
    assert samplers[0].trained_rows(0) == []
