"""`SelectiveDPOTrainer` selects with every per-pair loss of TRL 1.16 (docs/design.md §2): a 2-epoch run per loss,
and with LD-DPO's `ld_alpha` and WPO's `use_weighting` on top of some of them.

Each run must (1) make a selection event that keeps a strict subset of the pool, (2) give LossDiff ≈ 0 when the aux
model barely moves (`aux_learning_rate=1e-12`: θ_aux = θ_t, so `L(z; θ_t) - L(z; θ_aux)` is 0 whatever the loss), and
(3) score with the loss TRL trains: the mean of the per-pair loss over the pool, from the engine's own passes and
lengths (and, with WPO, θ_t's own per-pair weights, which the policy pass carries), equals
`DPOTrainer._compute_loss` on a batch of the whole pool (trl/trainer/dpo_trainer.py:1285-1530).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_select import SelectiveDPOTrainer
from trl_select.scores import SUPPORTED_LOSS_TYPES

from .testing_utils import fast_config, with_unequal_rejected


CASES = [
    *[{"loss_type": [t]} for t in SUPPORTED_LOSS_TYPES if t not in ("exo_pair", "robust")],
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    # LD-DPO and WPO (on a pool whose rejected completions are longer or shorter than the chosen ones). TRL cannot
    # train `sft` with `use_weighting` (it scales the expanded SFT term in place), so the list loss here is another.
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["ipo"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5], "use_weighting": True},
    {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 1.0], "ld_alpha": 0.3, "use_weighting": True},
    # π_ref's log-probs from TRL's precomputed columns, which `compute_ref_log_probs` LD-weights
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5, "precompute_ref_log_probs": True},
    # events inside the epochs: chunks of the pool scored, θ_t's weights taken by row
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5, "use_weighting": True, "selection_strategy": "steps"},
    # TR-DPO: the reference moves toward the policy after every step, so every π_ref cache goes stale at once
    {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
]
# The options whose cases run on `unequal_pool`: with equal completion lengths LD-DPO would be plain DPO.
UNEQUAL_LENGTH_OPTIONS = ("ld_alpha", "use_weighting")


@pytest.fixture(scope="module")
def equal_chosen_pool(reverse_rows) -> Dataset:
    """64 pairs whose chosen completions have equal lengths (TRL's `sft` term is a token mean over the batch)."""
    rows = [row for row in reverse_rows["train"] if len(row["chosen"]) == 5][:64]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def unequal_pool(equal_chosen_pool) -> Dataset:
    """`equal_chosen_pool` with rejected completions shorter or longer than the chosen ones."""
    return with_unequal_rejected(equal_chosen_pool)


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_selection_runs_with_every_loss(
    case, tmp_path, tokenizer, tiny_model, equal_chosen_pool, unequal_pool, validation
):
    events = []
    pool = unequal_pool if set(case) & set(UNEQUAL_LENGTH_OPTIONS) else equal_chosen_pool
    args = fast_config(
        tmp_path,
        num_train_epochs=2,
        aux_learning_rate=1e-12,
        per_device_train_batch_size=16,
        **case,
    )
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation.select(range(16)),
        processing_class=tokenizer,
        selection_reporters=[lambda event, *_: events.append(event)],
    )
    trainer.train()
    selections = [event for event in events if event.kind == "selection"]
    assert selections, "no selection event"
    for event in selections:
        assert 0 < int(event.keep.sum()) < len(event.keep)  # a strict, non-empty subset
        lossdiff = event.scores["lossdiff"]
        assert np.isfinite(lossdiff).all()
        assert np.abs(lossdiff).max() < 1e-5, np.abs(lossdiff).max()
    # The per-pair loss, as the scores evaluate it, averages to TRL's own loss on the same pairs. With WPO the policy
    # pass carries θ_t's per-pair log-weight, which the loss multiplies each term by.
    engine = trainer.selection_engine
    policy, reference = engine.policy_log_probs(), engine.reference_log_probs()
    assert (policy.log_weight is not None) == bool(case.get("use_weighting"))
    per_pair = args.preference_loss()(policy, reference, engine.completion_lengths("pool"))
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    torch.testing.assert_close(per_pair.mean(), trl_loss.float(), rtol=1e-4, atol=1e-5)
