"""The scorer/rule registry: plug-ins drive the trainer's selection; bad names fail naming the field."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from trl_select import (
    ScoringContext,
    SelectionContext,
    SelectiveDPOConfig,
    SelectiveDPOTrainer,
    read_history,
    register_rule,
    register_scorer,
    registry,
)
from trl_select.rules import Band
from trl_select.scores import implicit_reward_margin

from .testing_utils import fast_config


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are removed afterwards, so tests do not leak names into each other."""
    rules, scorers = dict(registry._RULES), dict(registry._SCORERS)
    yield
    registry._RULES.clear()
    registry._RULES.update(rules)
    registry._SCORERS.clear()
    registry._SCORERS.update(scorers)


def test_builtins_are_registered():
    assert {"lossdiff_irm", "irm_band", "lossdiff_band", "none"} <= set(registry.registered_rules())
    assert {"irm", "lossdiff"} <= set(registry.registered_scorers())
    assert registry.get_rule("lossdiff_irm").scores == ("lossdiff", "irm")


def test_custom_scorer_and_rule_drive_the_trainers_selection(tmp_path, tokenizer, tiny_model, pool, scratch_registry):
    seen = {}

    @register_scorer("chosen_logp_test", needs=("policy",))
    def chosen_logp(context: ScoringContext) -> np.ndarray:
        assert context.auxiliary is None and context.model is None  # only what some score asked for is computed
        return context.policy.chosen.double().numpy()

    @register_rule("upper_half_test", scores=("chosen_logp_test", "irm"))
    def upper_half(scores: dict[str, np.ndarray], context: SelectionContext):
        seen["scores"], seen["context"] = scores, context
        median = float(np.median(scores["irm"]))
        return scores["irm"] >= median, {"irm": Band(median, float("inf"), 50.0, 100.0)}

    args = fast_config(tmp_path, num_train_epochs=2, selection_rule="upper_half_test")
    assert args.required_scores == ("chosen_logp_test", "irm") and not args.needs_auxiliary
    trainer = SelectiveDPOTrainer(
        tiny_model, ref_model=copy.deepcopy(tiny_model), args=args, train_dataset=pool, processing_class=tokenizer
    )  # no validation data: neither score needs it
    trainer.train()

    context = seen["context"]
    assert (context.epoch, context.seed, context.pool_size) == (1, 0, 100)
    assert context.pair_ids == pool["id"] and context.args is args and "prompt" in context.dataset.column_names
    assert set(seen["scores"]) == {"chosen_logp_test", "irm"}
    assert trainer.selection_callback._auxiliary is None  # LossDiff's aux model was never built
    irm = seen["scores"]["irm"]
    expected = [pool["id"][row] for row in np.flatnonzero(irm >= np.median(irm))]
    record = read_history(tmp_path)[1]
    assert record["rule"] == "upper_half_test" and sorted(record["selected_ids"]) == sorted(expected)
    assert record["thresholds"] == {"irm": {"lo": pytest.approx(float(np.median(irm))), "hi": float("inf")}}
    assert 40 <= record["num_selected"] <= 60


def test_scorer_output_matches_the_math_it_wraps(tmp_path, tokenizer, tiny_model, pool):
    args = fast_config(tmp_path, num_train_epochs=1, selection_rule="irm_band")
    trainer = SelectiveDPOTrainer(
        tiny_model, ref_model=copy.deepcopy(tiny_model), args=args, train_dataset=pool, processing_class=tokenizer
    )
    callback = trainer.selection_callback
    metrics: dict[str, float] = {}
    scores = callback._compute_scores(1, metrics)
    assert set(scores) == {"irm"} and "selection/seconds_aux" not in metrics
    expected = implicit_reward_margin(callback.policy_log_probs(), callback.reference_log_probs(), args.beta)
    np.testing.assert_allclose(scores["irm"], expected.double().numpy())


def test_duplicate_names_raise_unless_overwritten(scratch_registry):
    with pytest.raises(ValueError, match="'irm_band' is already registered.*overwrite=True"):
        register_rule("irm_band", scores=("irm",))(lambda scores, context: scores["irm"] > 0)
    with pytest.raises(ValueError, match="'irm' is already registered"):
        register_scorer("irm", needs=("policy",))(lambda context: np.zeros(context.pool_size))

    def replacement(scores, context):
        return np.ones(context.pool_size, dtype=bool)

    register_rule("irm_band", scores=("irm",), overwrite=True)(replacement)
    assert registry.get_rule("irm_band").fn is replacement


def test_unknown_names_raise_naming_the_field(scratch_registry):
    with pytest.raises(ValueError, match="`selection_rule` must be a registered rule.*'lossdiff_irm'"):
        SelectiveDPOConfig(output_dir="unused", report_to="none", bf16=False, selection_rule="nope")
    with pytest.raises(ValueError, match="unknown `needs` \\['gradients'\\]"):
        register_scorer("bad_needs_test", needs=("gradients",))
    with pytest.raises(TypeError, match="write \\('irm',\\)"):
        register_rule("bad_scores_test", scores="irm")
    # A rule may be registered before its scorer; the config then fails naming the missing score, not later mid-run.
    register_rule("uses_missing_test", scores=("missing_score",))(lambda scores, context: scores["missing_score"] > 0)
    config = SelectiveDPOConfig(output_dir="unused", report_to="none", bf16=False, selection_rule="uses_missing_test")
    with pytest.raises(ValueError, match="'missing_score', which is not registered"):
        _ = config.needs_auxiliary


def test_rule_results_are_checked(scratch_registry):
    context = SelectionContext(epoch=1, seed=0, pool_size=4, pair_ids=[0, 1, 2, 3], args=None)
    register_rule("short_mask_test", scores=())(lambda scores, context: np.ones(3, dtype=bool))
    register_rule("float_mask_test", scores=())(lambda scores, context: np.ones(4))
    for name in ("short_mask_test", "float_mask_test"):
        with pytest.raises(ValueError, match=f"Rule '{name}' returned .* boolean keep-mask of shape \\(4,\\)"):
            registry.apply_rule(name, {}, context)
    register_scorer("short_score_test", needs=())(lambda context: np.zeros(3))
    with pytest.raises(ValueError, match="Scorer 'short_score_test' returned shape \\(3,\\)"):
        registry.run_scorer("short_score_test", ScoringContext(pool_size=4, beta=0.1, loss_type="sigmoid"))
