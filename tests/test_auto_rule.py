"""`lossdiff_irm_auto` (docs/scores_and_rules.md, "Which rule for which data"): IRM tails cut only where LossDiff shows
harm beyond noise, the LossDiff band `[P_lo, max]`, and the evidence kept in the history, score files and metrics."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.registry import SelectionContext, apply_rule
from trl_select.rules import harm_tested_cuts, percentile_band
from trl_select.score_files import read_score_files

from .testing_utils import fast_config


def _context(pool_size: int, lossdiff_lo: float = 10.0) -> SelectionContext:
    args = types.SimpleNamespace(lossdiff_lo_percentile=lossdiff_lo)
    return SelectionContext(epoch=1, seed=0, pool_size=pool_size, pair_ids=list(range(pool_size)), args=args)


def _scores(rng: np.random.Generator, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """IRM ~ N(0, 1); LossDiff ~ N(0.02, 0.05), minus 0.1 for the 20% lowest IRM (flipped-like pairs)."""
    irm = rng.normal(size=n)
    lossdiff = rng.normal(0.02, 0.05, size=n)
    lossdiff[irm < np.percentile(irm, 20)] -= 0.1
    return lossdiff, irm


def test_harmful_low_tail_is_cut_slice_by_slice_and_a_harmless_top_is_kept():
    lossdiff, irm = _scores(np.random.default_rng(0))
    lo, hi, evidence = harm_tested_cuts(irm, lossdiff)
    assert (lo, hi) == (20.0, 100.0)
    assert evidence["t_0_10"] < -2 and evidence["t_10_20"] < -2 and evidence["t_20_30"] > -2
    assert evidence["pairs_per_slice"] == 200
    assert evidence["mean_90_100"] == pytest.approx(lossdiff[irm >= np.percentile(irm, 90)].mean(), abs=1e-3)


def test_no_evidence_of_harm_cuts_nothing_and_cuts_stop_at_the_limit():
    rng = np.random.default_rng(1)
    irm = rng.normal(size=1000)
    assert harm_tested_cuts(irm, rng.normal(0.0, 0.05, size=1000))[:2] == (0.0, 100.0)  # noise only
    assert harm_tested_cuts(irm, -np.ones(1000) + 0.01 * rng.normal(size=1000))[:2] == (40.0, 60.0)  # all harmful
    # a harmful top tail (easy pairs that fight validation) is cut from above
    lossdiff = rng.normal(0.02, 0.05, size=1000)
    lossdiff[irm > np.percentile(irm, 90)] -= 0.2
    assert harm_tested_cuts(irm, lossdiff)[:2] == (0.0, 90.0)


def test_the_walk_stops_at_the_first_slice_that_passes():
    irm = np.arange(1000, dtype=float)
    lossdiff = np.tile([-1.0, -1.1, -0.9, -1.0], 250)  # harmful everywhere...
    lossdiff[100:200] = np.tile([1.0, 1.1, 0.9, 1.0], 25)  # ...but slice 10-20 helps: slice 20-30 is never tested
    lo, hi, _ = harm_tested_cuts(irm, lossdiff)
    assert (lo, hi) == (10.0, 60.0)


def test_non_finite_pairs_are_left_out_and_small_pools_cut_nothing():
    lossdiff, irm = _scores(np.random.default_rng(2))
    irm_nan = irm.copy()
    irm_nan[:50] = np.nan
    lo, hi, evidence = harm_tested_cuts(irm_nan, lossdiff)
    assert evidence["pairs_per_slice"] == 195 and (lo, hi) == (20.0, 100.0)
    assert harm_tested_cuts(irm[:19], lossdiff[:19]) == (0.0, 100.0, {"pairs_per_slice": 1.0})
    with pytest.raises(ValueError, match="same shape"):
        harm_tested_cuts(irm, lossdiff[:10])
    with pytest.raises(ValueError, match="slice_percentiles"):
        harm_tested_cuts(irm, lossdiff, slice_percentiles=30)


def test_a_prior_cut_holds_unless_the_slice_shows_benefit():
    irm = np.arange(1000, dtype=float)
    noise = np.tile([-0.05, 0.05], 500)
    neutral = noise.copy()
    assert harm_tested_cuts(irm, neutral, prior_cut_slices=1)[:2] == (10.0, 90.0)  # the paper's band by default
    helpful_top = neutral.copy()
    helpful_top[900:] += 0.1
    assert harm_tested_cuts(irm, helpful_top, prior_cut_slices=1)[:2] == (10.0, 100.0)  # kept: evidence of benefit
    harmful_low = neutral.copy()
    harmful_low[:300] -= 0.1
    assert harm_tested_cuts(irm, harmful_low, prior_cut_slices=1)[:2] == (30.0, 90.0)  # cut further: harm
    with pytest.raises(ValueError, match="prior_cut_slices"):
        harm_tested_cuts(irm, neutral, prior_cut_slices=5)


def test_auto_rule_keeps_the_lossdiff_upper_tail_and_the_evidence_tested_irm_band():
    lossdiff, irm = _scores(np.random.default_rng(3))
    lossdiff[irm > np.percentile(irm, 90)] += 0.05  # a helpful top IRM slice
    keep, bands = apply_rule("lossdiff_irm_auto", {"lossdiff": lossdiff, "irm": irm}, _context(len(irm)))
    expected_lossdiff, _ = percentile_band(lossdiff, 10.0, 100.0)
    expected_irm, _ = percentile_band(irm, 20.0, 100.0)
    np.testing.assert_array_equal(keep, expected_lossdiff & expected_irm)
    assert (bands["lossdiff"].lo_percentile, bands["lossdiff"].hi_percentile) == (10.0, 100.0)
    assert (bands["irm"].lo_percentile, bands["irm"].hi_percentile) == (20.0, 100.0)
    assert bands["irm"].evidence["t_90_100"] > 2
    assert bands["irm"].evidence["t_0_10"] < -2 and not bands["lossdiff"].evidence
    # the fixed paper rule on the same scores cuts both upper tails
    fixed_keep, _ = apply_rule(
        "lossdiff_irm",
        {"lossdiff": lossdiff, "irm": irm},
        SelectionContext(
            epoch=1,
            seed=0,
            pool_size=len(irm),
            pair_ids=list(range(len(irm))),
            args=types.SimpleNamespace(
                lossdiff_lo_percentile=10.0,
                lossdiff_hi_percentile=90.0,
                irm_lo_percentile=10.0,
                irm_hi_percentile=90.0,
            ),
        ),
    )
    assert (keep & (irm > np.percentile(irm, 90))).sum() > 0 and not (
        fixed_keep & (irm > np.percentile(irm, 90))
    ).any()


def test_auto_rule_is_deterministic_and_order_free():
    lossdiff, irm = _scores(np.random.default_rng(4))
    keep, _ = apply_rule("lossdiff_irm_auto", {"lossdiff": lossdiff, "irm": irm}, _context(len(irm)))
    permutation = np.random.default_rng(5).permutation(len(irm))
    permuted, _ = apply_rule(
        "lossdiff_irm_auto", {"lossdiff": lossdiff[permutation], "irm": irm[permutation]}, _context(len(irm))
    )
    np.testing.assert_array_equal(permuted, keep[permutation])


def test_a_run_records_the_chosen_cuts_and_their_evidence(tmp_path, tokenizer, tiny_model, pool, validation):
    args = fast_config(tmp_path, selection_rule="lossdiff_irm_auto", report_to="none")
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train()
    selections = [record for record in read_history(tmp_path) if record["event"] == "selection"]
    assert len(selections) == 2
    for record in selections:
        evidence = record["band_evidence"]["irm"]
        assert set(evidence) >= {"pairs_per_slice", "t_0_10", "mean_90_100"}
        assert record["percentiles"]["lossdiff"] == {"lo": 10.0, "hi": 100.0}
        lo, hi = record["percentiles"]["irm"]["lo"], record["percentiles"]["irm"]["hi"]
        assert lo in (0.0, 10.0, 20.0, 30.0, 40.0) and hi in (60.0, 70.0, 80.0, 90.0, 100.0)
    files = [f for f in read_score_files(tmp_path) if f.event.kind == "selection"]
    assert files[0].event.bands["irm"].evidence == selections[0]["band_evidence"]["irm"]
    logged = [entry for entry in trainer.state.log_history if "selection/irm/band_lo_percentile" in entry]
    assert len(logged) == 2
    assert logged[0]["selection/irm/evidence/t_0_10"] == pytest.approx(selections[0]["band_evidence"]["irm"]["t_0_10"])
    # the evidence is computed from the event's own scores: recomputing it from the score file agrees
    event = files[0].event
    lo, hi, evidence = harm_tested_cuts(event.scores["irm"], event.scores["lossdiff"], prior_cut_slices=1)
    assert (lo, hi) == (event.bands["irm"].lo_percentile, event.bands["irm"].hi_percentile)
    assert evidence["t_0_10"] == pytest.approx(event.bands["irm"].evidence["t_0_10"], rel=1e-4)
