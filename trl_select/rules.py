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
from dataclasses import dataclass

import numpy as np
import torch


ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_float_array(scores: ArrayLike) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to(torch.float64).cpu().numpy()
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

    def as_dict(self) -> dict[str, float]:
        return {"lo": self.lo, "hi": self.hi, "lo_percentile": self.lo_percentile, "hi_percentile": self.hi_percentile}


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
