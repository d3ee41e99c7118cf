"""Selection rules (docs/design.md §4): pure functions from scores to a boolean keep-mask, and set algebra on selections.

Conventions, the same for every rule:

- Percentiles are taken over the finite scores of the whole pool with NumPy's default (linear) interpolation, so a
  band's limits are always finite numbers.
- Bands are closed: `P_lo(S) <= S(z) <= P_hi(S)`. Ties at a limit are all kept, so with many tied scores the kept
  fraction can exceed `(hi - lo) / 100`; with all scores equal, every pair is kept.
- A non-finite score (NaN, +inf, -inf) is never kept by any rule: NaN is not "medium", and an infinite score is
  outside any finite band. Non-finite scores usually mean an fp16 overflow, so they are counted and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np


if TYPE_CHECKING:
    import torch

# Scores as NumPy arrays, torch tensors (read without importing torch here: this module stays pure NumPy) or lists.
ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]


def _as_float_array(scores: ArrayLike) -> np.ndarray:
    if callable(getattr(scores, "detach", None)):  # a torch.Tensor, possibly on an accelerator
        scores = scores.detach().double().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"Scores must be a 1-D array, got shape {array.shape}.")
    return array


@dataclass(frozen=True)
class Band:
    """The closed interval `[lo, hi]` of score values that a band rule keeps, with the percentiles it came from."""

    lo: float
    hi: float
    lo_percentile: float
    hi_percentile: float
    # Why a rule chose these percentiles, when it chose them from evidence (`harm_tested_cuts`); empty for fixed bands.
    evidence: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        limits = {
            "lo": self.lo,
            "hi": self.hi,
            "lo_percentile": self.lo_percentile,
            "hi_percentile": self.hi_percentile,
        }
        return limits | ({"evidence": dict(self.evidence)} if self.evidence else {})


def check_percentile_band(lo_percentile: float, hi_percentile: float, name: str = "band") -> None:
    """Raise a `ValueError` naming `name` unless `0 <= lo_percentile < hi_percentile <= 100`."""
    if not (0.0 <= lo_percentile < hi_percentile <= 100.0):
        raise ValueError(
            f"`{name}` must satisfy 0 <= lo < hi <= 100 (percentiles of the pool), got lo={lo_percentile}, "
            f"hi={hi_percentile}."
        )


def percentile_band(scores: ArrayLike, lo_percentile: float, hi_percentile: float) -> tuple[np.ndarray, Band]:
    """Band rule (TIF, eq. 7 of the LossDiff-IRM paper): keep z iff `P_lo(S) <= S(z) <= P_hi(S)`.

    Returns the boolean keep-mask and the band. With no finite score at all, nothing is kept and the band is NaN.
    """
    check_percentile_band(lo_percentile, hi_percentile)
    values = _as_float_array(scores)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros_like(finite), Band(float("nan"), float("nan"), lo_percentile, hi_percentile)
    lo, hi = np.percentile(values[finite], [lo_percentile, hi_percentile])
    with np.errstate(invalid="ignore"):
        keep = finite & (values >= lo) & (values <= hi)
    return keep, Band(float(lo), float(hi), lo_percentile, hi_percentile)


def intersection(*masks: np.ndarray) -> np.ndarray:
    """Keep a pair iff every mask keeps it (LossDiff-IRM, eq. 9, is the intersection of two bands)."""
    if not masks:
        raise ValueError("`intersection` needs at least one mask.")
    return np.logical_and.reduce([np.asarray(mask, dtype=bool) for mask in masks])


def band_intersection(
    scores: dict[str, ArrayLike], bands: dict[str, tuple[float, float]]
) -> tuple[np.ndarray, dict[str, Band]]:
    """Keep a pair iff every score in `bands` lies in its percentile band: LossDiff-IRM (eq. 9) for two scores.

    Returns the keep-mask and each score's band.
    """
    masks, limits = [], {}
    for name, (lo_percentile, hi_percentile) in bands.items():
        mask, limits[name] = percentile_band(scores[name], lo_percentile, hi_percentile)
        masks.append(mask)
    return intersection(*masks), limits


# The candidate cuts of `harm_tested_cuts`: slices of 10 percentiles, at most 40 percentiles cut from either end; a
# slice is harmful (beneficial) when its mean effect is below (above) zero by more than two standard errors.
HARM_SLICE_PERCENTILES = 10.0
HARM_MAX_CUT_PERCENTILES = 40.0
HARM_T_THRESHOLD = 2.0


def harm_tested_cuts(
    ranking: ArrayLike,
    effect: ArrayLike,
    *,
    slice_percentiles: float = HARM_SLICE_PERCENTILES,
    max_cut_percentiles: float = HARM_MAX_CUT_PERCENTILES,
    t_threshold: float = HARM_T_THRESHOLD,
    prior_cut_slices: int = 0,
) -> tuple[float, float, dict[str, float]]:
    """The percentile band of `ranking` whose tails show no evidence of harm in `effect` (docs/scores_and_rules.md).

    The pairs with both values finite are sorted by `ranking` and split into slices of `slice_percentiles` (equal
    counts, ties broken by pool row). Walking in from each end, a slice is cut while its effect is harmful beyond
    noise: `t = mean(effect) / (sd(effect) / √n) < -t_threshold`, for at most `max_cut_percentiles` per side. The
    first slice that passes stops the walk, so a band stays one interval. With `prior_cut_slices = m > 0` the `m`
    outer slices of each end are cut by default (e.g. 1: the paper's 10-90 band) and kept only with evidence of
    benefit, `t > t_threshold` (which stops the walk); past them, cuts need evidence of harm as above.

    With `ranking` = IRM and `effect` = LossDiff, a slice's mean LossDiff is a first-order estimate of what one step
    on its pairs does to the validation loss per pair (positive: it lowers it), measured by a score that did not
    choose the slice, so there is no winner's curse in the test.

    Returns:
        `(lo_percentile, hi_percentile, evidence)` with `evidence` holding `t_{a}_{b}` and `mean_{a}_{b}` of every
        slice from percentile `a` to `b`, and `pairs_per_slice`. With fewer than 2 pairs per slice nothing is cut.
    """
    values, effects = _as_float_array(ranking), _as_float_array(effect)
    if values.shape != effects.shape:
        raise ValueError(f"`ranking` and `effect` must have the same shape, got {values.shape} and {effects.shape}.")
    if not 0 < slice_percentiles <= 50 or 100 % slice_percentiles:
        raise ValueError(f"`slice_percentiles` must divide 100 and be in (0, 50], got {slice_percentiles}.")
    if not 0 <= max_cut_percentiles < 50:
        raise ValueError(f"`max_cut_percentiles` must be in [0, 50), got {max_cut_percentiles}.")
    rows = np.flatnonzero(np.isfinite(values) & np.isfinite(effects))
    num_slices = int(round(100 / slice_percentiles))
    evidence: dict[str, float] = {"pairs_per_slice": float(len(rows) // num_slices)}
    if len(rows) < 2 * num_slices:
        return 0.0, 100.0, evidence
    order = rows[np.argsort(values[rows], kind="stable")]
    t_values = []
    for k, members in enumerate(np.array_split(order, num_slices)):
        slice_effect = effects[members]
        mean = float(slice_effect.mean())
        se = float(slice_effect.std(ddof=1)) / np.sqrt(len(slice_effect))
        t = mean / se if se > 0 else (0.0 if mean == 0 else float(np.sign(mean)) * np.inf)
        name = f"{k * slice_percentiles:g}_{(k + 1) * slice_percentiles:g}"
        evidence[f"mean_{name}"], evidence[f"t_{name}"] = mean, float(t)
        t_values.append(t)
    max_slices = int(max_cut_percentiles // slice_percentiles)
    if not 0 <= prior_cut_slices <= max_slices:
        raise ValueError(f"`prior_cut_slices` must be in [0, {max_slices}], got {prior_cut_slices}.")

    def cut_from(t_from_end: list[float]) -> int:
        cut = 0
        while cut < max_slices:
            t = t_from_end[cut]
            if cut < prior_cut_slices:
                if t > t_threshold:  # evidence of benefit: keep this slice and everything inward
                    break
            elif not t < -t_threshold:  # past the prior cut, only evidence of harm cuts
                break
            cut += 1
        return cut

    lo_slices, hi_slices = cut_from(t_values), cut_from(t_values[::-1])
    return lo_slices * slice_percentiles, 100.0 - hi_slices * slice_percentiles, evidence


def union(*masks: np.ndarray) -> np.ndarray:
    """Keep a pair iff at least one mask keeps it."""
    if not masks:
        raise ValueError("`union` needs at least one mask.")
    return np.logical_or.reduce([np.asarray(mask, dtype=bool) for mask in masks])


def jaccard(a: set[int] | Sequence[int], b: set[int] | Sequence[int]) -> float:
    """`|A ∩ B| / |A ∪ B|`; 1.0 for two empty selections."""
    a, b = set(a), set(b)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def overlap_coefficient(a: set[int] | Sequence[int], b: set[int] | Sequence[int]) -> float:
    """Overlap of two selections (docs/design.md §4.5): `|A ∩ B| / min(|A|, |B|)`; 0.0 if either is empty."""
    a, b = set(a), set(b)
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


def score_quantiles(scores: ArrayLike, quantiles: Sequence[float] = (0, 10, 25, 50, 75, 90, 100)) -> dict[str, float]:
    """Percentiles of the finite scores, keyed `"p{q}"`, plus the count of non-finite ones under `"num_nonfinite"`."""
    values = _as_float_array(scores)
    finite = values[np.isfinite(values)]
    out = (
        {f"p{q:g}": float(v) for q, v in zip(quantiles, np.percentile(finite, quantiles), strict=True)}
        if finite.size
        else {}
    )
    out["num_nonfinite"] = float(values.size - finite.size)
    return out


def check_fraction(fraction: float, name: str = "fraction") -> None:
    """Raise a `ValueError` naming `name` unless `0 < fraction <= 1`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"`{name}` must be a fraction of the pool in (0, 1], got {fraction!r}.")


