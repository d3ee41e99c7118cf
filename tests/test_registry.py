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
    registered_rule,
    registered_scorer,
    registry,
    unregister_rule,
    unregister_scorer,
)
from trl_select.rules import Band
from trl_select.scores import implicit_reward_margin

from .testing_utils import fast_config


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are removed afterwards, so tests do not leak names into each other."""
    rules = {name: registry.get_rule(name) for name in registry.registered_rules()}
    scorers = {name: registry.get_scorer(name) for name in registry.registered_scorers()}
    yield
    for name in registry.registered_rules():
        if name not in rules:
            registry.unregister_rule(name)
    for name in registry.registered_scorers():
        if name not in scorers:
            registry.unregister_scorer(name)
    for spec in rules.values():
        register_rule(spec.name, spec.scores, overwrite=True)(spec.fn)
    for spec in scorers.values():
        register_scorer(spec.name, spec.needs, uses_loss=spec.uses_loss, overwrite=True)(spec.fn)


def test_builtins_are_registered():
    assert {"lossdiff_irm", "irm_band", "lossdiff_band", "none"} <= set(registry.registered_rules())
    assert {"irm", "lossdiff"} <= set(registry.registered_scorers())
    assert registry.get_rule("lossdiff_irm").scores == ("lossdiff", "irm")
    # the scores that evaluate the trainer's loss (a config refuses losses with no per-pair form only for their rules)
    assert [name for name in registry.registered_scorers() if registry.get_scorer(name).uses_loss] == [
        "lossdiff",
        "influence",
    ]


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
    assert trainer.selection_engine.auxiliary_model is None  # LossDiff's aux model was never built
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
    engine = trainer.selection_engine
    metrics: dict[str, float] = {}
    scores = engine.compute_scores(1, metrics)
    assert set(scores) == {"irm"} and "selection/seconds_aux" not in metrics
    expected = implicit_reward_margin(engine.policy_log_probs(), engine.reference_log_probs(), args.beta)
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


def test_unregister_and_scoped_registration_restore_the_registry(scratch_registry):
    def keep_all(scores, context):
        return np.ones(context.pool_size, dtype=bool)

    rules_before = registry.registered_rules()
    with registered_rule("scoped_rule_test", keep_all, scores=("irm",)) as fn:
        assert fn is keep_all and registry.get_rule("scoped_rule_test").scores == ("irm",)
        config = SelectiveDPOConfig(
            output_dir="unused", report_to="none", bf16=False, selection_rule="scoped_rule_test"
        )
        assert config.required_scores == ("irm",)
    assert registry.registered_rules() == rules_before
    # Replacing a built-in for a block puts the built-in back after it
    builtin = registry.get_rule("irm_band")
    with (
        pytest.raises(ValueError, match="'irm_band' is already registered"),
        registered_rule("irm_band", keep_all, ()),
    ):
        pass
    with registered_rule("irm_band", keep_all, scores=("irm",), overwrite=True):
        assert registry.get_rule("irm_band").fn is keep_all
    assert registry.get_rule("irm_band") == builtin

    with registered_scorer("scoped_score_test", lambda context: np.zeros(context.pool_size), needs=("policy",)):
        assert registry.get_scorer("scoped_score_test").needs == ("policy",)
    assert "scoped_score_test" not in registry.registered_scorers()

    register_rule("unregistered_test", scores=())(keep_all)
    assert unregister_rule("unregistered_test").fn is keep_all
    assert "unregistered_test" not in registry.registered_rules()
    register_scorer("unregistered_score_test", needs=())(lambda context: np.zeros(context.pool_size))
    assert unregister_scorer("unregistered_score_test").needs == ()
    with pytest.raises(ValueError, match="must be a registered rule.*'nope'"):
        unregister_rule("nope")
    with pytest.raises(ValueError, match="'nope', which is not registered"):
        unregister_scorer("nope")
