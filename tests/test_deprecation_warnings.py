"""A selection event emits no deprecation warning about gradient checkpointing, and an aux refresh does not make
Python show again the warnings it already showed once.

transformers 5.23 renamed `is_gradient_checkpointing` to `is_activation_checkpointing` and warns (FutureWarning) on
every read of the old name; TRL 1.16's `compute_ref_log_probs` reads it. A `warnings.catch_warnings()` block (the aux
stage once had one around PEFT's injection) resets Python's once-per-location memory, so such a warning was shown
again after every aux stage.
"""

from __future__ import annotations

import copy
import warnings

import pytest

from trl_select import SelectiveDPOTrainer

from .testing_utils import fast_config


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_a_selection_event_emits_no_checkpointing_deprecation(
    tmp_path, tokenizer, tiny_model, pool, validation, gradient_checkpointing
):
    args = fast_config(
        tmp_path,
        num_train_epochs=2,
        scoring_reuse="none",  # the event runs π_ref over the pool itself (and over the validation pairs)
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    compute_scores = engine.compute_scores
    caught: list[warnings.WarningMessage] = []
    events = []

    def recording_compute_scores(*args, **kwargs):
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            result = compute_scores(*args, **kwargs)
        caught.extend(records)
        events.append(args)
        return result

    engine.compute_scores = recording_compute_scores
    trainer.train()
    assert events, "no selection event"
    checkpointing = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not checkpointing, checkpointing


def test_an_aux_refresh_keeps_the_warnings_shown_once(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=fast_config(tmp_path, num_train_epochs=2),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    engine = trainer.selection_engine
    shown = []

    def warn_once_per_location():
        warnings.warn("a deprecation shown once", FutureWarning, stacklevel=1)

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # Python's own: once per location
        original, warnings.showwarning = warnings.showwarning, lambda message, *args, **kwargs: shown.append(message)
        try:
            warn_once_per_location()
            warn_once_per_location()
            assert len(shown) == 1
            engine.auxiliary_log_probs(1, {})  # builds θ_aux (a LoRA update injected and removed) and aligns it
            warn_once_per_location()
        finally:
            warnings.showwarning = original
    assert len(shown) == 1, [str(message) for message in shown]