def bottom_fraction(scores: ArrayLike, fraction: float) -> tuple[np.ndarray, Band]:
    """Keep the `k = max(1, round(fraction · pool_size))` pairs with the smallest scores (the reward-gap rule).

    Exactly `k` pairs are kept (fewer only if fewer scores are finite): ties at the cut are broken by pool row, lower
    rows first, so the result is deterministic and the same on every rank. Non-finite scores are never kept. The band
    holds the smallest and largest kept scores, with percentiles `(0, 100 · fraction)`.
    """
    return _extreme_fraction(scores, fraction, largest=False)


def top_fraction(scores: ArrayLike, fraction: float) -> tuple[np.ndarray, Band]:
    """Keep the `k = max(1, round(fraction · pool_size))` pairs with the largest scores (the DavIR rule).

    Same conventions as `bottom_fraction` (ties by pool row, lower rows first); percentiles `(100 - 100 · fraction,
    100)`.
    """
    return _extreme_fraction(scores, fraction, largest=True)


def _extreme_fraction(scores: ArrayLike, fraction: float, *, largest: bool) -> tuple[np.ndarray, Band]:
    check_fraction(fraction)
    values = _as_float_array(scores)
    finite_rows = np.flatnonzero(np.isfinite(values))
    k = min(max(1, round(fraction * values.size)), finite_rows.size)
    # A stable sort on (−)score keeps equal scores in row order, which is the documented tie-break.
    order = np.argsort(-values[finite_rows] if largest else values[finite_rows], kind="stable")
    kept_rows = finite_rows[order[:k]]
    keep = np.zeros(values.size, dtype=bool)
    keep[kept_rows] = True
    percentiles = (100.0 - 100.0 * fraction, 100.0) if largest else (0.0, 100.0 * fraction)
    if k == 0:
        return keep, Band(float("nan"), float("nan"), *percentiles)
    return keep, Band(float(values[kept_rows].min()), float(values[kept_rows].max()), *percentiles)
