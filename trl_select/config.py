"""Configuration of the selective trainers: `DPOConfig` plus the fields that drive in-loop selection."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import DPOConfig

from . import registry_builtins  # noqa: F401  (the built-in rules and scorers, registered before any lookup)
from .registry import get_rule, scorer_needs, scores_use_loss
from .rules import check_fraction, check_percentile_band
from .scores import LABEL_SMOOTHING_LOSS_TYPES, UNSUPPORTED_LOSS_TYPES, PreferenceLoss
from .validation import check_distributed_setup_supported


logger = logging.getLogger(__name__)

# How θ_aux is built for a fully fine-tuned policy; with PEFT it is always a second adapter.
AUX_MODES = ("full", "lora")
# Which pool log-probs a selection event reuses from the training steps (`training_log_probs.py`).
SCORING_REUSE = ("none", "reference", "reference_and_policy")
# When selection events happen: at epoch boundaries, every `selection_steps` optimizer steps inside the epochs, or
# whichever of the two the run's length calls for (`SelectiveDPOTrainer` resolves "auto" once the pool is known).
SELECTION_STRATEGIES = ("auto", "epoch", "steps")


@dataclass
class SelectiveDPOConfig(DPOConfig):
    r"""
    Configuration class for [`SelectiveDPOTrainer`]: every field of [`~trl.DPOConfig`], plus the fields below.

    From epoch `selection_warmup_epochs` on, at each epoch boundary the trainer rescores the whole training pool with
    the current policy θ_t, the reference π_ref and a validation-aligned auxiliary model θ_aux, applies
    `selection_rule`, and trains the next epoch on the selected pairs only. A run too short for that (one epoch, or a
    `max_steps` budget that ends within the warm-up epochs) selects inside its epochs instead, every
    `selection_steps` optimizer steps after `selection_warmup_steps` (`selection_strategy="auto"`).

    Parameters:
        > Parameters that control the selection

        selection_rule (`str`, *optional*, defaults to `"lossdiff_irm"`):
            A rule registered in `trl_select.registry` (built-in, or your own with `register_rule`).
            `"lossdiff_irm"`: keep a pair iff it lies in the LossDiff band and in the IRM band. `"irm_band"`: IRM band
            only. `"lossdiff_band"`: LossDiff band only. `"lossdiff_irm_auto"`: LossDiff-IRM with the bands chosen at
            each event from evidence: LossDiff `[lossdiff_lo_percentile, 100]`; each IRM tail cut at 10 percentiles
            unless its LossDiff shows benefit, and further while it shows harm (docs/scores_and_rules.md). `"tif"`:
            the band of the exact influence (expensive). `"reward_gap"` / `"davir"`: the `selection_fraction` of pairs
            with the smallest implicit reward gap / the largest DavIR learnability. `"none"`: no selection; the trainer is exactly `DPOTrainer`.
        lossdiff_lo_percentile / lossdiff_hi_percentile (`float`, *optional*, defaults to `10.0` / `90.0`):
            Percentile band of LossDiff `L(z; θ_t) - L(z; θ_aux)` over the whole pool, closed on both ends.
        irm_lo_percentile / irm_hi_percentile (`float`, *optional*, defaults to `10.0` / `90.0`):
            Percentile band of the implicit reward margin `β·h_θt(z)` over the whole pool, closed on both ends.
        influence_lo_percentile / influence_hi_percentile (`float`, *optional*, defaults to `10.0` / `90.0`):
            Percentile band of the exact influence `⟨∇L(D_val), ∇L(z)⟩` kept by the `tif` rule (TIF, eq. 7).
        selection_fraction (`float`, *optional*, defaults to `0.15`):
            Fraction of the pool kept by the fraction rules: `reward_gap` keeps the pairs with the smallest implicit
            reward gap (the difficulty paper keeps 10-15%), `davir` those with the largest DavIR learnability.
        selection_strategy (`str`, *optional*, defaults to `"auto"`):
            When selection events happen. `"epoch"`: at each epoch boundary from `selection_warmup_epochs` on; each
            event rescores the whole pool and the epoch trains the selected pairs. `"steps"`: inside the epochs, every
            `selection_steps` optimizer steps from `selection_warmup_steps` on; each event scores the next chunk of
            pairs of the epoch that are neither trained nor dropped yet, and the steps until the next event train the
            pairs it kept (no pair is trained twice in an epoch). `"auto"`: `"epoch"` if the run trains past its
            warm-up epochs (more than `selection_warmup_epochs` full-pool epochs of steps), else `"steps"`.
        selection_steps (`float`, *optional*, defaults to `0.2`):
            Optimizer steps between two events of the `"steps"` strategy: an integer >= 1, or a float in (0, 1), a
            fraction of the run's steps (`max_steps`, or `num_train_epochs` full-pool epochs), like `eval_steps`.
        selection_warmup_steps (`float`, *optional*, defaults to `0.2`):
            Optimizer steps trained on the pool as it comes before the first event of the `"steps"` strategy: an
            integer >= 1, or a float in (0, 1), a fraction of the run's steps.
        selection_warmup_epochs (`int`, *optional*, defaults to `1`):
            Epochs trained on the full pool before the first selection of the `"epoch"` strategy.
        aux_refresh_epochs (`int`, *optional*, defaults to `1`):
            Rebuild θ_aux from θ_t and realign it every this many selection epochs; in between, its cached
            log-probabilities are reused.
        aux_num_train_epochs (`float`, *optional*, defaults to `1.0`):
            Length of the aux alignment stage, in passes over the validation data.
        aux_max_steps (`int`, *optional*, defaults to `-1`):
            If positive, the aux alignment stage runs exactly this many optimizer steps, overriding
            `aux_num_train_epochs`.
        aux_learning_rate (`float`, *optional*):
            Learning rate of the aux alignment stage (AdamW, constant). Defaults to `learning_rate`.
        aux_batch_size (`int`, *optional*):
            Per-device batch size of the aux alignment stage. Defaults to `per_device_train_batch_size`.
        aux_mode (`str`, *optional*, defaults to `"lora"`):
            How θ_aux is built for a policy that is fully fine-tuned (no PEFT). `"lora"`: θ_t plus a low-rank update,
            LoRA layers injected into the policy for the alignment stage (the policy's weights frozen meanwhile) and
            removed after it: no second copy of the weights, no second full optimizer state, only the adapter and its
            AdamW (about 0.3 GB at 7B with r 16). `"full"`: a copy of the policy with its own AdamW (under DeepSpeed,
            its own engine): 8-16 more bytes per policy parameter at each refresh. On the reverse-digits benchmark the
            LoRA aux's LossDiff-IRM selection overlaps the full copy's by 0.92-0.94 (two full copies on different
            validation shuffles: 0.94) and trains as well (`benchmarks/results/aux_fidelity.md`). With a PEFT policy
            this field has no effect: θ_aux is then a second adapter on the same base weights.
        aux_lora_r (`int`, *optional*, defaults to `16`):
            Rank of the low-rank update of `aux_mode="lora"`.
        aux_lora_alpha (`float`, *optional*, defaults to `32.0`):
            LoRA scaling numerator of `aux_mode="lora"`: the update is `(aux_lora_alpha / aux_lora_r)·B·A`.
        aux_lora_target_modules (`list[str]`, *optional*):
            Modules adapted by `aux_mode="lora"`, as PEFT's `target_modules` (module names, e.g. `["q_proj",
            "v_proj"]`). Defaults to every linear layer but the output head (PEFT's `"all-linear"`).
        scoring_batch_size (`int`, *optional*):
            Per-device batch size of the no-grad scoring passes over the pool. Defaults to
            `per_device_eval_batch_size`.
        scoring_reuse (`str`, *optional*, defaults to `"reference"`):
            Which pool log-probs a selection event takes from the training steps instead of a pass of its own.
            `"none"`: a π_ref pass over the pool at the first event (cached) and a θ_t pass at every event.
            `"reference"`: π_ref's from the warm-up epochs' training steps, which train every pair (the same values,
            up to the padding of the batch; pairs no step trained get a pass). Saves one pool forward per run.
            `"reference_and_policy"`: also θ's, from the training step of each pair trained in the previous epoch (θ
            as it was at that step, up to one epoch old); only the other pairs are rescored. Saves most of the policy
            pass at every event, but the scores are no longer those of θ_t: a stale L(θ) minus a fresh L(θ_aux) mixes
            a whole epoch's learning into LossDiff (rank correlation with the fresh LossDiff 0.09 at the first event,
            0.38 at the second; IRM 0.62 and 0.92; `benchmarks/results/staleness.md`). It trained as well as the exact
            way on the reverse-digits benchmark (`benchmarks/results/quality/quality.md`) at 1.00× a plain run's
            compute instead of 1.14×; use it for IRM-only rules, or where that compute matters more than the scores'
            meaning. The default is `"reference"` because it costs less and selects exactly as `"none"` does. With
            `precompute_ref_log_probs=True` π_ref's log-probs are read from TRL's columns whatever this field says.

        > Parameters that control the reporting of the selection

        selection_category_column (`str`, *optional*):
            Column of the training dataset that groups the pairs (their source, category, ...): the kept fraction per
            value is logged and plotted, and each pair's value is written to the score files. Defaults to a column
            named `source` or `category` if the dataset has one. A column with more than 50 distinct values is not
            reported.
    """

    selection_rule: str = field(
        default="lossdiff_irm",
        metadata={
            "help": "Which pairs each epoch after warm-up trains on. `lossdiff_irm`: the pairs in both the LossDiff "
            "and the IRM percentile bands. `irm_band`: the IRM band only. `lossdiff_band`: the LossDiff band only. "
            "`lossdiff_irm_auto`: LossDiff-IRM with bands chosen from evidence at each event (LossDiff from "
            "`lossdiff_lo_percentile` up; each IRM tail cut at 10 percentiles unless its LossDiff shows benefit, "
            "and further while it shows harm). "
            "`tif`: the exact-influence band (expensive). `reward_gap` / `davir`: the `selection_fraction` of pairs "
            "with the smallest implicit reward gap / largest DavIR learnability. `none`: every pair, exactly as "
            "`DPOTrainer`. Or any rule registered with `trl_select.register_rule`.",
        },
    )
    lossdiff_lo_percentile: float = field(
        default=10.0,
        metadata={"help": "Lower percentile (0-100) of the LossDiff band; pairs below it are dropped."},
    )
    lossdiff_hi_percentile: float = field(
        default=90.0,
        metadata={"help": "Upper percentile (0-100) of the LossDiff band; pairs above it are dropped."},
    )
    irm_lo_percentile: float = field(
        default=10.0,
        metadata={"help": "Lower percentile (0-100) of the implicit-reward-margin band; pairs below it are dropped."},
    )
    irm_hi_percentile: float = field(
        default=90.0,
        metadata={"help": "Upper percentile (0-100) of the implicit-reward-margin band; pairs above it are dropped."},
    )
    influence_lo_percentile: float = field(
        default=10.0,
        metadata={
            "help": "Lower percentile (0-100) of the influence band of the `tif` rule; pairs below it are dropped."
        },
    )
    influence_hi_percentile: float = field(
        default=90.0,
        metadata={
            "help": "Upper percentile (0-100) of the influence band of the `tif` rule; pairs above it are dropped."
        },
    )
    selection_fraction: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the pool, in (0, 1], kept by the fraction rules: `reward_gap` keeps the smallest "
            "implicit reward gaps (hardest pairs), `davir` the largest DavIR learnability."
        },
    )
    selection_strategy: str = field(
        default="auto",
        metadata={
            "help": "When selection happens. `epoch`: at each epoch boundary after `selection_warmup_epochs`. `steps`: "
            "inside the epochs, every `selection_steps` optimizer steps after `selection_warmup_steps`, each event "
            "scoring the next chunk of the epoch's untrained pairs. `auto`: `epoch` if the run trains past its warm-up "
            "epochs, else `steps` (one-epoch runs and short `max_steps` budgets).",
            "choices": list(SELECTION_STRATEGIES),
        },
    )
    selection_steps: float = field(
        default=0.2,
        metadata={
            "help": "Optimizer steps between selection events of the `steps` strategy: an integer >= 1, or a float in "
            "(0, 1), a fraction of the run's total steps (like `eval_steps`)."
        },
    )
    selection_warmup_steps: float = field(
        default=0.2,
        metadata={
            "help": "Optimizer steps trained before the first selection event of the `steps` strategy: an integer "
            ">= 1, or a float in (0, 1), a fraction of the run's total steps."
        },
    )
    selection_warmup_epochs: int = field(
        default=1,
        metadata={
            "help": "Number of epochs trained on the full pool before the first selection of the `epoch` strategy "
            "(at least 1)."
        },
    )
    aux_refresh_epochs: int = field(
        default=1,
        metadata={
            "help": "Rebuild the auxiliary model from the policy and realign it on the validation data every this "
            "many selection epochs; in between, its cached log-probabilities are reused."
        },
    )
    aux_num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Length of each aux alignment stage, in passes over the validation data."},
    )
    aux_max_steps: int = field(
        default=-1,
        metadata={
            "help": "If positive, each aux alignment stage runs exactly this many optimizer steps, overriding "
            "`aux_num_train_epochs`."
        },
    )
    aux_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the aux alignment stage (AdamW, constant). Defaults to `learning_rate`."},
    )
    aux_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Per-device batch size of the aux alignment stage. Defaults to `per_device_train_batch_size`."
        },
    )
    aux_mode: str = field(
        default="lora",
        metadata={
            "help": "How the aux model is built for a fully fine-tuned policy (ignored with PEFT, where it is a second "
            "adapter). `lora`: the policy plus a LoRA update injected for the alignment stage and removed after it "
            "(no second copy of the weights, no second full optimizer state). `full`: a copy of the policy with its "
            "own AdamW (8-16 more bytes per parameter at each refresh).",
            "choices": ["full", "lora"],
        },
    )
    aux_lora_r: int = field(
        default=16,
        metadata={"help": "Rank of the low-rank update of `aux_mode='lora'`."},
    )
    aux_lora_alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA alpha of `aux_mode='lora'`: the update is `(aux_lora_alpha / aux_lora_r)·B·A`."},
    )
    aux_lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules adapted by `aux_mode='lora'`, as PEFT's `target_modules` (module names, e.g. `q_proj "
            "v_proj`). Defaults to every linear layer but the output head (PEFT's `all-linear`)."
        },
    )
    scoring_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Per-device batch size of the no-grad scoring passes over the pool. Defaults to "
            "`per_device_eval_batch_size`."
        },
    )
    scoring_reuse: str = field(
        default="reference",
        metadata={
            "help": "Pool log-probs a selection event takes from the training steps instead of a pass of its own. "
            "`none`: a reference pass (once) and a policy pass at every event. `reference`: the reference "
            "log-probs from the warm-up epochs' training steps. `reference_and_policy`: also the policy log-probs "
            "of the pairs trained in the previous epoch (up to one epoch old); only the others are rescored.",
            "choices": list(SCORING_REUSE),
        },
    )
    selection_category_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of the training dataset that groups the pairs (source, category, ...); the kept fraction "
            "per value is logged and plotted. Defaults to a column named `source` or `category` if there is one."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_selection_fields()
        _check_deepspeed_agrees(self)
        # FSDP, tensor/context/sequence parallelism: refused here, before any model is loaded (selection only).
        check_distributed_setup_supported(self)

    @property
    def selection_enabled(self) -> bool:
        return self.selection_rule != "none"

    @property
    def required_scores(self) -> tuple[str, ...]:
        """The scores `selection_rule` needs, e.g. `("lossdiff", "irm")`, as registered with the rule."""
        return get_rule(self.selection_rule).scores

    @property
    def needs_auxiliary(self) -> bool:
        """Whether a score of the rule needs the validation-aligned aux model θ_aux."""
        return "auxiliary" in scorer_needs(self.required_scores)

    @property
    def needs_validation(self) -> bool:
        """Whether a score of the rule reads validation pairs (through θ_aux, or directly like influence)."""
        return bool({"auxiliary", "validation"} & scorer_needs(self.required_scores))

    @property
    def evaluates_loss(self) -> bool:
        """Whether a score of the rule evaluates the trainer's loss (LossDiff, influence), per pair."""
        return self.selection_enabled and scores_use_loss(self.required_scores)

    def preference_loss(self) -> PreferenceLoss:
        """The trainer's per-pair loss (`loss_type`, `loss_weights`, `beta`, ...), exactly TRL's (docs/design.md §2)."""
        return PreferenceLoss.from_args(self)

    def check_loss_is_scorable(self) -> None:
        """Refuse a loss the rule's scores cannot evaluate per pair (docs/design.md §2).

        LossDiff and influence score with the trainer's own loss, so a rule that reads them needs a loss with a
        per-pair form; rules of IRM, reward gap or DavIR read no loss and accept every `loss_type`.
        """
        if not self.evaluates_loss:
            return
        unscorable = [loss_type for loss_type in self.loss_type if loss_type in UNSUPPORTED_LOSS_TYPES]
        if unscorable:
            raise ValueError(
                f"`loss_type={unscorable[0]!r}` (`--loss_type`) cannot be scored per pair: "
                f"{UNSUPPORTED_LOSS_TYPES[unscorable[0]]}. `selection_rule={self.selection_rule!r}` "
                f"(`--selection_rule`) scores pairs with the trainer's loss ({list(self.required_scores)}); use a rule "
                "that reads no loss (`irm_band`, `reward_gap`, `davir`), or `selection_rule='none'`."
            )
        if self.ld_alpha is not None and "sft" in self.loss_type:
            # Every summed log-prob selection keeps is LD-weighted (`scores.completion_sums`), while TRL's `sft` term
            # reads the unweighted per-token log-probs of the chosen completion (dpo_trainer.py:1495-1502).
            raise ValueError(
                f"`ld_alpha={self.ld_alpha}` with `loss_type` 'sft' (`--loss_type`) cannot be scored per pair: "
                "selection keeps each completion's LD-weighted summed log-prob, while TRL's SFT term reads the "
                f"unweighted one. `selection_rule={self.selection_rule!r}` scores pairs with the trainer's loss; drop "
                "'sft', use a rule that reads no loss (`irm_band`, `reward_gap`, `davir`), or leave `ld_alpha` unset."
            )
        self.preference_loss()  # a ValueError naming the option when the loss is misconfigured

    def percentile_bands(self) -> dict[str, tuple[float, float]]:
        """The configured `(lo, hi)` percentile band of each score the rule needs that has band fields here."""
        return {
            name: (getattr(self, f"{name}_lo_percentile"), getattr(self, f"{name}_hi_percentile"))
            for name in self.required_scores
            if hasattr(self, f"{name}_lo_percentile")
        }

    def _validate_selection_fields(self) -> None:
        get_rule(self.selection_rule)  # a ValueError naming `selection_rule` unless it is registered
        check_percentile_band(
            self.lossdiff_lo_percentile, self.lossdiff_hi_percentile, "lossdiff_lo_percentile`/`lossdiff_hi_percentile"
        )
        check_percentile_band(self.irm_lo_percentile, self.irm_hi_percentile, "irm_lo_percentile`/`irm_hi_percentile")
        check_percentile_band(
            self.influence_lo_percentile,
            self.influence_hi_percentile,
            "influence_lo_percentile`/`influence_hi_percentile",
        )
        check_fraction(self.selection_fraction, "selection_fraction")
        _check_int_at_least(
            self,
            "selection_warmup_epochs",
            1,
            "the first selection needs a policy that differs from the reference, or every implicit reward margin is 0",
        )
        _check_int_at_least(self, "aux_refresh_epochs", 1)
        if self.selection_strategy not in SELECTION_STRATEGIES:
            raise ValueError(
                f"`selection_strategy` must be one of {list(SELECTION_STRATEGIES)} (`--selection_strategy`), got "
                f"{self.selection_strategy!r}."
            )
        for name in ("selection_steps", "selection_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer() and value >= 1:
                setattr(self, name, int(value))  # `--selection_steps 50` parses as a float
                value = int(value)
            if isinstance(value, bool) or not (
                (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1)
            ):
                raise ValueError(
                    f"`{name}` (`--{name}`) must be an integer >= 1 (optimizer steps) or a float in (0, 1) (a fraction "
                    f"of the run's steps), got {value!r}."
                )
        if not self.aux_num_train_epochs > 0:
            raise ValueError(f"`aux_num_train_epochs` must be > 0, got {self.aux_num_train_epochs}.")
        if not isinstance(self.aux_max_steps, int) or self.aux_max_steps == 0 or self.aux_max_steps < -1:
            raise ValueError(
                f"`aux_max_steps` must be -1 (use `aux_num_train_epochs`) or >= 1, got {self.aux_max_steps}."
            )
        if self.aux_learning_rate is not None and not self.aux_learning_rate > 0:
            raise ValueError(f"`aux_learning_rate` must be > 0 or unset, got {self.aux_learning_rate}.")
        if self.aux_mode not in AUX_MODES:
            raise ValueError(f"`aux_mode` must be one of {list(AUX_MODES)}, got {self.aux_mode!r}.")
        if self.scoring_reuse not in SCORING_REUSE:
            raise ValueError(
                f"`scoring_reuse` must be one of {list(SCORING_REUSE)}, got {self.scoring_reuse!r}. Use 'none' for "
                "the exact passes."
            )
        _check_int_at_least(self, "aux_lora_r", 1)
        if isinstance(self.aux_lora_alpha, bool) or not (
            isinstance(self.aux_lora_alpha, int | float) and self.aux_lora_alpha > 0
        ):
            raise ValueError(f"`aux_lora_alpha` must be a number > 0, got {self.aux_lora_alpha!r}.")
        targets = self.aux_lora_target_modules
        if isinstance(targets, str):  # PEFT accepts one name (or `all-linear`) as a string too
            targets = [targets]
        if targets is not None and not (
            isinstance(targets, list | tuple) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"`aux_lora_target_modules` must be unset (all linear layers) or a non-empty list of module names, got "
                f"{self.aux_lora_target_modules!r}."
            )
        for name in ("aux_batch_size", "scoring_batch_size"):
            if getattr(self, name) is not None:
                _check_int_at_least(self, name, 1)
        # Whether the column exists is checked against the training dataset, when the trainer is built.
        if self.selection_category_column is not None and (
            not isinstance(self.selection_category_column, str) or not self.selection_category_column
        ):
            raise ValueError(
                f"`selection_category_column` must be a column name or unset, got {self.selection_category_column!r}."
            )
        warn_inert_loss_options(self)
        if not self.selection_enabled:
            return
        self.check_loss_is_scorable()
        if not self.num_train_epochs > 0:
            raise ValueError(f"`num_train_epochs` must be > 0 with selection, got {self.num_train_epochs}.")
        if self.data_seed is not None:
            logger.warning(
                "`data_seed=%s` has no effect with selection: the selection sampler orders the pairs by `seed` "
                "(`seed + epoch`).",
                self.data_seed,
            )
        if self.train_sampling_strategy == "batch_rebalance":
            raise ValueError(
                "`train_sampling_strategy='batch_rebalance'` (`--train_sampling_strategy`) is not supported with "
                "selection: transformers' `BatchRebalanceSampler` gives the ranks micro-batches of different sizes "
                "(fewer long pairs, more short ones), while the selection sampler gives every rank the same batch "
                "sizes step by step (its compute accounting, segments and resume rely on it). Use 'random' (default), "
                "'sequential' or 'group_by_length', which the selection sampler applies to the selected pairs."
            )
        if self.dataloader_drop_last:
            raise ValueError(
                "`dataloader_drop_last=True` (`--dataloader_drop_last`) is not supported with selection: the selection "
                "sampler never makes a partial last batch (each epoch's selected pairs, or each in-epoch segment, are "
                "cut into balanced batches of at most `per_device_train_batch_size`, the same sizes on every rank, "
                "segments in whole optimizer steps), and dropping pairs to make every batch full would leave up to "
                "world_size x per_device_train_batch_size - 1 selected pairs untrained per epoch. Leave it at False."
            )


@dataclass
class SelectiveSLiCConfig(SelectiveDPOConfig):
    r"""
    Configuration class for [`SelectiveSLiCTrainer`]: [`SelectiveDPOConfig`] with the SLiC loss.

    SLiC here is the reference-normalised hinge loss of RSO / TRL `loss_type="hinge"`: `max(0, 1 - β·h_θ(z))`. Every
    score (LossDiff included) uses this loss.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["hinge"],
        metadata={
            "help": "Loss of the trainer; SLiC is the reference-normalised hinge loss, so only `hinge` is valid."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type != ["hinge"]:
            raise ValueError(
                f"`loss_type` must be ['hinge'] for SelectiveSLiCConfig (SLiC is the hinge loss), got {self.loss_type}."
                " Use SelectiveDPOConfig for the sigmoid (DPO) loss."
            )


def inert_loss_options(config: DPOConfig) -> list[str]:
    """The loss options `config` sets away from their default that TRL 1.16's loss never reads with its `loss_type`
    and `f_divergence_type` (dpo_trainer.py:1353-1516), each as a sentence naming the option."""
    loss_types = set(config.loss_type)
    inert = []
    readers = LABEL_SMOOTHING_LOSS_TYPES + ("aot", "aot_unpaired")
    if config.label_smoothing != 0.0 and not loss_types & set(readers):
        inert.append(f"`label_smoothing={config.label_smoothing}` (read only by the {'/'.join(readers)} losses)")
    if config.discopop_tau != 0.05 and "discopop" not in loss_types:
        inert.append(f"`discopop_tau={config.discopop_tau}` (read only by the discopop loss)")
    f_divergence = getattr(config.f_divergence_type, "value", config.f_divergence_type)
    if config.f_alpha_divergence_coef != 0.5 and f_divergence != "alpha_divergence":
        inert.append(
            f"`f_alpha_divergence_coef={config.f_alpha_divergence_coef}` (read only with "
            "`f_divergence_type='alpha_divergence'`)"
        )
    return inert


def warn_inert_loss_options(config: DPOConfig) -> None:
    """Log a warning for each option the run accepts but its loss ignores (`inert_loss_options`)."""
    inert = inert_loss_options(config)
    if inert:
        logger.warning(
            "These options have no effect with `loss_type=%s` in TRL 1.16, which accepts them silently: %s.",
            list(config.loss_type),
            "; ".join(inert),
        )


def _check_int_at_least(config: object, name: str, minimum: int, why: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f": {why}" if why else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}{reason}.")


def _check_deepspeed_agrees(config: SelectiveDPOConfig) -> None:
    """Refuse a DeepSpeed config that contradicts the trainer's arguments (e.g. `bf16.enabled=false` with `bf16=True`).

    transformers records these mismatches when the arguments are built but raises only when training starts, after the
    models are loaded and (with `precompute_ref_log_probs`) the reference pass has run.
    """
    deepspeed_config = getattr(config, "hf_deepspeed_config", None)
    mismatches = getattr(deepspeed_config, "mismatches", None)
    if mismatches:
        raise ValueError(
            "The DeepSpeed config (`deepspeed`) contradicts the training arguments:\n"
            + "\n".join(mismatches)
            + "\nSet those DeepSpeed values to 'auto', or change the training arguments to match them."
        )
