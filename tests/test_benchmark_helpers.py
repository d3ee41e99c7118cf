"""The pure arithmetic of the benchmark scripts (the benchmarks themselves are slow and never run here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.common import fit_line, markdown_table, paired_delta
from benchmarks.quality import oracle_rule, random_rule
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
