"""trl-select: DPO and SLiC trainers for TRL that choose, epoch by epoch, which preference pairs to learn from.

The public names are imported on first use (PEP 562), as in transformers and TRL: `trl-select plot` and the pure math
modules then start without importing the trainer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

# Public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "SelectionCallback": "callback",
    "SelectiveDPOConfig": "config",
    "SelectiveSLiCConfig": "config",
    "read_history": "history",
    "ScoringContext": "registry",
    "SelectionContext": "registry",
    "register_rule": "registry",
    "register_scorer": "registry",
    "registered_rule": "registry",
    "registered_scorer": "registry",
    "unregister_rule": "registry",
    "unregister_scorer": "registry",
    "SelectionEvent": "event",
    "ScoringEngine": "engine",
    "ScoreFile": "score_files",
    "read_score_file": "score_files",
    "read_score_files": "score_files",
    "intersection": "rules",
    "jaccard": "rules",
    "overlap_coefficient": "rules",
    "percentile_band": "rules",
    "union": "rules",
    "Suspect": "suspects",
    "find_suspects": "suspects",
    "PairLogProbs": "scores",
    "PreferenceLoss": "scores",
    "implicit_reward_margin": "scores",
    "loss_difference": "scores",
    "preference_loss": "scores",
    "SelectiveDPOTrainer": "trainer",
    "SelectiveSLiCTrainer": "trainer",
}

__all__ = [
    "PairLogProbs",
    "PreferenceLoss",
    "ScoreFile",
    "ScoringContext",
    "ScoringEngine",
    "SelectionCallback",
    "SelectionContext",
    "SelectionEvent",
    "SelectiveDPOConfig",
    "SelectiveDPOTrainer",
    "SelectiveSLiCConfig",
    "SelectiveSLiCTrainer",
    "Suspect",
    "find_suspects",
    "implicit_reward_margin",
    "intersection",
    "jaccard",
    "loss_difference",
    "overlap_coefficient",
    "percentile_band",
    "preference_loss",
    "read_history",
    "read_score_file",
    "read_score_files",
    "register_rule",
    "register_scorer",
    "registered_rule",
    "registered_scorer",
    "union",
    "unregister_rule",
    "unregister_scorer",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] == "registry":
        # The built-in rules and scorers first, so a plug-in's name clashes with them at its own registration.
        importlib.import_module(".registry_builtins", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .callback import SelectionCallback
    from .config import SelectiveDPOConfig, SelectiveSLiCConfig
    from .engine import ScoringEngine
    from .event import SelectionEvent
    from .history import read_history
    from .registry import (
        ScoringContext,
        SelectionContext,
        register_rule,
        register_scorer,
        registered_rule,
        registered_scorer,
        unregister_rule,
        unregister_scorer,
    )
    from .rules import intersection, jaccard, overlap_coefficient, percentile_band, union
    from .score_files import ScoreFile, read_score_file, read_score_files
    from .scores import PairLogProbs, PreferenceLoss, implicit_reward_margin, loss_difference, preference_loss
    from .suspects import Suspect, find_suspects
    from .trainer import SelectiveDPOTrainer, SelectiveSLiCTrainer
