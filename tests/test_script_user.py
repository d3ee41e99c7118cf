"""What a user of TRL's `dpo.py` (classes swapped) sees: event metrics in every log backend whatever `eval_strategy`,
one console line per event, errors that name the script's flags, warnings for options that do nothing."""

from __future__ import annotations

import copy
import logging

import pytest
from transformers import TrainerCallback

from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
from trl_select.event import EVENT_LOGGER, show_selection_events

from .testing_utils import fast_config


class _LogCapture(TrainerCallback):
    """A stand-in `report_to` backend: every backend's integration is a callback that receives `on_log`."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("logging_steps", [10, 100])
def test_every_events_metrics_reach_the_backends_with_eval_strategy_epoch(
    logging_steps, tmp_path, tokenizer, tiny_model, pool, validation
):
    """3 epochs of 7 steps, an evaluation at each epoch end. With `logging_steps=10` epoch 2 has no train log, and the
    run's final log comes after an evaluation, in eval mode, so TRL's `log` never merged its train buffer: the second
    event's metrics were lost (the first's too with `logging_steps=100`)."""
    capture = _LogCapture()
    args = fast_config(tmp_path, num_train_epochs=3, eval_strategy="epoch", logging_steps=logging_steps)
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=[capture],
    )
    trainer.train()
    selection_epochs = [h["selection/epoch"] for h in trainer.state.log_history if "selection/num_selected" in h]
    assert selection_epochs == [1.0, 2.0]
    assert [log["selection/epoch"] for log in capture.logs if "selection/num_selected" in log] == [1.0, 2.0]
    assert not trainer._pending_selection_metrics


def test_two_events_without_a_log_between_are_both_logged(tmp_path, tokenizer, tiny_model, pool, validation):
    """An event whose metrics still wait when the next event publishes is logged on its own, not overwritten."""
    args = fast_config(tmp_path, num_train_epochs=3, logging_steps=1000)
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train()
    selection_epochs = [h["selection/epoch"] for h in trainer.state.log_history if "selection/num_selected" in h]
    assert selection_epochs == [1.0, 2.0]


@pytest.fixture
def fresh_event_logger():
    events, package = logging.getLogger(EVENT_LOGGER), logging.getLogger("trl_select")
    saved = (events.level, list(events.handlers), events.propagate, package.level)
    events.setLevel(logging.NOTSET)
    package.setLevel(logging.NOTSET)
    events.handlers.clear()
    yield events
    events.setLevel(saved[0])
    events.handlers[:] = saved[1]
    events.propagate = saved[2]
    package.setLevel(saved[3])


def test_event_lines_show_by_default_and_respect_the_users_configuration(fresh_event_logger):
    events = fresh_event_logger
    root_handlers = list(logging.getLogger().handlers)
    logging.getLogger().handlers.clear()  # as in a script: no handler configured (pytest's are put back below)
    try:
        show_selection_events("passive")
        assert events.level == logging.INFO and len(events.handlers) == 1 and not events.propagate
        assert logging.getLogger("trl_select.callback").getEffectiveLevel() == logging.WARNING  # only the events
        show_selection_events("passive")
        assert len(events.handlers) == 1  # not twice
    finally:
        logging.getLogger().handlers[:] = root_handlers
    events.handlers.clear()
    events.setLevel(logging.NOTSET)
    events.propagate = True
    show_selection_events("warning")  # `--log_level warning` hides them
    assert not events.isEnabledFor(logging.INFO)
    events.setLevel(logging.ERROR)  # the user's own choice is kept
    show_selection_events("passive")
    assert events.level == logging.ERROR
    events.setLevel(logging.NOTSET)
    logging.getLogger("trl_select").setLevel(logging.WARNING)  # a level for the whole package is kept too
    show_selection_events("passive")
    assert events.level == logging.NOTSET and not events.isEnabledFor(logging.INFO)


def test_validation_error_names_the_script_flags(tmp_path, tokenizer, tiny_model, pool):
    with pytest.raises(ValueError, match="--eval_strategy epoch.*--dataset_test_split.*--selection_rule irm_band"):
        SelectiveDPOTrainer(
            tiny_model,
            ref_model=copy.deepcopy(tiny_model),
            args=fast_config(tmp_path),
            train_dataset=pool,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "fields, inert",
    [
        ({"label_smoothing": 0.1}, "label_smoothing=0.1"),  # TRL's sigmoid ignores it (dpo_trainer.py:1387-1388)
        ({"loss_type": ["ipo"], "label_smoothing": 0.2}, "label_smoothing=0.2"),
        ({"discopop_tau": 0.5}, "discopop_tau=0.5"),
        ({"f_alpha_divergence_coef": 0.3}, "f_alpha_divergence_coef=0.3"),
    ],
)
def test_inert_options_warn(fields, inert, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_select.config"):
        SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, **fields)
    assert inert in caplog.text and "no effect" in caplog.text


@pytest.mark.parametrize(
    "fields",
    [
        {"loss_type": ["robust"], "label_smoothing": 0.1},
        {"loss_type": ["discopop"], "discopop_tau": 0.5},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {},
    ],
)
def test_options_that_are_read_do_not_warn(fields, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_select.config"):
        SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, **fields)
    assert "no effect" not in caplog.text
