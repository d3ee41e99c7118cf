"""trl-select: DPO and SLiC trainers for TRL that choose, epoch by epoch, which preference pairs to learn from."""

from .callback import SelectionCallback
from .config import SelectiveDPOConfig, SelectiveSLiCConfig
from .history import read_history
from .registry import ScoringContext, SelectionContext, register_rule, register_scorer
from .reporting import read_score_file, read_score_files
from .rules import intersection, jaccard, overlap_coefficient, percentile_band, union
from .scores import PairLogProbs, implicit_reward_margin, loss_difference, preference_loss
from .trainer import SelectiveDPOTrainer, SelectiveSLiCTrainer


__version__ = "0.1.0"

__all__ = [
    "PairLogProbs",
    "ScoringContext",
    "SelectionContext",
    "SelectionCallback",
    "SelectiveDPOConfig",
    "SelectiveDPOTrainer",
    "SelectiveSLiCConfig",
    "SelectiveSLiCTrainer",
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
    "union",
]
