"""Bad input fails before any model runs, with an error that names the field or row and the fix.

Kinds covered here and elsewhere (at least 12):
  here: missing `chosen`/`rejected` column; wrong value types; empty completions; chosen == rejected; missing and
  duplicate ids; bad validation rows; empty validation set; validation smaller than one batch per rank (before and
  after tokenization); bands too narrow to fill a batch; a selection keeping fewer pairs than one batch per rank;
  NaN/±inf scores never kept (through the trainer).
  tests/test_config.py: bands out of [0, 100] and lo >= hi, and every other config field.
  tests/test_trainer.py::test_construction_errors_name_the_fix: validation set missing, streaming or empty pool.
  tests/test_resume.py: a resume checkpoint from another pool, another config, or without selection state.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from datasets import Dataset

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.engine import ScoringEngine
from trl_select.validation import check_preference_rows

from .testing_utils import fast_config


def _rows(n: int = 20) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"{i}=", "chosen": f"{i}a", "rejected": f"{i}b"} for i in range(n)]


def _build(tmp_path, model, tokenizer, train, validation=None, **overrides):
    return SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=fast_config(tmp_path, **overrides),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
    )


def _edited(row_index: int, **changes) -> Dataset:
    rows = _rows()
    rows[row_index].update(changes)
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "dataset, error, message",
    [
        (Dataset.from_list(_rows()).remove_columns("chosen"), ValueError, "`train_dataset` has no `chosen` column"),
        (Dataset.from_list(_rows()).rename_column("rejected", "loser"), ValueError, "no `rejected` column.*rename"),
        (
            Dataset.from_list(_rows()).map(lambda r, i: {"chosen": i}, with_indices=True),
            TypeError,
            r"column `chosen` must hold strings or conversations.*20 row\(s\) do not, e.g. int 0 at row 0 \(id 'p0'\)",
        ),
        (_edited(3, prompt=None), TypeError, r"column `prompt` .* row 3 \(id 'p3'\)"),
        (_edited(4, chosen=""), ValueError, r"column `chosen` is empty in 1 row\(s\): row 4 \(id 'p4'\).*drop"),
        (_edited(5, rejected="  \n"), ValueError, r"column `rejected` is empty in 1 row\(s\): row 5 \(id 'p5'\)"),
        (_edited(6, rejected="6a"), ValueError, r"1 pair\(s\) whose `chosen` equals `rejected`: row 6 \(id 'p6'\)"),
        (_edited(7, id="p2"), ValueError, r"duplicated value\(s\): id 'p2' at rows \[2, 7\]"),
        (_edited(8, id=None), ValueError, r"column `id` is missing \(None\) in 1 row\(s\): row 8"),
    ],
    ids=[
        "no_chosen",
        "no_rejected",
        "int_chosen",
        "none_prompt",
        "empty_chosen",
        "blank_rejected",
        "identical",
        "duplicate_id",
        "missing_id",
    ],
)
def test_bad_training_rows_fail_at_construction(tmp_path, tokenizer, tiny_model, validation, dataset, error, message):
    with pytest.raises(error, match=message):
        _build(tmp_path, tiny_model, tokenizer, dataset, validation)


def test_conversational_and_implicit_prompt_datasets_pass():
    conversation = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        }
    ] * 2
    check_preference_rows(Dataset.from_list(conversation), "train_dataset")
    check_preference_rows(Dataset.from_list(_rows()).remove_columns("prompt"), "train_dataset")
    identical = [dict(conversation[0], rejected=conversation[0]["chosen"])]
    with pytest.raises(ValueError, match="equals `rejected`: row 0"):
        check_preference_rows(Dataset.from_list(identical), "train_dataset")


def test_bad_validation_rows_and_sizes(tmp_path, tokenizer, tiny_model, pool, validation):
    bad = validation.map(lambda r, i: {"rejected": r["chosen"]} if i == 2 else {}, with_indices=True)
    with pytest.raises(ValueError, match=r"`validation_dataset` has 1 pair\(s\) whose `chosen` equals `rejected`"):
        _build(tmp_path, tiny_model, tokenizer, pool, bad)
    with pytest.raises(ValueError, match="`validation_dataset` is empty"):
        _build(tmp_path, tiny_model, tokenizer, pool, validation.select([]))
    # 16 pairs per rank is one batch; 12 is not
    with pytest.raises(
        ValueError,
        match=r"`validation_dataset` has 12 pairs, fewer than one aux batch per rank.*"
        "`aux_batch_size`",
    ):
        _build(tmp_path, tiny_model, tokenizer, pool, validation.select(range(12)))
    trainer = _build(tmp_path, tiny_model, tokenizer, pool, validation.select(range(12)), aux_batch_size=4)
    assert trainer.selection_engine.validation_dataset.num_rows == 12
    # A validation set that only TRL's tokenization makes too small is caught too, naming the cause
    long_prompts = validation.map(lambda r, i: {"prompt": r["prompt"] * 40} if i < 20 else {}, with_indices=True)
    with pytest.raises(ValueError, match="after tokenization .*max_length"):
        _build(tmp_path, tiny_model, tokenizer, pool, long_prompts)


def test_bands_that_cannot_fill_a_batch_fail_at_construction(tmp_path, tokenizer, tiny_model, pool, validation):
    # 100 pairs x 10% x 10% ≈ 1 pair, one batch is 16
    with pytest.raises(ValueError, match=r"`irm_lo_percentile`/`irm_hi_percentile` = 45.0/55.0.*about 1.0 of the 100"):
        _build(
            tmp_path,
            tiny_model,
            tokenizer,
            pool,
            validation,
            irm_lo_percentile=45.0,
            irm_hi_percentile=55.0,
            lossdiff_lo_percentile=45.0,
            lossdiff_hi_percentile=55.0,
        )
    _build(
        tmp_path,
        tiny_model,
        tokenizer,
        pool,
        validation,
        irm_lo_percentile=45.0,
        irm_hi_percentile=65.0,
        selection_rule="irm_band",
    )  # 20 pairs >= 16


def test_a_selection_fraction_that_cannot_fill_a_batch_fails_at_construction(tmp_path, tokenizer, tiny_model, pool):
    with pytest.raises(ValueError, match=r"`selection_fraction=0.12` keeps 12 of the 100.*at least 0.16"):
        _build(tmp_path, tiny_model, tokenizer, pool, selection_rule="reward_gap", selection_fraction=0.12)
    _build(tmp_path, tiny_model, tokenizer, pool, selection_rule="davir", selection_fraction=0.16)  # 16 pairs: enough


def _scores_with(monkeypatch, edit) -> None:
    """Let `edit(scores)` change the scores of every selection event before the rule sees them."""
    original = ScoringEngine.compute_scores

    def patched(self, epoch, metrics, score_names=None, reuse_training=False):
        scores = original(self, epoch, metrics, score_names, reuse_training)
        edit(scores)
        return scores

    monkeypatch.setattr(ScoringEngine, "compute_scores", patched)


def test_nonfinite_scores_are_never_kept_through_the_trainer(tmp_path, tokenizer, tiny_model, pool, monkeypatch):
    poisoned = {3: np.nan, 10: np.inf, 11: -np.inf, 50: np.nan}

    def poison(scores):
        median = float(np.median(scores["irm"]))
        for row, value in poisoned.items():
            scores["irm"][row] = value
        scores["irm"][20] = median  # a finite "medium" score, kept: NaN is not treated like it

    _scores_with(monkeypatch, poison)
    trainer = _build(tmp_path, tiny_model, tokenizer, pool, selection_rule="irm_band", num_train_epochs=2)
    trainer.train()
    selection = read_history(tmp_path)[1]
    kept = set(selection["selected_ids"])
    assert not kept & {pool[row]["id"] for row in poisoned}
    assert pool[20]["id"] in kept
    assert selection["num_selected"] == len(kept) and 70 <= len(kept) <= 80  # the band is over the 96 finite scores
    logged = [
        h["selection/irm/num_nonfinite"] for h in trainer.state.log_history if "selection/irm/num_nonfinite" in h
    ]
    assert logged == [4.0]


def test_a_selection_smaller_than_one_batch_per_rank_stops_the_run(tmp_path, tokenizer, tiny_model, pool, monkeypatch):
    # An fp16 overflow, say: all but 10 scores are NaN, so the band keeps 10 pairs < one batch of 16
    _scores_with(monkeypatch, lambda scores: scores["irm"].__setitem__(slice(10, None), np.nan))
    trainer = _build(tmp_path, tiny_model, tokenizer, pool, selection_rule="irm_band", num_train_epochs=2)
    with pytest.raises(
        RuntimeError,
        match=r"kept \d+ of 100 pairs, fewer than one batch per rank \(16\).*"
        r"\{'irm': 90\}.*bf16/fp32",
    ):
        trainer.train()
    assert trainer.state.global_step == 7  # the warm-up epoch trained (100 pairs / 16), nothing after
    assert [r["event"] for r in read_history(tmp_path)] == ["warmup"]
