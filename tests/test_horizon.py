"""The run's horizon: `state.max_steps` follows the selection, and every `train()` loop starts from the full pool.

Covers a second `train()` call, the `auto_find_batch_size` OOM retry (emulated with a fake CUDA OOM, which
`accelerate.utils.memory.should_reduce_batch_size` recognises by its message), the final save/eval that transformers
forces on the last step, fractional `*_steps`, the progress bar's total and the `train()` speed metrics.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import transformers
from accelerate.utils.memory import should_reduce_batch_size
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback

from trl_select import read_history
from trl_select.callback import SelectionOutOfMemoryError

from .recording import RecordingTrainer
from .testing_utils import fast_config


POOL_SIZE = 100
BATCH = 16
FULL_STEPS_PER_EPOCH = math.ceil(POOL_SIZE / BATCH)  # 7
EPOCHS = 3
FULL_HORIZON = EPOCHS * FULL_STEPS_PER_EPOCH  # 21: what transformers computes from the full pool


def _fake_oom() -> RuntimeError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (emulated by trl_select tests)")


class _BarProbe(TrainerCallback):
    """At each epoch's end: the progress bar's total next to `state.max_steps`."""

    def __init__(self, trainer: RecordingTrainer) -> None:
        self.trainer = trainer
        self.totals: dict[int, tuple[int, int]] = {}

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        bars = [cb.training_bar for cb in self.trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
        self.totals[round(state.epoch) - 1] = (bars[0].total, state.max_steps)


class OOMOnceTrainer(RecordingTrainer):
    """Raises a fake CUDA OOM once, in the first micro-batch of optimizer step `fail_at_step + 1`.

    Each (re-)entry of the inner loop clears what `RecordingTrainer` recorded, so the recordings describe the loop that
    finished; `loop_batch_sizes` keeps the batch size each loop ran with and `micro_batches` every micro-batch's size.
    """

    def __init__(self, *args, fail_at_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at_step = fail_at_step
        self.failed = False
        self.loop_batch_sizes: list[int] = []
        self.micro_batches: Counter = Counter()

    def _inner_training_loop(self, batch_size=None, *args, **kwargs):
        self.received.clear()
        self.steps_per_epoch.clear()
        self.step_prompts.clear()
        self.step_lr.clear()
        self.micro_batches.clear()
        self.loop_batch_sizes.append(batch_size)
        return super()._inner_training_loop(batch_size, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.failed and self.state.global_step == self.fail_at_step:
            self.failed = True
            raise _fake_oom()
        self.micro_batches[inputs["input_ids"].shape[0] // 2] += 1  # chosen and rejected rows
        return super().training_step(model, inputs, num_items_in_batch)


def _check_run(trainer: RecordingTrainer, pool, batch_size: int) -> list[dict]:
    """The finished loop trained every epoch of the schedule, each on exactly its recorded selection."""
    history = read_history(trainer.args.output_dir)
    assert [(r["epoch"], r["event"]) for r in history] == [(0, "warmup"), (1, "selection"), (2, "selection")]
    assert history[0]["selected_ids"] == list(range(POOL_SIZE))
    id_of_prompt = dict(zip(pool["prompt"], pool["id"], strict=True))
    for record in history:
        epoch = record["epoch"]
        assert sorted(id_of_prompt[p] for p in trainer.received[epoch]) == sorted(record["selected_ids"])
        assert trainer.steps_per_epoch[epoch] == math.ceil(record["num_selected"] / batch_size)
    assert trainer.state.epoch == pytest.approx(EPOCHS)
    assert trainer.state.global_step == sum(trainer.steps_per_epoch.values())
    assert trainer.state.max_steps == trainer.state.global_step  # the last step is recognised as the last
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the LR schedule ended there too
    return history


def _trainer(cls, output_dir, tokenizer, model, pool, validation, *, extra=None, **overrides):
    args = fast_config(output_dir, lr_scheduler_type="linear", **overrides)
    return cls(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        **(extra or {}),
    )


def test_the_fake_oom_is_one_accelerate_retries():
    assert should_reduce_batch_size(_fake_oom())


def test_second_train_call_runs_the_whole_schedule_again(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = _trainer(RecordingTrainer, tmp_path, tokenizer, tiny_model, pool, validation)
    trainer.train()
    first = _check_run(trainer, pool, BATCH)
    assert first[-1]["num_selected"] < POOL_SIZE  # the sampler ends the first call holding a selection
    for record in (trainer.received, trainer.steps_per_epoch, trainer.step_prompts, trainer.step_lr):
        record.clear()

    trainer.train()  # a new run from step 0 (the Trainer's semantics), on the weights the first one left

    _check_run(trainer, pool, BATCH)
    assert trainer.steps_per_epoch[0] == FULL_STEPS_PER_EPOCH


@pytest.mark.parametrize("where", ["epoch0", "after_selection"])
def test_oom_retry_restarts_from_the_full_pool_at_the_smaller_batch(
    tmp_path, tokenizer, tiny_model, pool, validation, where
):
    # Optimizer step 3 is inside the warm-up epoch; step 9 is the second of epoch 1, after its selection was made.
    fail_at_step = {"epoch0": 2, "after_selection": FULL_STEPS_PER_EPOCH + 1}[where]
    trainer = _trainer(
        OOMOnceTrainer,
        tmp_path,
        tokenizer,
        tiny_model,
        pool,
        validation,
        auto_find_batch_size=True,
        extra={"fail_at_step": fail_at_step},
    )
    trainer.train()

    reduced = int(BATCH * 0.9)  # accelerate's find_executable_batch_size: 16 -> 14
    assert trainer.failed and trainer.loop_batch_sizes == [BATCH, reduced]
    history = _check_run(trainer, pool, reduced)  # warm-up recorded again, nothing recorded twice
    assert max(trainer.micro_batches) <= reduced  # the sampler follows the live batch size
    assert trainer.selection_sampler.max_batch_size == reduced
    assert trainer.steps_per_epoch[0] == math.ceil(POOL_SIZE / reduced)
    assert history[0]["global_step"] == 0 and history[1]["global_step"] == math.ceil(POOL_SIZE / reduced)


def test_an_oom_inside_a_selection_event_stops_the_run_naming_the_event_batch_sizes(
    tmp_path, tokenizer, tiny_model, pool, validation
):
    # accelerate would retry the whole loop from step 0 on the trained weights, with the event's batch sizes unchanged.
    trainer = _trainer(
        OOMOnceTrainer,
        tmp_path,
        tokenizer,
        tiny_model,
        pool,
        validation,
        auto_find_batch_size=True,
        scoring_batch_size=24,
        extra={"fail_at_step": -1},
    )

    def compute_scores(*args, **kwargs):
        raise _fake_oom()

    trainer.selection_engine.compute_scores = compute_scores
    with pytest.raises(SelectionOutOfMemoryError, match="scoring_batch_size`=24") as raised:
        trainer.train()
    assert not should_reduce_batch_size(raised.value)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert trainer.loop_batch_sizes == [BATCH]  # one training loop: no retry on trained weights
    assert trainer.state.global_step == FULL_STEPS_PER_EPOCH  # stopped at the first event


def test_final_step_saves_and_evaluates(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = _trainer(
        RecordingTrainer,
        tmp_path,
        tokenizer,
        tiny_model,
        pool,
        validation,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        disable_tqdm=False,
    )
    probe = _BarProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()

    _check_run(trainer, pool, BATCH)
    last = trainer.state.global_step
    assert last < FULL_HORIZON and last % 4 != 0  # the end is not a multiple of save/eval steps: forced by the end
    assert (tmp_path / f"checkpoint-{last}").is_dir()
    eval_steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_steps[-1] == last and eval_steps[:-1] == list(range(4, last, 4))
    assert trainer.state.best_model_checkpoint is not None
    # The progress bar's total is the horizon, re-estimated at each selection and exact for the last epoch
    assert probe.totals[0] == (FULL_HORIZON, FULL_HORIZON)
    assert all(total == max_steps for total, max_steps in probe.totals.values())
    assert probe.totals[EPOCHS - 1] == (last, last)


def test_fractional_steps_resolve_against_the_full_pool_horizon(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = _trainer(
        RecordingTrainer,
        tmp_path,
        tokenizer,
        tiny_model,
        pool,
        validation,
        save_strategy="steps",
        save_steps=0.25,
        logging_steps=0.1,
    )
    trainer.train()

    save_steps = math.ceil(FULL_HORIZON * 0.25)  # 6, not a quarter of the shorter real run
    assert trainer.state.save_steps == save_steps and trainer.state.logging_steps == math.ceil(FULL_HORIZON * 0.1)
    last = trainer.state.global_step
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved == [*range(save_steps, last, save_steps), last]


def test_train_metrics_count_the_pairs_and_steps_actually_trained(tmp_path, tokenizer, tiny_model, pool, validation):
    trainer = _trainer(RecordingTrainer, tmp_path, tokenizer, tiny_model, pool, validation)
    metrics = trainer.train().metrics

    pairs = sum(r["num_selected"] for r in read_history(tmp_path))
    assert pairs < EPOCHS * POOL_SIZE
    runtime = metrics["train_runtime"]
    assert metrics["train_samples_per_second"] * runtime == pytest.approx(pairs, rel=2e-3)
    assert metrics["train_steps_per_second"] * runtime == pytest.approx(trainer.state.global_step, rel=2e-3)


def test_transformers_internals_the_horizon_relies_on():
    """Pins what `set_horizon`, `_inner_training_loop` and `_finalize_training` assume; fails loudly on an upgrade."""
    loop = inspect.getsource(transformers.Trainer._inner_training_loop)
    # The full-pool reset must precede the dataloader, which precedes the step counts (sized from its length)
    assert loop.index("self.get_train_dataloader()") < loop.index("self.set_initial_training_values(")
    assert loop.index("self._init_training_state(") < loop.index("on_train_begin")
    assert list(inspect.signature(transformers.Trainer._inner_training_loop).parameters) == [
        "self",
        "batch_size",
        "args",
        "resume_from_checkpoint",
        "trial",
        "ignore_keys_for_eval",
    ]
    flow = inspect.getsource(DefaultFlowCallback.on_step_end)
    assert "state.global_step >= state.max_steps" in flow and "control.should_save = True" in flow
    assert "tqdm(total=state.max_steps" in inspect.getsource(ProgressCallback.on_train_begin)
    finalize = inspect.getsource(transformers.Trainer._finalize_training)
    assert "num_samples=num_train_samples * num_steps_trained / max(self.state.max_steps, 1)" in finalize
    assert "num_steps_trained = self.state.global_step - self._initial_global_step" in finalize
    assert "state.compute_steps(self.args, max_steps)" in inspect.getsource(transformers.Trainer._init_training_state)


def test_set_horizon_resizes_every_kind_of_progress_bar():
    """The tqdm bar, the notebook tracker and TRL's rich task all take their total from `state.max_steps` once."""
    from rich.progress import Progress
    from tqdm.auto import tqdm
    from transformers import TrainerState
    from transformers.utils.notebook import NotebookProgressCallback, NotebookTrainingTracker
    from trl.trainer.callbacks import RichProgressCallback

    from trl_select import SelectiveDPOTrainer

    plain, notebook, rich = ProgressCallback(), NotebookProgressCallback(), RichProgressCallback()
    plain.training_bar = tqdm(total=FULL_HORIZON, disable=True)
    notebook.training_tracker = NotebookTrainingTracker(FULL_HORIZON)
    rich.training_bar = Progress()
    rich.training_task = rich.training_bar.add_task("Training", total=FULL_HORIZON)
    trainer = SimpleNamespace(
        state=TrainerState(max_steps=FULL_HORIZON), callback_handler=SimpleNamespace(callbacks=[plain, notebook, rich])
    )
    SelectiveDPOTrainer.set_horizon(trainer, 15)

    assert trainer.state.max_steps == 15
    assert plain.training_bar.total == notebook.training_tracker.total == 15
    assert rich.training_bar.tasks[rich.training_task].total == 15
