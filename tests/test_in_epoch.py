"""Selection in one-epoch and step-budget runs: the `steps` strategy's events, `max_steps`, fractional epochs."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_select import SelectiveDPOConfig, read_history
from trl_select.callback import SelectionCallback
from trl_select.schedule import RetimedLR
from trl_select.segments import (
    chunk_size,
    next_event_step,
    resolve_steps,
    split_kept,
    whole_step_batch_sizes,
)
from trl_select.testing import build_tiny_llama
from trl_select.validation import event_schedule

from .recording import RecordingTrainer
from .testing_utils import fast_config


# ----- the arithmetic -----


def test_event_steps_follow_the_warmup_then_the_interval():
    assert [next_event_step(step, 10, 5) for step in (0, 9, 10, 14, 15, 23)] == [10, 10, 15, 15, 20, 25]


def test_fractional_steps_resolve_like_eval_steps():
    assert resolve_steps(0.2, 36) == 8  # ceil(7.2), as transformers resolves a fractional eval_steps
    assert resolve_steps(7, 36) == 7


def test_segments_are_whole_optimizer_steps_of_at_most_the_batch_size():
    assert whole_step_batch_sizes(15, 4, 2) == [4, 4, 4, 3]
    assert whole_step_batch_sizes(16, 4, 1) == [4, 4, 4, 4]
    # Fewer rows than the batches of one whole step at size 1: only the whole steps the rows fill are kept
    assert whole_step_batch_sizes(5, 1, 4) == [1, 1, 1, 1]
    assert whole_step_batch_sizes(3, 4, 4) == []
    for rows, batch, accumulation in [(37, 4, 3), (100, 8, 4), (9, 2, 2)]:
        sizes = whole_step_batch_sizes(rows, batch, accumulation)
        assert len(sizes) % accumulation == 0 and max(sizes) <= batch and sum(sizes) <= rows


def test_chunk_is_sized_by_the_kept_fraction_and_split_in_pass_order():
    assert chunk_size(64, 0.64, 1000) == math.ceil(1.1 * 64 / 0.64)
    assert chunk_size(64, 0.64, 50) == 50
    segment, surplus, dropped = split_kept([7, 3, 9, 1, 4], np.array([True, False, True, True, True]), 2)
    assert (segment, surplus, dropped) == ([7, 9], [1, 4], [3])


# ----- when a run selects -----


def _schedule(tmp_path, pool_size=400, batch=8, **overrides):
    args = fast_config(tmp_path, per_device_train_batch_size=batch, **overrides)
    return event_schedule(args, pool_size, batch, 1, {"policy", "reference", "auxiliary"})


def test_auto_selects_inside_one_epoch_and_at_boundaries_of_several(tmp_path):
    one = _schedule(tmp_path, num_train_epochs=1)
    assert (one.strategy, one.horizon, one.warmup_steps, one.interval) == ("steps", 50, 10, 10)
    # TRL's dpo.py command: one epoch, `max_steps` inside it
    assert _schedule(tmp_path, num_train_epochs=1, max_steps=30).strategy == "steps"
    assert _schedule(tmp_path, num_train_epochs=3).strategy == "epoch"
    assert _schedule(tmp_path, num_train_epochs=1, max_steps=120).strategy == "epoch"  # crosses epoch boundaries


def test_schedules_with_no_event_are_refused_with_the_flag_named(tmp_path):
    with pytest.raises(ValueError, match="--selection_strategy steps"):
        _schedule(tmp_path, num_train_epochs=1, selection_strategy="epoch")
    with pytest.raises(ValueError, match="--selection_warmup_steps"):
        _schedule(tmp_path, num_train_epochs=1, selection_warmup_steps=60)
    with pytest.raises(ValueError, match="shorter than one step"):
        _schedule(tmp_path, num_train_epochs=1, max_steps=4, selection_steps=0.1)
    with pytest.raises(ValueError, match="--aux_refresh_epochs 1"):
        _schedule(tmp_path, num_train_epochs=1, aux_refresh_epochs=2)
    with pytest.raises(ValueError, match="selection_steps"):
        SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, selection_steps=0)


def test_lr_retiming_follows_the_schedulers_counter_through_skipped_steps():
    # The Trainer does not step the scheduler on a skipped optimizer step (fp16 overflow). A retarget anchored on
    # `global_step` (as before) ends the schedule `skipped` scheduler steps after the run's last step, LR not yet 0.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = RetimedLR(optimizer, [lambda step: max(0.0, 1 - step / 100)], horizon=100)
    for global_step in range(1, 21):  # 20 optimizer steps, 4 of them skipped
        if global_step % 5:
            optimizer.step()
            scheduler.step()
    assert scheduler.last_epoch == 16
    callback = SelectionCallback.__new__(SelectionCallback)
    callback.trainer = SimpleNamespace(set_horizon=lambda horizon: None, lr_scheduler=scheduler)
    callback._move_horizon(SimpleNamespace(global_step=20), 50)  # the run now ends at global step 50
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


# ----- runs -----


@pytest.fixture(scope="module")
def pool_and_validation(reverse_rows):
    return Dataset.from_list(reverse_rows["train"][:400]), Dataset.from_list(reverse_rows["validation"][:48])


def _run(output_dir, tokenizer, pool, validation, resume=None, **overrides):
    model = build_tiny_llama(tokenizer, seed=0)
    settings = {"per_device_train_batch_size": 8, "num_train_epochs": 1, **overrides}
    trainer = RecordingTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=fast_config(output_dir, **settings),
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _trained_ids(trainer, pool) -> dict[int, list[int]]:
    """Optimizer step (1-based) -> the ids of the pairs it trained."""
    id_of_prompt = dict(zip(pool["prompt"], pool["id"], strict=True))
    return {step: [id_of_prompt[p] for p in prompts] for step, prompts in trainer.step_prompts.items()}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, tokenizer, pool_and_validation):
    pool, validation = pool_and_validation
    output_dir = tmp_path_factory.mktemp("one_epoch")
    trainer = _run(output_dir, tokenizer, pool, validation, save_strategy="steps", save_steps=7)
    return output_dir, trainer, read_history(output_dir)


def test_one_epoch_selects_inside_the_epoch(one_epoch, pool_and_validation):
    output_dir, trainer, history = one_epoch
    pool, _ = pool_and_validation
    assert [r["event"] for r in history][:2] == ["warmup", "selection"]
    events = [r for r in history if r["event"] == "selection"]
    assert len(events) >= 2 and all(r["epoch"] == 0 for r in history)
    assert [r["global_step"] for r in events[:2]] == [10, 20]  # warm-up 0.2 and every 0.2 of the 50 steps
    for record in events:
        assert record["num_selected"] <= record["num_kept"] < record["num_scored"] < len(pool)
    steps = _trained_ids(trainer, pool)
    # Every step trains pairs of the latest event's `selected_ids`, and no pair twice in the epoch (one pass)
    starts = [r["global_step"] for r in history]
    for step, ids in steps.items():
        record = history[max(i for i, start in enumerate(starts) if start < step)]
        assert set(ids) <= set(record["selected_ids"]), step
    trained = [i for ids in steps.values() for i in ids]
    assert len(trained) == len(set(trained))
    assert sorted(trained) == sorted(i for r in history for i in r["selected_ids"])
    # The epoch ends where its pass runs out of pairs, and the LR schedule ends with it
    assert trainer.state.global_step == trainer.state.max_steps == max(steps) < 50
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert trainer.selection_engine.compute.fte["policy_scoring"] > 0


def test_resume_between_in_epoch_events_continues_the_same_run(one_epoch, tmp_path, tokenizer, pool_and_validation):
    output_dir, trainer, history = one_epoch
    pool, validation = pool_and_validation
    # Step 14: inside the second selection's segment (events at 10 and 20), with its selection in the checkpoint.
    checkpoint = output_dir / "checkpoint-14"
    assert checkpoint.is_dir()
    resumed = _run(
        output_dir, tokenizer, pool, validation, save_strategy="steps", save_steps=7, resume=str(checkpoint)
    )
    before, after = _trained_ids(trainer, pool), _trained_ids(resumed, pool)
    assert after == {step: ids for step, ids in before.items() if step > 14}
    assert resumed.step_lr == {step: lr for step, lr in trainer.step_lr.items() if step > 14}
    assert read_history(output_dir) == history


def test_max_steps_ends_exactly_there_with_a_selection_at_each_epoch_boundary(
    tmp_path, tokenizer, pool_and_validation
):
    pool, validation = pool_and_validation
    trainer = _run(tmp_path, tokenizer, pool, validation, num_train_epochs=1, max_steps=90, lr_scheduler_type="linear")
    history = read_history(tmp_path)
    assert [r["event"] for r in history] == ["warmup", "selection", "selection"]
    # Epochs of the selection's length follow the 50-step warm-up epoch: each boundary crossed selected
    assert history[1]["global_step"] == 50
    assert history[2]["global_step"] == 50 + math.ceil(history[1]["num_selected"] / 8)
    assert trainer.state.global_step == trainer.state.max_steps == 90 == max(trainer.step_lr)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_fractional_epochs_end_that_far_into_the_last_epoch(tmp_path, tokenizer, pool_and_validation):
    pool, validation = pool_and_validation
    trainer = _run(tmp_path, tokenizer, pool, validation, num_train_epochs=1.5, aux_max_steps=1)
    history = read_history(tmp_path)
    assert [r["event"] for r in history] == ["warmup", "selection"]
    selected_steps = math.ceil(history[1]["num_selected"] / 8)
    assert trainer.state.global_step == 50 + math.ceil(0.5 * selected_steps)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_schedule_is_said_once_on_the_console(tmp_path, tokenizer, pool_and_validation, caplog):
    pool, validation = pool_and_validation
    model = build_tiny_llama(tokenizer, seed=0)
    with caplog.at_level("WARNING", logger="trl_select"):
        RecordingTrainer(
            model,
            ref_model=copy.deepcopy(model),
            args=fast_config(tmp_path, num_train_epochs=1, per_device_train_batch_size=8),
            train_dataset=pool,
            eval_dataset=validation,
            processing_class=tokenizer,
        )
    lines = [r.getMessage() for r in caplog.records if "selects inside the epochs" in r.getMessage()]
    assert len(lines) == 1 and "first at step 10, then every 10 steps" in lines[0]


def test_chunk_scores_equal_whole_pool_scores_of_the_same_rows(one_epoch, pool_and_validation):
    """An in-epoch event's chunk scores are the whole-pool pass's for those rows (same θ, same π_ref)."""
    _, trainer, _ = one_epoch
    engine = trainer.selection_engine
    rows = [5, 17, 3, 250, 120]
    chunk = engine.policy_log_probs(rows=rows)
    whole = engine.policy_log_probs()
    torch.testing.assert_close(chunk.chosen, whole.chosen[rows], rtol=1e-5, atol=1e-5)
    reference = engine.reference_log_probs(rows=rows)
    torch.testing.assert_close(reference.rejected, engine.reference_log_probs().rejected[rows], rtol=1e-5, atol=1e-5)
    context = engine.selection_context(0, rows)
    assert context.pool_size == len(rows) and context.pair_ids == [engine.pair_ids[r] for r in rows]


def test_steps_strategy_refuses_model_based_rules(tmp_path):
    args = SimpleNamespace(
        max_steps=-1,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
        selection_strategy="steps",
        selection_warmup_epochs=1,
        selection_rule="tif",
        aux_refresh_epochs=1,
        selection_steps=0.2,
        selection_warmup_steps=0.2,
    )
    with pytest.raises(ValueError, match="--selection_strategy epoch"):
        event_schedule(args, 400, 8, 1, {"model", "validation"})
