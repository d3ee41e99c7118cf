"""The pure arithmetic of the benchmark scripts (the benchmarks themselves are slow and never run here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.cleaning import labels_after_cleaning, path_compute, top_k_precision
from benchmarks.common import fit_line, markdown_table, paired_delta
from benchmarks.quality import (
    compute_to_reach,
    counted_compute,
    equal_compute_verdict,
    keep_all_rule,
    matched_epoch_sizes,
    matched_steps,
    mean_se,
    oracle_rule,
    random_rule,
    total_compute,
    within_one_se,
)
from trl_select import SelectionContext


def test_paired_delta_mean_se_and_wins():
    arm, baseline = [0.5, 0.7, 0.4, 0.6], [0.4, 0.5, 0.4, 0.7]  # deltas 0.1, 0.2, 0.0, -0.1
    delta = paired_delta(arm, baseline)
    deltas = np.array([0.1, 0.2, 0.0, -0.1])
    assert delta.mean == pytest.approx(deltas.mean())
    assert delta.se == pytest.approx(deltas.std(ddof=1) / math.sqrt(4))
    assert (delta.wins, delta.losses, delta.ties, delta.n) == (2, 1, 1, 4)


def test_paired_delta_is_paired_not_two_sample():
    # A constant per-seed gain has zero paired SE however much the seeds differ from each other
    baseline = [0.1, 0.5, 0.9]
    delta = paired_delta([b + 0.05 for b in baseline], baseline)
    assert delta.mean == pytest.approx(0.05) and delta.se == pytest.approx(0.0, abs=1e-12)


def test_paired_delta_rejects_unpaired_input():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_delta([0.1, 0.2], [0.1])
    assert math.isnan(paired_delta([0.3], [0.1]).se)


def test_fit_line_recovers_slope_and_intercept():
    x = [1000, 2000, 4000, 8000, 16000]
    fit = fit_line(x, [0.5 + 2e-3 * v for v in x])
    assert fit.slope == pytest.approx(2e-3) and fit.intercept == pytest.approx(0.5) and fit.r2 == pytest.approx(1.0)
    noisy = fit_line([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert noisy.slope == pytest.approx(0.8) and noisy.r2 == pytest.approx(0.64)
    with pytest.raises(ValueError, match="distinct"):
        fit_line([2, 2], [1.0, 3.0])


def test_markdown_table_shape():
    table = markdown_table(["a", "b"], [[1, "x"], [2, "y"]]).splitlines()
    assert table == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]


def _context(epoch: int, pair_ids: list, seed: int = 3) -> SelectionContext:
    return SelectionContext(epoch=epoch, seed=seed, pool_size=len(pair_ids), pair_ids=pair_ids, args=None)


def test_oracle_rule_drops_exactly_the_flipped_pairs_by_id():
    rule = oracle_rule({10: True, 11: False, 12: True, 13: False})
    keep = rule({}, _context(1, [13, 12, 11, 10]))  # pool rows in a different order than the ids
    assert keep.tolist() == [True, False, True, False]


def test_random_rule_has_the_requested_size_and_is_fresh_each_epoch():
    rule = random_rule({1: 30, 2: 30})
    ids = list(range(100))
    first, second = rule({}, _context(1, ids)), rule({}, _context(2, ids))
    assert first.dtype == bool and first.sum() == 30 and second.sum() == 30
    assert not np.array_equal(first, second)  # a new subset each epoch, not the first one kept
    assert np.array_equal(first, rule({}, _context(1, ids)))  # deterministic for (seed, epoch)
    assert not np.array_equal(first, rule({}, _context(1, ids, seed=4)))


def test_memory_benchmark_extrapolation_table():
    from benchmarks.memory import ARMS, extrapolation, model_shape, predictions

    table, records = extrapolation()
    assert [(r["model"], r["strategy"]) for r in records] == [
        ("Llama-2-7B", "ddp"),
        ("Llama-2-7B", "zero3"),
        ("Llama-2-70B", "ddp"),
        ("Llama-2-70B", "zero3"),
    ]
    # bf16 + fp32 Adam: plain 18 bytes per parameter, a full-copy aux 34 under DDP and ZeRO-3 alike
    assert all(r["full_copy"]["ratio"] == pytest.approx(34 / 18) for r in records)
    assert records[1]["plain"]["plain"] == 18 * 6_738_415_616 // 8
    assert table.count("\n") == 2 + len(records)
    # the benchmark's own model: over 40M parameters, every arm predicted, the full copy at fp32's 1.6
    shape = model_shape("full")
    assert shape.num_parameters > 40e6
    predicted = predictions(shape)
    assert set(predicted) == set(ARMS)
    assert predicted["full_copy"].ratio == pytest.approx(1.6)


def test_keep_all_rule_keeps_every_row():
    keep = keep_all_rule()({}, _context(1, list(range(7))))
    assert keep.dtype == bool and keep.all() and len(keep) == 7


def test_counted_compute_drops_selection_for_the_full_arms_only():
    point = {"train_fte": 100.0, "selection_fte": 40.0}
    assert counted_compute("lossdiff_irm", point) == 140.0
    assert counted_compute("full", point) == 100.0
    assert counted_compute("cm_full", point) == 100.0


def test_total_compute_is_over_a_plain_three_epoch_run():
    run = {"arm": "lossdiff_irm", "epoch_fte": 50.0, "evals": [{"train_fte": 120.0, "selection_fte": 30.0}]}
    assert total_compute(run) == pytest.approx(150.0 / 150.0)
    assert total_compute({**run, "arm": "full"}) == pytest.approx(120.0 / 150.0)


def test_matched_steps_rounds_the_budget_to_whole_steps():
    assert matched_steps(1000.0, 30.0) == 33  # 33.3 steps
    assert matched_steps(1000.0, 29.0) == 34  # 34.48 steps
    assert matched_steps(10.0, 100.0) == 1  # never zero steps
    with pytest.raises(ValueError):
        matched_steps(0.0, 10.0)


def test_matched_epoch_sizes_spend_training_plus_the_event_selection_and_cap_at_the_pool():
    evals = [
        {"train_fte": 400.0, "selection_fte": 0.0},  # end of epoch 0 (warm-up)
        {"train_fte": 660.0, "selection_fte": 100.0},  # epoch 1: 260 training + 100 event
        {"train_fte": 900.0, "selection_fte": 150.0},  # epoch 2: 240 training + 50 event
    ]
    # 2 FTE per pair, pool of 200 pairs: budget 360 -> 180 pairs, budget 290 -> 145 pairs
    assert matched_epoch_sizes(evals, 2.0, 200) == {1: 180, 2: 145}
    # a smaller pool caps the first epoch's size
    assert matched_epoch_sizes(evals, 2.0, 150) == {1: 150, 2: 145}


def test_compute_to_reach_interpolates_between_evaluations():
    points = [(0.0, 0.2), (1.0, 0.4), (2.0, 0.6), (3.0, 0.5)]
    assert compute_to_reach(points, 0.5) == pytest.approx(1.5)
    assert compute_to_reach(points, 0.6) == pytest.approx(2.0)
    assert compute_to_reach(points, 0.1) == 0.0  # already there at the start
    assert compute_to_reach(points, 0.7) is None  # never reached
    # first crossing, not a later one: after dipping below the target again
    assert compute_to_reach([(0.0, 0.1), (1.0, 0.5), (2.0, 0.2), (3.0, 0.9)], 0.3) == pytest.approx(0.5)


def test_mean_se_and_within_one_se():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert math.isnan(mean_se([1.0])[1])
    assert within_one_se(paired_delta([0.50, 0.52, 0.49], [0.50, 0.50, 0.50]))  # +0.003 ± 0.009
    assert not within_one_se(paired_delta([0.60, 0.62, 0.61], [0.50, 0.50, 0.50]))  # +0.11 ± 0.006


def test_equal_compute_verdict_in_plain_words():
    beats = paired_delta([0.6, 0.7, 0.65], [0.5, 0.55, 0.5])
    assert "**beats** full data at equal compute" in equal_compute_verdict(beats, "LossDiff-IRM", "cm_full")
    noisy = paired_delta([0.6, 0.4, 0.55], [0.5, 0.5, 0.5])
    assert "**does not beat**" in equal_compute_verdict(noisy, "LossDiff-IRM", "cm_full")
    worse = paired_delta([0.4, 0.45, 0.42], [0.5, 0.55, 0.5])
    assert "**is worse than**" in equal_compute_verdict(worse, "LossDiff-IRM", "cm_full")


def test_staleness_helpers():
    from benchmarks.staleness import band_selection, fresh_scores, spearman

    rng = np.random.default_rng(0)
    irm, lossdiff = rng.normal(size=200), rng.normal(size=200)
    assert spearman(irm, np.exp(irm)) == pytest.approx(1.0)  # a rank statistic: any increasing map gives 1
    assert spearman(irm, -irm) == pytest.approx(-1.0)
    stale = {"irm": irm, "lossdiff": lossdiff}
    # Fresh IRM equal to the stale one: the θ_aux loss recovered from the stale scores gives back the same LossDiff
    same = fresh_scores(stale, irm.copy(), beta=0.5, loss_type="sigmoid")
    np.testing.assert_allclose(same["lossdiff"], lossdiff, atol=1e-12)
    moved = fresh_scores(stale, irm + 1.0, beta=0.5, loss_type="sigmoid")
    assert np.all(moved["lossdiff"] < lossdiff)  # a larger margin lowers the sigmoid loss of θ_t, not θ_aux's
    keep = band_selection(stale)
    assert keep.sum() < 0.81 * 200 and keep.sum() > 0.5 * 200  # both 10-90 bands: about 64% of independent scores


def test_cleaning_top_k_precision_is_the_flipped_share_of_the_ids():
    flipped = {0: True, 1: False, 2: True, 3: True}
    assert top_k_precision([0, 1, 2, 3], flipped) == pytest.approx(0.75)
    assert top_k_precision([1], flipped) == 0.0
    assert math.isnan(top_k_precision([], flipped))


def test_cleaning_labels_after_cleaning_drops_and_flips_back():
    flipped = {0: True, 1: False, 2: True, 3: False}
    changes = [
        {"pair_id": 0, "decision": "drop"},
        {"pair_id": "2", "decision": "flip"},
        {"pair_id": 1, "decision": "flip"},
    ]
    # 0 dropped; 2 was wrong and is flipped back (right); 1 was right and is flipped (now wrong); 3 kept as is
    assert labels_after_cleaning(flipped, changes) == {1: True, 2: False, 3: False}
    assert labels_after_cleaning(flipped, []) == flipped


def test_cleaning_path_compute_adds_the_first_run():
    assert path_compute(first_run_total=110.0, own_training=90.0, plain_run=100.0) == pytest.approx(2.0)


@pytest.mark.parametrize("regime", ["a", "b", "c"])
def test_regime_pools_have_the_stated_kinds_on_protocol_2s_prompts(regime):
    from collections import Counter

    from benchmarks.quality import build_task
    from benchmarks.regimes import REGIMES, regime_pool
    from trl_select.testing.reverse_digits import reverse_answer

    base = build_task(3)["train"]
    pool = regime_pool(base, regime, 3)
    assert pool == regime_pool(base, regime, 3)  # deterministic
    assert [row["prompt"] for row in pool] == [row["prompt"] for row in base]
    counts = Counter(row["kind"] for row in pool)
    for kind, fraction in REGIMES[regime].items():
        assert counts[kind] == round(fraction * len(base))
    for row in pool:
        correct = reverse_answer(row["prompt"])
        assert row["chosen"] != row["rejected"]
        assert row["flipped"] == (row["kind"] == "flipped")
        if row["kind"] in ("informative", "easy"):
            assert row["chosen"] == correct != row["rejected"]
        if row["kind"] == "flipped":
            assert row["rejected"] == correct
        if row["kind"] == "easy":
            assert row["rejected"].isalpha() and len(row["rejected"]) == len(correct)
        if row["kind"] == "tie":  # two wrong answers, in either order
            assert correct not in (row["chosen"], row["rejected"])
    if regime == "b":
        ties = [row for row in pool if row["kind"] == "tie"]
        copy_chosen = sum(row["chosen"] == row["prompt"][:-1] for row in ties) / len(ties)
        assert 0.4 < copy_chosen < 0.6  # the direction of a near-tie is arbitrary
