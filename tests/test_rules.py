"""Band, intersection and set algebra (docs/design.md §4), incl. ties, NaN, ±inf and all-equal scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_select.rules import (
    bottom_fraction,
    intersection,
    jaccard,
    overlap_coefficient,
    percentile_band,
    score_quantiles,
    top_fraction,
    union,
)


def _percentile_by_hand(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (NumPy's default), written out independently."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below, above = math.floor(position), math.ceil(position)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def test_band_keeps_the_closed_middle():
    scores = np.arange(11, dtype=float)  # 0..10
    keep, band = percentile_band(scores, 10, 90)
    assert (band.lo, band.hi) == (1.0, 9.0)
    assert keep.tolist() == [False] + [True] * 9 + [False]


def test_ties_at_a_limit_are_all_kept():
    scores = np.array([0.0, 1, 1, 1, 1, 1, 1, 1, 1, 5])
    keep, band = percentile_band(scores, 10, 90)
    assert band.lo == 0.9 and band.hi == pytest.approx(1.4)
    assert keep.sum() == 8  # all eight tied 1.0 values, none of the extremes


def test_all_equal_scores_are_all_kept():
    keep, band = percentile_band(np.full(7, 3.5), 10, 90)
    assert keep.all() and band.lo == band.hi == 3.5


def test_nan_is_never_medium_and_infinities_do_not_move_the_band():
    finite = np.arange(10, dtype=float)
    scores = np.concatenate([finite, [np.nan, np.inf, -np.inf, np.nan]])
    keep, band = percentile_band(scores, 0, 100)
    _, band_finite = percentile_band(finite, 0, 100)
    assert (band.lo, band.hi) == (band_finite.lo, band_finite.hi) == (0.0, 9.0)
    assert keep[:10].all() and not keep[10:].any()


def test_all_nonfinite_keeps_nothing():
    keep, band = percentile_band([np.nan, np.inf], 10, 90)
    assert not keep.any() and math.isnan(band.lo)


@pytest.mark.parametrize("lo, hi", [(-1, 90), (10, 101), (50, 50), (90, 10)])
def test_band_limits_out_of_range_are_rejected(lo, hi):
    with pytest.raises(ValueError, match="0 <= lo < hi <= 100"):
        percentile_band([1.0, 2.0], lo, hi)


def test_intersection_union_jaccard_overlap():
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert intersection(a, b).tolist() == [True, False, False, False, True]
    assert union(a, b).tolist() == [True, True, True, False, True]
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert overlap_coefficient({1, 2, 3}, {2, 3}) == 1.0
    assert overlap_coefficient(set(), {1}) == 0.0
    assert jaccard(set(), set()) == 1.0


def test_independent_bands_keep_about_64_percent():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20_000), rng.normal(size=20_000)
    keep = intersection(percentile_band(a, 10, 90)[0], percentile_band(b, 10, 90)[0])
    assert keep.mean() == pytest.approx(0.64, abs=0.01)


def test_score_quantiles_count_nonfinite():
    quantiles = score_quantiles([0.0, 1.0, 2.0, np.nan, np.inf])
    assert quantiles["p50"] == 1.0 and quantiles["num_nonfinite"] == 2.0


scores_strategy = st.lists(
    st.one_of(st.floats(min_value=-1e6, max_value=1e6), st.sampled_from([np.nan, np.inf, -np.inf])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(scores=scores_strategy, lo=st.floats(0, 99), width=st.floats(0.5, 100))
def test_band_is_exactly_the_defined_set(scores, lo, width):
    hi = min(lo + width, 100.0)
    keep, band = percentile_band(np.array(scores), lo, hi)
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        assert not keep.any()
        return
    expected_lo, expected_hi = _percentile_by_hand(finite, lo), _percentile_by_hand(finite, hi)
    assert band.lo == pytest.approx(expected_lo, rel=1e-9, abs=1e-6)
    assert band.hi == pytest.approx(expected_hi, rel=1e-9, abs=1e-6)
    for score, kept in zip(scores, keep, strict=True):
        if not math.isfinite(score):
            assert not kept  # NaN and ±inf are never kept
        else:
            assert kept == (band.lo <= score <= band.hi)
    # Every order statistic between the two percentile positions is kept
    position_lo, position_hi = (len(finite) - 1) * lo / 100, (len(finite) - 1) * hi / 100
    assert keep.sum() >= math.floor(position_hi) - math.ceil(position_lo) + 1


def test_band_intersection_is_the_and_of_each_band():
    from trl_select.rules import band_intersection

    lossdiff = np.arange(10, dtype=float)  # band [0.9, 8.1] keeps 1..8
    irm = np.arange(10, dtype=float)[::-1].copy()  # the same band in reverse order keeps rows 1..8 too
    irm[4] = np.nan
    keep, bands = band_intersection({"lossdiff": lossdiff, "irm": irm}, {"lossdiff": (10, 90), "irm": (10, 90)})
    assert np.flatnonzero(keep).tolist() == [1, 2, 3, 5, 6, 7, 8]
    assert set(bands) == {"lossdiff", "irm"} and bands["lossdiff"].lo == pytest.approx(0.9)


finite_or_not = st.one_of(st.floats(min_value=-1e6, max_value=1e6), st.sampled_from([np.nan, np.inf, -np.inf]))
band_strategy = st.tuples(st.floats(0, 99), st.floats(0.5, 100)).map(lambda t: (t[0], min(t[0] + t[1], 100.0)))


@st.composite
def two_scores(draw):
    n = draw(st.integers(1, 60))
    return (
        np.array(draw(st.lists(finite_or_not, min_size=n, max_size=n))),
        np.array(draw(st.lists(finite_or_not, min_size=n, max_size=n))),
    )


@settings(max_examples=300, deadline=None)
@given(scores=two_scores(), lossdiff_band=band_strategy, irm_band=band_strategy)
def test_lossdiff_irm_keeps_exactly_the_pairs_in_both_bands(scores, lossdiff_band, irm_band):
    """DESIGN §4, eq. 9: z is kept iff P_lo(LD) <= LD(z) <= P_hi(LD) and P_lo(IRM) <= IRM(z) <= P_hi(IRM)."""
    from trl_select.rules import band_intersection

    lossdiff, irm = scores
    bands = {"lossdiff": lossdiff_band, "irm": irm_band}
    keep, limits = band_intersection({"lossdiff": lossdiff, "irm": irm}, bands)
    in_band = {}
    for name, values in (("lossdiff", lossdiff), ("irm", irm)):
        finite = [v for v in values if math.isfinite(v)]
        lo_q, hi_q = bands[name]
        if not finite:
            in_band[name] = [False] * len(values)
            continue
        lo, hi = _percentile_by_hand(finite, lo_q), _percentile_by_hand(finite, hi_q)
        assert limits[name].lo == pytest.approx(lo, rel=1e-9, abs=1e-6)
        assert limits[name].hi == pytest.approx(hi, rel=1e-9, abs=1e-6)
        # Compare against the rule's own (numerically identical) limits so that values at a limit are decided alike
        in_band[name] = [math.isfinite(v) and limits[name].lo <= v <= limits[name].hi for v in values]
    expected = [a and b for a, b in zip(in_band["lossdiff"], in_band["irm"], strict=True)]
    assert keep.tolist() == expected
    # Size: at most either band's count; at least what the two bands must share
    counts = [sum(in_band[name]) for name in ("lossdiff", "irm")]
    assert max(0, counts[0] + counts[1] - len(irm)) <= keep.sum() <= min(counts)
    assert not keep[~np.isfinite(lossdiff) | ~np.isfinite(irm)].any()  # a non-finite score in either: never kept


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(finite_or_not, min_size=1, max_size=60),
    band=band_strategy,
    widen=st.floats(0, 50),
    permutation_seed=st.integers(0, 2**16),
)
def test_band_is_order_free_and_nested(scores, band, widen, permutation_seed):
    """The kept set depends on the scores only, not on pool order; a wider band keeps a superset."""
    values = np.array(scores)
    keep, _ = percentile_band(values, *band)
    order = np.random.default_rng(permutation_seed).permutation(len(values))
    keep_permuted, _ = percentile_band(values[order], *band)
    assert keep_permuted.tolist() == keep[order].tolist()
    wider = (max(band[0] - widen, 0.0), min(band[1] + widen, 100.0))
    keep_wider, _ = percentile_band(values, *wider)
    assert not (keep & ~keep_wider).any()
    # At most the finite scores are kept, and a 0-100 band keeps every one of them
    keep_all, _ = percentile_band(values, 0.0, 100.0)
    assert keep_all.tolist() == np.isfinite(values).tolist()


def test_bottom_and_top_fraction_keep_exactly_k_with_ties_by_row():
    scores = np.array([3.0, 1.0, 2.0, 1.0, 5.0, 1.0, 4.0, 0.5, 9.0, 7.0])
    keep, band = bottom_fraction(scores, 0.3)  # k = 3: 0.5 (row 7), then the first two tied 1.0 rows (1, 3)
    assert np.flatnonzero(keep).tolist() == [1, 3, 7]
    assert (band.lo, band.hi, band.lo_percentile, band.hi_percentile) == (0.5, 1.0, 0.0, 30.0)
    keep, band = top_fraction(scores, 0.2)
    assert np.flatnonzero(keep).tolist() == [8, 9] and (band.lo, band.hi) == (7.0, 9.0)
    assert band.lo_percentile == pytest.approx(80.0) and band.hi_percentile == 100.0
    assert bottom_fraction(scores, 0.01)[0].sum() == 1  # at least one pair
    assert top_fraction(scores, 1.0)[0].all()


def test_fraction_rules_never_keep_non_finite_scores():
    scores = np.array([np.nan, -np.inf, np.inf, 2.0, 1.0])
    assert np.flatnonzero(bottom_fraction(scores, 0.4)[0]).tolist() == [3, 4]
    assert np.flatnonzero(top_fraction(scores, 1.0)[0]).tolist() == [3, 4]  # k capped at the finite count
    keep, band = top_fraction(np.full(3, np.nan), 0.5)
    assert not keep.any() and math.isnan(band.lo)
    for fraction in (0.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="`fraction` must be a fraction of the pool in \\(0, 1\\]"):
            bottom_fraction(scores, fraction)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.floats(0.01, 1.0))
def test_bottom_fraction_keeps_the_smallest(values, fraction):
    scores = np.array(values)
    keep, _ = bottom_fraction(scores, fraction)
    assert keep.sum() == max(1, round(fraction * len(values)))
    if not keep.all():
        assert scores[keep].max() <= scores[~keep].min()
