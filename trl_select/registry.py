"""Scorers and rules as plug-ins: a scorer maps the pool to one float per pair, a rule maps scores to a keep-mask.

```python
import numpy as np
from trl_select import SelectionContext, register_rule

@register_rule("drop_lowest_irm", scores=("irm",))  # the scores the callback must compute for this rule
def drop_lowest_irm(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
    return scores["irm"] >= np.nanpercentile(scores["irm"], 10)

config = SelectiveDPOConfig(..., selection_rule="drop_lowest_irm")
```

A rule returns a boolean keep-mask over the pool rows, or `(mask, bands)` with `bands: dict[str, Band]` (the limits
that get logged and plotted). A scorer is `fn(context: ScoringContext) -> np.ndarray`, registered with the inputs it
`needs` (see `SCORER_INPUTS`), so the selection event computes only what its rule uses. The built-ins
(`registry_builtins.py`) register themselves through the same decorators; the modules that look rules up (`config`,
`engine`, the CLI) import them first, and so does `trl_select.register_rule` (and the package's other registry names),
so they are registered before any plug-in or config. This module imports no
plug-in: the registry sits below every rule and scorer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .rules import Band


if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

    from .scores import CompletionLengths, PairLogProbs, PreferenceLoss


# What a scorer can ask for; the selection event fills in the `ScoringContext` fields of each requested input.
SCORER_INPUTS: dict[str, str] = {
    "policy": "`policy`: θ_t's summed completion log-probs over the pool (one no-grad forward).",
    "reference": "`reference`: π_ref's summed completion log-probs over the pool (computed once, cached).",
    "auxiliary": "`auxiliary`: the validation-aligned θ_aux's log-probs over the pool (needs validation pairs).",
    "model": "`model`, `pool`, `collator`, `accelerator`, `batch_size`: θ_t itself and the tokenized pool, for "
    "scorers that need gradients.",
    "validation": "`validation`, `validation_reference`: the tokenized validation pairs and π_ref's log-probs on "
    "them (needs validation pairs).",
}


@dataclass(frozen=True)
class SelectionContext:
    """What a rule knows besides the scores.

    Attributes:
        epoch (`int`):
            The epoch about to start (0-based).
        seed (`int`):
            `args.seed`.
        pool_size (`int`):
            Number of pool rows; a rule's mask has this length.
        pair_ids (`list`):
            The stable id of each pool row (the dataset's `id` column if it has one, else the row index).
        args ([`SelectiveDPOConfig`]):
            The trainer's config (or the config the CLI built).
        dataset ([`~datasets.Dataset`], *optional*, defaults to `None`):
            The training pool as given to the trainer (untokenized columns still present when available).
    """

    epoch: int
    seed: int
    pool_size: int
    pair_ids: list[Any]
    args: Any
    dataset: Any = None


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer gets. Fields the scorer did not declare in `needs` are `None`.

    Log-probs are summed over completion tokens (nats), fp32 on the CPU, in pool-row order.
    """

    pool_size: int
    beta: float
    loss_type: str  # the trainer's first `loss_type`; `loss` is the whole loss (every term and option)
    selection: SelectionContext | None = None
    policy: PairLogProbs | None = None
    reference: PairLogProbs | None = None
    auxiliary: PairLogProbs | None = None
    model: Any = None
    pool: Dataset | None = None
    collator: Callable | None = None
    accelerator: Accelerator | None = None
    batch_size: int = 8
    validation: Dataset | None = None
    validation_reference: PairLogProbs | None = None
    checkpointing_kwargs: dict | None = None  # the trainer's, so a pass that turns checkpointing off restores it
    # The trainer's per-pair loss (docs/design.md §2) and the completion lengths some losses read: `lengths` of the
    # scored rows (context order), `validation_lengths` of the validation pairs. Set for every scorer.
    loss: PreferenceLoss | None = None
    lengths: CompletionLengths | None = None
    validation_lengths: CompletionLengths | None = None
    # TRL's `ld_alpha`: `policy`, `reference`, `auxiliary` are LD-weighted sums already; a scorer that runs the model
    # itself (influence) forms its sums with it (`scores.completion_sums`)
    ld_alpha: float | None = None


RuleFn = Callable[[dict[str, np.ndarray], SelectionContext], "np.ndarray | tuple[np.ndarray, dict[str, Band]]"]
ScorerFn = Callable[[ScoringContext], np.ndarray]


@dataclass(frozen=True)
class RuleSpec:
    name: str
    fn: RuleFn
    scores: tuple[str, ...]


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    fn: ScorerFn
    needs: tuple[str, ...]
    uses_loss: bool = False  # whether the score evaluates the trainer's loss (then it must be a per-pair one)


_RULES: dict[str, RuleSpec] = {}
_SCORERS: dict[str, ScorerSpec] = {}


def register_rule(name: str, scores: Sequence[str], *, overwrite: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Decorator: register `fn(scores, context) -> mask | (mask, bands)` as `selection_rule=name`.

    `scores` names the registered scorers whose values the rule reads (`scores[name]`, one float per pool row); they
    may be registered later, but must exist when a trainer is built. Registering an existing name raises
    `ValueError` unless `overwrite=True`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A rule name must be a non-empty string, got {name!r}.")
    if isinstance(scores, str):
        raise TypeError(f"`scores` must be a sequence of score names, got the string {scores!r}: write ({scores!r},).")
    scores = tuple(scores)

    def decorator(fn: RuleFn) -> RuleFn:
        if name in _RULES and not overwrite:
            raise ValueError(
                f"A selection rule named {name!r} is already registered; pass `overwrite=True` to replace."
            )
        _RULES[name] = RuleSpec(name=name, fn=fn, scores=scores)
        return fn

    return decorator


def register_scorer(
    name: str, needs: Sequence[str], *, uses_loss: bool = False, overwrite: bool = False
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register `fn(context: ScoringContext) -> np.ndarray` (one float per pool row) as score `name`.

    `needs` lists the `ScoringContext` inputs the scorer reads, from `SCORER_INPUTS`. `uses_loss=True` says the score
    evaluates the trainer's loss (`context.loss`): a config whose rule reads it refuses losses that have no per-pair
    form (`aot`, ...); other rules accept every `loss_type`. Registering an existing name raises `ValueError` unless
    `overwrite=True`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A scorer name must be a non-empty string, got {name!r}.")
    if isinstance(needs, str):
        raise TypeError(f"`needs` must be a sequence of input names, got the string {needs!r}: write ({needs!r},).")
    needs = tuple(needs)
    unknown = [need for need in needs if need not in SCORER_INPUTS]
    if unknown:
        raise ValueError(f"Scorer {name!r}: unknown `needs` {unknown}; choose from {list(SCORER_INPUTS)}.")

    def decorator(fn: ScorerFn) -> ScorerFn:
        if name in _SCORERS and not overwrite:
            raise ValueError(f"A scorer named {name!r} is already registered; pass `overwrite=True` to replace.")
        _SCORERS[name] = ScorerSpec(name=name, fn=fn, needs=needs, uses_loss=bool(uses_loss))
        return fn

    return decorator


def unregister_rule(name: str) -> RuleSpec:
    """Remove the rule registered as `name` and return its spec; a `ValueError` naming the registered rules otherwise.

    A config built with `selection_rule=name` before this call keeps its name, but a trainer built from it fails.
    """
    spec = get_rule(name, "name")
    del _RULES[name]
    return spec


def unregister_scorer(name: str) -> ScorerSpec:
    """Remove the scorer registered as `name` and return its spec; a `ValueError` naming the registered scores
    otherwise."""
    spec = get_scorer(name, "name")
    del _SCORERS[name]
    return spec


@contextlib.contextmanager
def registered_rule(name: str, fn: RuleFn, scores: Sequence[str], *, overwrite: bool = False) -> Iterator[RuleFn]:
    """Register `fn` as rule `name` for the duration of a `with` block, then restore the registry as it was.

    With `overwrite=True` a rule already registered under `name` is replaced inside the block and put back after it.

    Example:

    ```python
    >>> with registered_rule("keep_all", lambda scores, context: np.ones(context.pool_size, bool), scores=()):
    ...     config = SelectiveDPOConfig(output_dir="out", selection_rule="keep_all")
    ```
    """
    previous = _RULES.get(name)
    register_rule(name, scores, overwrite=overwrite)(fn)
    try:
        yield fn
    finally:
        if previous is None:
            _RULES.pop(name, None)
        else:
            _RULES[name] = previous


@contextlib.contextmanager
def registered_scorer(
    name: str, fn: ScorerFn, needs: Sequence[str], *, uses_loss: bool = False, overwrite: bool = False
) -> Iterator[ScorerFn]:
    """Register `fn` as scorer `name` for the duration of a `with` block, then restore the registry as it was.

    With `overwrite=True` a scorer already registered under `name` is replaced inside the block and put back after it.
    """
    previous = _SCORERS.get(name)
    register_scorer(name, needs, uses_loss=uses_loss, overwrite=overwrite)(fn)
    try:
        yield fn
    finally:
        if previous is None:
            _SCORERS.pop(name, None)
        else:
            _SCORERS[name] = previous


def registered_rules() -> list[str]:
    return list(_RULES)


def registered_scorers() -> list[str]:
    return list(_SCORERS)


def get_rule(name: str, field_name: str = "selection_rule") -> RuleSpec:
    """The rule registered as `name`; a `ValueError` naming `field_name` and the registered names otherwise."""
    if name not in _RULES:
        raise ValueError(
            f"`{field_name}` must be a registered rule, one of {registered_rules()}, got {name!r}"
            f"{' (`--selection_rule`)' if field_name == 'selection_rule' else ''}. Register a custom rule with "
            "`@trl_select.register_rule(name, scores=...)` before building the config."
        )
    return _RULES[name]


def get_scorer(name: str, field_name: str = "scores") -> ScorerSpec:
    """The scorer registered as `name`; a `ValueError` naming `field_name` and the registered names otherwise."""
    if name not in _SCORERS:
        raise ValueError(
            f"`{field_name}` names the score {name!r}, which is not registered; registered scores: "
            f"{registered_scorers()}. Register one with `@trl_select.register_scorer(name, needs=...)`."
        )
    return _SCORERS[name]


def scorer_needs(score_names: Sequence[str]) -> set[str]:
    """The union of the inputs the named scorers need."""
    return {need for name in score_names for need in get_scorer(name).needs}


def scores_use_loss(score_names: Sequence[str]) -> bool:
    """Whether any of the named scorers evaluates the trainer's loss (`register_scorer(..., uses_loss=True)`).

    A name not registered yet counts as not evaluating it: a config may name a rule whose scorers are registered
    later; the trainer checks again when it is built, when they must exist.
    """
    return any(name in _SCORERS and _SCORERS[name].uses_loss for name in score_names)


def run_scorer(name: str, context: ScoringContext) -> np.ndarray:
    """Call scorer `name` and check that it returned one float per pool row (float64, CPU)."""
    values = np.asarray(get_scorer(name).fn(context), dtype=np.float64)
    if values.shape != (context.pool_size,):
        raise ValueError(
            f"Scorer {name!r} returned shape {values.shape}; it must return one score per pool row, shape "
            f"({context.pool_size},)."
        )
    return values


def apply_rule(
    name: str, scores: dict[str, np.ndarray], context: SelectionContext
) -> tuple[np.ndarray, dict[str, Band]]:
    """Call rule `name` and normalise its result to `(keep-mask, bands)`, checking the mask's shape and type."""
    result = get_rule(name).fn(scores, context)
    mask, bands = result if isinstance(result, tuple) else (result, {})
    mask = np.asarray(mask)
    if mask.shape != (context.pool_size,) or mask.dtype != bool:
        raise ValueError(
            f"Rule {name!r} returned a {mask.dtype} array of shape {mask.shape}; it must return a boolean keep-mask "
            f"of shape ({context.pool_size},)."
        )
    return mask, dict(bands)
