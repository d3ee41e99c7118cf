"""TR-DPO (`sync_ref_model`) with selection: every event reads π_ref as it is when the event runs, never a cache.

TRL's `SyncRefModelCallback` mixes the reference toward the policy every `ref_model_sync_steps` steps. Each event's IRM
must then equal the IRM recomputed from scratch (plain unbatched forwards, `tests/independent.py`) with the reference
the trainer holds at that moment, and, so that the check can fail, differ from the IRM with the reference as an
earlier cache would have held it (the reference at the previous event, or before training for the first one). The aux
stage's validation reference is checked the same way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_select import SelectiveDPOTrainer
from trl_select.testing import build_tiny_llama

from .independent import pair_log_probs, token_rows
from .testing_utils import fast_config


def _irm(policy, reference, rows: list[dict], beta: float) -> np.ndarray:
    values = []
    with torch.no_grad():
        for row in rows:
            policy_chosen, policy_rejected = pair_log_probs(policy, row)
            reference_chosen, reference_rejected = pair_log_probs(reference, row)
            values.append(beta * float((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)))
    return np.asarray(values)


def _log_probs(model, rows: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.tensor([[float(v) for v in pair_log_probs(model, row)] for row in rows])


def _snapshot(model, tokenizer):
    """A frozen copy of `model`'s weights in a fresh tiny Llama. Not `copy.deepcopy`: TRL's fused-LM-head forward
    closes over the module it patched, so a deep copy of a trained model would still run the live weights."""
    snapshot = build_tiny_llama(tokenizer, seed=0)
    snapshot.load_state_dict(model.state_dict())
    return snapshot.eval()


CASES = {
    "epoch-reuse_none": {"num_train_epochs": 3, "scoring_reuse": "none", "selection_rule": "irm_band"},
    "epoch-reuse_reference": {"num_train_epochs": 3, "scoring_reuse": "reference", "selection_rule": "lossdiff_irm"},
    # two passes of in-epoch events: the second pass scores rows whose π_ref the first pass cached
    "steps": {
        "num_train_epochs": 2,
        "selection_strategy": "steps",
        "selection_warmup_steps": 1,
        "selection_steps": 1,
        "selection_rule": "irm_band",
        "irm_lo_percentile": 0.0,
        "irm_hi_percentile": 60.0,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_events_read_the_synced_reference(case, tmp_path, tokenizer, tiny_model, reverse_rows, validation):
    pool = Dataset.from_list(reverse_rows["train"][:64])
    checks = []
    holder = {}
    # The reference as a stale cache would hold it: before training, then as it was at the previous event.
    stale = {"reference": _snapshot(tiny_model, tokenizer)}

    def reporter(event, args, state):
        if event.kind != "selection":
            return
        trainer = holder["trainer"]
        policy = _snapshot(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
        reference = _snapshot(trainer.accelerator.unwrap_model(trainer.ref_model), tokenizer)
        rows = token_rows(trainer.train_dataset)
        event_rows = range(len(rows)) if event.rows is None else event.rows.tolist()
        rows = [rows[row] for row in event_rows]
        check = {
            "step": state.global_step,
            "irm": np.asarray(event.scores["irm"]),
            "fresh": _irm(policy, reference, rows, args.beta),
            "stale": _irm(policy, stale["reference"], rows, args.beta),
        }
        auxiliary = trainer.selection_engine.auxiliary_model
        if auxiliary is not None:
            validation_rows = token_rows(trainer.selection_engine.validation_dataset)
            used = auxiliary.validation_reference
            check["validation"] = torch.stack([used.chosen, used.rejected], dim=1)
            check["validation_fresh"] = _log_probs(reference, validation_rows)
            check["validation_stale"] = _log_probs(stale["reference"], validation_rows)
        checks.append(check)
        stale["reference"] = reference

    overrides = dict(CASES[case])
    args = fast_config(
        tmp_path,
        per_device_train_batch_size=16,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
        **overrides,
    )
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation.select(range(16)),
        processing_class=tokenizer,
        selection_reporters=[reporter],
    )
    holder["trainer"] = trainer
    trainer.train()

    assert len(checks) >= 2, [check["step"] for check in checks]
    # one sync per optimizer step (`ref_model_sync_steps=1`), each dropping every π_ref cache
    assert trainer.selection_engine.reference_syncs == trainer.state.global_step
    for check in checks:
        np.testing.assert_allclose(check["irm"], check["fresh"], atol=2e-4, err_msg=f"step {check['step']}")
        # what a cache filled with an earlier reference would have given: far off
        assert np.abs(check["stale"] - check["fresh"]).max() > 1e-2, check["step"]
        if "validation" in check:
            torch.testing.assert_close(check["validation"], check["validation_fresh"], atol=2e-4, rtol=0)
            assert (check["validation_stale"] - check["validation_fresh"]).abs().max() > 1e-2


def test_resume_scores_with_the_reference_the_resumed_run_holds(tmp_path, tokenizer, reverse_rows, validation):
    """TRL does not checkpoint the synced reference: a resumed TR-DPO run trains against the `ref_model` it is given.
    The checkpoint then must carry no π_ref log-probs (here the warm-up steps' records since the last sync, of a
    reference the resumed run does not have), and the resumed event scores with the resumed run's reference."""
    from trl_select.checkpoint import load_selection_state

    pool = Dataset.from_list(reverse_rows["train"][:64])

    def build(output_dir, reporters=()):
        model = build_tiny_llama(tokenizer, seed=0)
        args = fast_config(
            output_dir,
            num_train_epochs=2,
            per_device_train_batch_size=16,
            sync_ref_model=True,
            ref_model_sync_steps=3,  # syncs at steps 3, 6: the checkpoint at step 4 follows step 4's recording
            ref_model_mixup_alpha=0.5,
            scoring_reuse="reference",
            selection_rule="irm_band",
            save_strategy="steps",
            save_steps=4,
        )
        return SelectiveDPOTrainer(
            model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=pool,
            eval_dataset=validation.select(range(16)),
            processing_class=tokenizer,
            selection_reporters=list(reporters),
        )

    build(tmp_path / "first").train()
    checkpoint = tmp_path / "first" / "checkpoint-4"
    _, tensors = load_selection_state(checkpoint)
    assert not [name for name in tensors if "reference" in name], sorted(tensors)

    checks = []
    holder = {}

    def reporter(event, args, state):
        if event.kind == "selection":
            trainer = holder["trainer"]
            policy = _snapshot(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
            reference = _snapshot(trainer.accelerator.unwrap_model(trainer.ref_model), tokenizer)
            checks.append((np.asarray(event.scores["irm"]), _irm(policy, reference, token_rows(pool_rows), args.beta)))

    resumed = build(tmp_path / "resumed", [reporter])
    holder["trainer"] = resumed
    pool_rows = resumed.train_dataset
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(checks) == 1
    np.testing.assert_allclose(*checks[0], atol=2e-4)
