"""Checkpoint/resume continues the exact run (same pairs, same LR per step), determinism, and refused checkpoints."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from datasets import Dataset
from peft import LoraConfig

from trl_select import read_history
from trl_select.checkpoint import LOG_PROBS_FILENAME, STATE_FILENAME, SelectionState, resume_position
from trl_select.history import HISTORY_FILENAME
from trl_select.testing import build_tiny_llama

from .recording import RecordingTrainer
from .testing_utils import REPO, fast_config


# 3 epochs over 64 pairs in batches of 8 with accumulation 2: epoch 0 has 4 optimizer steps, the selected epochs ~3.
# aux_refresh_epochs=2: epoch 2 reuses the aux log-probs of epoch 1, so they must travel in the checkpoint.
SETTINGS = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "aux_refresh_epochs": 2,
}


def _trainer(output_dir, tokenizer, pool, validation, peft=False, **overrides):
    model = build_tiny_llama(tokenizer, seed=0)
    args = fast_config(output_dir, **{**SETTINGS, **overrides})
    extra = (
        {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
        if peft
        else {"ref_model": copy.deepcopy(model)}
    )
    return RecordingTrainer(
        model, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer, **extra
    )


def _steps(trainer, pool) -> dict[int, tuple[list[int], float]]:
    """Optimizer step -> (sorted pair ids it trained on, its LR)."""
    id_of_prompt = dict(zip(pool["prompt"], pool["id"], strict=True))
    return {
        step: (sorted(id_of_prompt[p] for p in prompts), trainer.step_lr[step])
        for step, prompts in trainer.step_prompts.items()
    }


@pytest.fixture(scope="module")
def small_pool(reverse_rows):
    return Dataset.from_list(reverse_rows["train"][:64]), Dataset.from_list(reverse_rows["validation"][:16])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer, small_pool):
    """The reference run, with a checkpoint at every optimizer step."""
    pool, validation = small_pool
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = _trainer(output_dir, tokenizer, pool, validation, save_strategy="steps", save_steps=1)
    trainer.train()
    return output_dir, trainer, _steps(trainer, pool)


def test_same_seed_gives_a_byte_identical_history(tmp_path, tokenizer, small_pool, uninterrupted):
    output_dir, _, _ = uninterrupted
    pool, validation = small_pool
    _trainer(tmp_path, tokenizer, pool, validation).train()
    first, second = (output_dir / HISTORY_FILENAME).read_bytes(), (tmp_path / HISTORY_FILENAME).read_bytes()
    assert len(read_history(tmp_path)) == 3 and read_history(tmp_path)[1]["event"] == "selection"
    assert first == second


def _checkpoint_steps(output_dir) -> dict[str, int]:
    """Where each epoch began (global step), from the history."""
    history = read_history(output_dir)
    return {"epoch1_start": history[1]["global_step"], "epoch2_start": history[2]["global_step"]}


@pytest.mark.parametrize(
    "where",
    [
        "mid_epoch1",  # inside the first shortened epoch: the selection is restored, not recomputed
        "mid_epoch2",  # after a shortened epoch: `global_step // full-pool steps per epoch` would be wrong here
        "end_epoch0",  # warm-up epoch done: the resumed run scores, aligns the aux model and selects
        "end_epoch1",  # first selected epoch done: the next selection reuses the checkpoint's cached aux log-probs
    ],
)
def test_resume_continues_the_same_run(tmp_path, tokenizer, small_pool, uninterrupted, where):
    source_dir, reference_trainer, reference_steps = uninterrupted
    pool, validation = small_pool
    starts = _checkpoint_steps(source_dir)
    step = {
        "mid_epoch1": starts["epoch1_start"] + 1,
        "mid_epoch2": starts["epoch2_start"] + 1,
        "end_epoch0": starts["epoch1_start"],
        "end_epoch1": starts["epoch2_start"],
    }[where]
    # The mid-epoch checkpoints really are inside their epochs
    assert starts["epoch2_start"] - starts["epoch1_start"] >= 3
    assert reference_trainer.state.global_step - starts["epoch2_start"] >= 3
    checkpoint = tmp_path / f"checkpoint-{step}"
    shutil.copytree(source_dir / f"checkpoint-{step}", checkpoint)
    # The output directory's history runs past the checkpoint (the run went on after it): resume must not keep that.
    shutil.copy(source_dir / HISTORY_FILENAME, tmp_path / HISTORY_FILENAME)
    saved = json.loads((checkpoint / STATE_FILENAME).read_text())
    assert saved["aux_num_refreshes"] == (1 if step > starts["epoch1_start"] else 0)  # seeds the next aux shuffle
    assert saved["global_step"] == step and (checkpoint / LOG_PROBS_FILENAME).exists()
    # Before the first event: π_ref's log-probs as the warm-up steps recorded them (`scoring_reuse="reference"`);
    # after it: the cached ones the event computed from them.
    cached = "reference.chosen" in saved["log_probs"]
    assert cached == (step > starts["epoch1_start"]) and cached != ("training_reference.chosen" in saved["log_probs"])

    trainer = _trainer(tmp_path, tokenizer, pool, validation)
    trainer.train(resume_from_checkpoint=str(checkpoint))

    resumed_steps = _steps(trainer, pool)
    expected = {s: v for s, v in reference_steps.items() if s > step}
    assert sorted(resumed_steps) == sorted(expected)  # no step skipped or repeated
    for s in expected:
        assert resumed_steps[s][0] == expected[s][0], f"step {s} trained other pairs"
        assert resumed_steps[s][1] == pytest.approx(expected[s][1], rel=1e-12), f"step {s} has another LR"
    assert trainer.state.global_step == reference_trainer.state.global_step
    assert trainer.state.max_steps == trainer.state.global_step  # the resumed run's horizon is the selective one
    reference_losses = {h["step"]: h["loss"] for h in reference_trainer.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert resumed_losses == pytest.approx({s: reference_losses[s] for s in resumed_losses}, rel=1e-5)
    assert (tmp_path / HISTORY_FILENAME).read_bytes() == (source_dir / HISTORY_FILENAME).read_bytes()


def test_peft_resume_mid_epoch_continues_the_same_run(tmp_path, tokenizer, small_pool):
    """A LoRA policy: the adapter is what the checkpoint holds, π_ref is the base model with the adapter disabled."""
    pool, validation = small_pool
    reference = _trainer(
        tmp_path / "full",
        tokenizer,
        pool,
        validation,
        peft=True,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=1,
    )
    reference.train()
    step = read_history(tmp_path / "full")[2]["global_step"] + 1
    assert step < reference.state.global_step
    trainer = _trainer(tmp_path / "resumed", tokenizer, pool, validation, peft=True, learning_rate=5e-3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
    expected = {s: v for s, v in _steps(reference, pool).items() if s > step}
    assert expected and _steps(trainer, pool) == expected
    assert (tmp_path / "resumed" / HISTORY_FILENAME).read_bytes() == (
        tmp_path / "full" / HISTORY_FILENAME
    ).read_bytes()


def test_resume_refuses_another_pool_or_config(tmp_path, tokenizer, small_pool, uninterrupted):
    source_dir, _, _ = uninterrupted
    pool, validation = small_pool
    checkpoint = str(source_dir / f"checkpoint-{_checkpoint_steps(source_dir)['epoch1_start'] + 1}")
    other_pool = pool.map(lambda row: {"chosen": row["chosen"] + "0"} if row["id"] == 5 else {})
    with pytest.raises(ValueError, match="different training pool"):
        _trainer(tmp_path, tokenizer, other_pool, validation).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ValueError, match="`irm_lo_percentile`: 10.0 in the checkpoint, 20.0 now"):
        _trainer(tmp_path, tokenizer, pool, validation, irm_lo_percentile=20.0).train(
            resume_from_checkpoint=checkpoint
        )
    bare = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, bare)
    (bare / STATE_FILENAME).unlink()
    with pytest.raises(ValueError, match="has no selection state"):
        _trainer(tmp_path, tokenizer, pool, validation).train(resume_from_checkpoint=str(bare))


# Runs the uninterrupted run's settings, checkpointing every epoch, and hangs at a chosen point of a selection event
# after writing a marker file, so the test can SIGKILL it there.
CRASH_SCRIPT = """
import sys, time
from pathlib import Path
from datasets import Dataset
from peft import LoraConfig
from trl_select.auxiliary import AuxiliaryModel
from trl_select.callback import SelectionCallback
from trl_select.testing import build_char_tokenizer, read_jsonl
from tests.testing_utils import DEMO_DATA
from tests.test_resume import _trainer

