"""Compute accounting in forward-token equivalents (FTE: one token through one forward of the policy; a backward counts 2 more), pure arithmetic.

One FTE is one token through one forward of a policy-sized model. A backward counts 2 more, so a training step's
policy part costs 3 FTE per token; a frozen model's forward (π_ref, a scoring pass, a validation loss) costs 1.
Tokens are the non-padding tokens of a pair's two sequences as TRL's preference collator builds them: prompt + chosen
and prompt + rejected, each cut to `max_length` (`attention_mask.sum()` of the collated batch, without padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


TRAINING_CATEGORIES: tuple[str, ...] = ("train",)
SELECTION_CATEGORIES: tuple[str, ...] = ("reference", "policy_scoring", "aux_alignment", "aux_validation", "aux_pool")
CATEGORIES: tuple[str, ...] = TRAINING_CATEGORIES + SELECTION_CATEGORIES
METRIC_PREFIX = "selection/compute/"

FORWARD = 1.0  # FTE per token of a forward without gradients
TRAIN_STEP = 3.0  # FTE per token of a forward and its backward (2)


def pair_token_counts(rows: Mapping[str, Sequence[Sequence[int]]] | Any, max_length: int | None) -> np.ndarray:
    """Non-padding tokens of each tokenized pair, `min(P + C, L) + min(P + R, L)` (L = `max_length`, ∞ if None).

    `rows` has TRL's tokenized columns `prompt_ids`, `chosen_ids`, `rejected_ids` (a `datasets.Dataset` or a dict of
    lists). Returns an int64 array, one entry per pair (tokens).
    """
    prompt = np.array([len(ids) for ids in rows["prompt_ids"]], dtype=np.int64)
    chosen = prompt + np.array([len(ids) for ids in rows["chosen_ids"]], dtype=np.int64)
    rejected = prompt + np.array([len(ids) for ids in rows["rejected_ids"]], dtype=np.int64)
    if max_length is not None:
        chosen, rejected = np.minimum(chosen, max_length), np.minimum(rejected, max_length)
    return chosen + rejected


def batch_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding tokens of a collated preference batch (chosen and rejected rows): `attention_mask.sum()`."""
    return int(batch["attention_mask"].sum())


def rows_tokens(token_counts: np.ndarray, rows: Iterable[int]) -> int:
    """Tokens of the pairs at `rows` (a row counted as often as it occurs)."""
    rows = np.fromiter((int(row) for row in rows), dtype=np.int64)
    return int(token_counts[rows].sum()) if len(rows) else 0


@dataclass
class ComputeLedger:
    """Cumulative FTE per category since the training loop began.

    `train`: training steps, `(3 + r)` FTE per token, r = 1 for the live reference forward inside each step (0 with
    `precompute_ref_log_probs`, plus TRL's one precompute pass over the pool, 1 per token). Selection categories:
    `reference` (π_ref over the pool and the validation pairs, once, 1 per token), `policy_scoring` (1 per pool token
    per event), `aux_alignment` (3 per token of the rows its steps train), `aux_validation` (1 per validation token per
    loss pass, two per refresh), `aux_pool` (1 per pool token per refresh).
    """

    fte: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    def add(self, category: str, tokens: float, factor: float = FORWARD) -> None:
        """Add `tokens × factor` FTE to `category`."""
        if category not in CATEGORIES:
            raise KeyError(f"Unknown compute category {category!r}; expected one of {CATEGORIES}.")
        if tokens < 0 or factor < 0:
            raise ValueError(f"Compute must be non-negative, got {tokens} tokens × {factor}.")
        self.fte[category] += float(tokens) * float(factor)

    @property
    def training_total(self) -> float:
        """FTE of the training steps."""
        return sum(self.fte[name] for name in TRAINING_CATEGORIES)

    @property
    def selection_total(self) -> float:
        """FTE of every selection pass (reference, policy scoring, aux)."""
        return sum(self.fte[name] for name in SELECTION_CATEGORIES)

    @property
    def share(self) -> float:
        """selection / (selection + training), in [0, 1]; 0 before anything was counted."""
        total = self.selection_total + self.training_total
        return self.selection_total / total if total > 0 else 0.0

    def as_metrics(self) -> dict[str, float]:
        """`selection/compute/<category>` (cumulative FTE), `.../selection_share`, `.../selection_total`."""
        metrics = {f"{METRIC_PREFIX}{name}": value for name, value in self.fte.items()}
        metrics[f"{METRIC_PREFIX}selection_total"] = self.selection_total
        metrics[f"{METRIC_PREFIX}selection_share"] = self.share
        return metrics

    def summary(self) -> str:
        """The one-line end-of-run summary."""
        aux = self.fte["aux_alignment"] + self.fte["aux_validation"] + self.fte["aux_pool"]
        return (
            f"Compute: training {self.training_total:,.0f} FTE, selection {self.selection_total:,.0f} FTE "
            f"({100 * self.share:.1f}% of the run): reference {self.fte['reference']:,.0f}, policy scoring "
            f"{self.fte['policy_scoring']:,.0f}, aux {aux:,.0f} (alignment {self.fte['aux_alignment']:,.0f}, "
            f"validation {self.fte['aux_validation']:,.0f}, pool {self.fte['aux_pool']:,.0f})"
        )

    def reset(self) -> None:
        self.fte = dict.fromkeys(CATEGORIES, 0.0)
