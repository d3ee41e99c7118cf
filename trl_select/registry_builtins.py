"""The built-in scorers and rules (docs/design.md §3-4), registered through the public decorators like any plug-in.

Scorers: `irm`, `lossdiff`, `reward_gap`, `davir`, `influence`. Rules: `lossdiff_irm`, `irm_band`, `lossdiff_band`,
`reward_gap`, `davir`, `tif`, `none`.
"""

from __future__ import annotations

import numpy as np

from .registry import ScoringContext, SelectionContext, register_rule, register_scorer
from .rules import (
    Band,
    band_intersection,
    bottom_fraction,
    harm_tested_cuts,
    intersection,
    percentile_band,
    top_fraction,
)
from .scores import PreferenceLoss, davir, implicit_reward_margin, reward_gap


# ----- scorers -----


@register_scorer("irm", needs=("policy", "reference"))
def irm_scorer(context: ScoringContext) -> np.ndarray:
    """IRM, the implicit reward margin `β · h_θt(z)` (LossDiff-IRM paper, eq. 8)."""
    return implicit_reward_margin(context.policy, context.reference, context.beta).double().numpy()


def context_loss(context: ScoringContext) -> PreferenceLoss:
    """The trainer's loss of `context` (one `loss_type` with `beta` when a caller built the context without it)."""
    if context.loss is not None:
        return context.loss
    return PreferenceLoss(beta=context.beta, loss_types=(context.loss_type,))


@register_scorer("lossdiff", needs=("policy", "reference", "auxiliary"), uses_loss=True)
def lossdiff_scorer(context: ScoringContext) -> np.ndarray:
    """LossDiff `L(z; θ_t) - L(z; θ_aux)` with the trainer's loss (LossDiff-IRM paper, eq. 8)."""
    loss = context_loss(context)
    return loss.loss_difference(context.policy, context.auxiliary, context.reference, context.lengths).double().numpy()


@register_scorer("reward_gap", needs=("policy", "reference"))
def reward_gap_scorer(context: ScoringContext) -> np.ndarray:
    """Implicit reward gap `β · h_θt(z)` (difficulty-based selection, arXiv 2508.04149); small = hard."""
    return reward_gap(context.policy, context.reference, context.beta).double().numpy()


@register_scorer("davir", needs=("policy", "reference"))
def davir_scorer(context: ScoringContext) -> np.ndarray:
    """DavIR normalised learnability of the chosen response `(ℓ_ref(y_w) - ℓ_θt(y_w)) / ℓ_ref(y_w)`."""
    return davir(context.policy, context.reference).numpy()


@register_scorer("influence", needs=("model", "reference", "validation"), uses_loss=True)
def influence_scorer(context: ScoringContext) -> np.ndarray:
    """Exact first-order influence `⟨∇L(D_val; θ_t), ∇L(z; θ_t)⟩` over the trainable parameters (expensive)."""
    from .influence import influence_scores

    return influence_scores(context)


# ----- rules -----


def _configured_bands(context: SelectionContext, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """The `(lo, hi)` percentiles of each named score from the config (`{name}_lo_percentile`/`_hi_percentile`)."""
    args = context.args
    return {name: (getattr(args, f"{name}_lo_percentile"), getattr(args, f"{name}_hi_percentile")) for name in names}


@register_rule("lossdiff_irm", scores=("lossdiff", "irm"))
def lossdiff_irm_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """LossDiff-IRM (eq. 9): keep a pair iff it is in the LossDiff band and in the IRM band."""
    return band_intersection(scores, _configured_bands(context, ("lossdiff", "irm")))


def evidence_bands(
    scores: dict[str, np.ndarray], lossdiff_lo_percentile: float, prior_cut_slices: int = 0
) -> tuple[np.ndarray, dict[str, Band]]:
    """LossDiff `[P_lo, max]` and the IRM band of `harm_tested_cuts(IRM, LossDiff, prior_cut_slices=...)`."""
    lo, hi, evidence = harm_tested_cuts(scores["irm"], scores["lossdiff"], prior_cut_slices=prior_cut_slices)
    lossdiff_keep, lossdiff_band = percentile_band(scores["lossdiff"], lossdiff_lo_percentile, 100.0)
    irm_keep, irm_band = percentile_band(scores["irm"], lo, hi)
    irm_band = Band(irm_band.lo, irm_band.hi, irm_band.lo_percentile, irm_band.hi_percentile, evidence)
    return intersection(lossdiff_keep, irm_keep), {"lossdiff": lossdiff_band, "irm": irm_band}


# `lossdiff_irm_auto` cuts the outer IRM slice of each end (the paper's 10-90) unless it shows benefit.
AUTO_PRIOR_CUT_SLICES = 1


@register_rule("lossdiff_irm_auto", scores=("lossdiff", "irm"))
def lossdiff_irm_auto_rule(
    scores: dict[str, np.ndarray], context: SelectionContext
) -> tuple[np.ndarray, dict[str, Band]]:
    """LossDiff-IRM with bands chosen from evidence (docs/scores_and_rules.md, "Which rule for which data").

    - LossDiff band `[P_lo, max]`, `lo = lossdiff_lo_percentile`: a large LossDiff means the pair's gradient agrees
      with the validation gradient (first order), so its upper tail is kept.
    - IRM band from `harm_tested_cuts(IRM, LossDiff, prior_cut_slices=1)`, in slices of 10 percentiles: the outer
      slice of each end is cut (the paper's 10-90) unless its mean LossDiff is above zero by more than 2 standard
      errors; further slices (up to 40 percentiles a side) are cut while their mean LossDiff is below zero by more
      than 2 standard errors.
    Reads only the two scores the event computed already: no extra forward. The same on every rank (the scores are).
    """
    return evidence_bands(scores, context.args.lossdiff_lo_percentile, AUTO_PRIOR_CUT_SLICES)


@register_rule("irm_band", scores=("irm",))
def irm_band_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """The IRM band only."""
    return band_intersection(scores, _configured_bands(context, ("irm",)))


@register_rule("lossdiff_band", scores=("lossdiff",))
def lossdiff_band_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """The LossDiff band only."""
    return band_intersection(scores, _configured_bands(context, ("lossdiff",)))


@register_rule("reward_gap", scores=("reward_gap",))
def reward_gap_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """Difficulty-based selection: keep the `selection_fraction` of pairs with the smallest implicit reward gap."""
    keep, band = bottom_fraction(scores["reward_gap"], context.args.selection_fraction)
    return keep, {"reward_gap": band}


@register_rule("davir", scores=("davir",))
def davir_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """DavIR: keep the `selection_fraction` of pairs whose chosen response is the most learnable."""
    keep, band = top_fraction(scores["davir"], context.args.selection_fraction)
    return keep, {"davir": band}


@register_rule("tif", scores=("influence",))
def tif_rule(scores: dict[str, np.ndarray], context: SelectionContext) -> tuple[np.ndarray, dict[str, Band]]:
    """TIF, the truncated influence function (eq. 7): keep a pair iff its exact influence is in the band."""
    return band_intersection(scores, _configured_bands(context, ("influence",)))


@register_rule("none", scores=())
def keep_everything(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
    """No selection: with `selection_rule="none"` the trainer is exactly `DPOTrainer` and never calls this."""
    return np.ones(context.pool_size, dtype=bool)