output_dir, where, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
owner, name, call = (SelectionCallback, "policy_log_probs", 2) if where == "scoring" else (AuxiliaryModel, "_align", 1)
original, calls = getattr(owner, name), []

def hang(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == call:
        marker.write_text(where)
        time.sleep(600)
    return original(self, *args, **kwargs)

setattr(owner, name, hang)
pool = Dataset.from_list(read_jsonl(DEMO_DATA / "train.jsonl")[:64])
validation = Dataset.from_list(read_jsonl(DEMO_DATA / "validation.jsonl")[:16])
_trainer(output_dir, build_char_tokenizer(), pool, validation, save_strategy="epoch").train()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, last_epoch_saved",
    [
        ("aux", 0),  # killed aligning the aux model of the first selection (epoch 1)
        ("scoring", 1),  # killed scoring the pool with the policy for the second selection (epoch 2)
    ],
)
def test_sigkill_during_a_selection_leaves_a_usable_checkpoint(
    tmp_path, tokenizer, small_pool, uninterrupted, where, last_epoch_saved
):
    source_dir, reference_trainer, reference_steps = uninterrupted
    pool, validation = small_pool
    marker = tmp_path / "marker"
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(output_dir), where, str(marker)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        process.kill()
        pytest.fail(f"the run never reached the {where} point: {process.communicate()[1].decode()[-3000:]}")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    epoch_starts = [record["global_step"] for record in read_history(source_dir)]
    last_step = epoch_starts[last_epoch_saved + 1]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*"))[-1] == f"checkpoint-{last_step}"
    # Whole records of the finished events only: the killed event never reached the file
    assert [r["epoch"] for r in read_history(output_dir)] == list(range(last_epoch_saved + 1))
    # ... and the run resumes from the last checkpoint to the very end the uninterrupted run reached
    trainer = _trainer(output_dir, tokenizer, pool, validation)
    trainer.train(resume_from_checkpoint=True)
    resumed = _steps(trainer, pool)
    assert resumed == {s: v for s, v in reference_steps.items() if s > last_step}
    assert (output_dir / HISTORY_FILENAME).read_bytes() == (source_dir / HISTORY_FILENAME).read_bytes()


def _state(epoch_start_step: int, batches_in_epoch: int) -> SelectionState:
    return SelectionState(
        global_step=0,
        epoch=2,
        epoch_start_step=epoch_start_step,
        batches_in_epoch=batches_in_epoch,
        selected_rows=[0, 1],
        previous_selection=None,
        aux_num_refreshes=1,
        pool={},
        config={},
    )


@pytest.mark.parametrize(
    "global_step, accumulation, expected",
    [
        (10, 1, (2, 0)),  # the epoch began at 10: nothing trained yet
        (13, 1, (2, 3)),
        (15, 1, (3, 0)),  # all 5 batches trained: the next epoch starts fresh
        (12, 2, (2, 4)),  # 2 full accumulations = 4 batches
        (13, 2, (3, 0)),  # ceil(5 / 2) = 3 steps, the last one partial
    ],
)
def test_resume_position_counts_the_saved_epoch_not_the_full_pool(global_step, accumulation, expected):
    assert resume_position(_state(10, 5), global_step, accumulation) == expected


def test_resume_position_refuses_a_step_outside_the_saved_epoch():
    with pytest.raises(ValueError, match="inconsistent"):
        resume_position(_state(10, 5), 16, 1)
