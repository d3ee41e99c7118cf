"""One selection event end to end: score the pool, apply the rule, hand the next epoch its pairs, record it all."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .auxiliary import AlignmentSettings, AuxiliaryModel
from .checkpoint import SelectionState
from .compute import FORWARD, TRAIN_STEP, ComputeLedger, pair_token_counts, rows_tokens
from .history import SelectionHistory
from .registry import ScoringContext, SelectionContext, apply_rule, run_scorer, scorer_needs
from .rules import Band, jaccard, score_quantiles
from .schedule import RetimedLR, selective_horizon
from .scores import PairLogProbs
from .scoring import build_pass_loader, check_same_on_all_ranks, inference_mode, run_log_prob_pass, sequence_log_probs
from .training_log_probs import POLICY, REFERENCE, TrainingLogProbs, fill_rows, missing_rows
from .validation import min_selection_size


if TYPE_CHECKING:
    from .trainer import SelectiveDPOTrainer


logger = get_logger(__name__)  # logs on the main process only


@contextlib.contextmanager
def _timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - start


@dataclass
class SelectionEvent:
    """Everything one selection event decided, handed to each reporter in `SelectionCallback.reporters`.

    Arrays are in pool-row order (row `i` is pair `pair_ids[i]`). A warm-up event has no scores and keeps every pair.
    """

    epoch: int
    global_step: int
    kind: str  # "warmup" or "selection"
    rule: str
    pair_ids: list[Any]
    keep: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    bands: dict[str, Band] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    aux_refreshed: bool = False


Reporter = Callable[[SelectionEvent, TrainingArguments, TrainerState], None]


class SelectionCallback(TrainerCallback):
    """Runs a selection event at the start of every epoch from `selection_warmup_epochs` on.

    The event, on every rank: score the whole pool with θ_t (and π_ref once, cached; θ_aux at each refresh, cached),
    compute the rule's scores and keep-mask, replace the sampler's selection (the epoch's iterator is created after
    this hook, so the new selection applies to this very epoch), and move the run's horizon (`state.max_steps`) and
    the LR schedule's end to the new epoch length.
    The main process appends the event to `selection_history.jsonl`. Metrics go into the trainer's metric buffer under
    `selection/`, so the next log carries them to every `report_to` backend.

    Warm-up epochs are recorded too, as events that keep the full pool.

    `reporters` are called on every rank with each `SelectionEvent`, after the sampler is updated; a reporter that
    writes files or talks to a tracker checks `state.is_world_process_zero` itself.
    """

    def __init__(self, trainer: SelectiveDPOTrainer, validation_dataset) -> None:
        self.trainer = trainer
        self.validation_dataset = validation_dataset
        self.history = SelectionHistory(trainer.args.output_dir)
        self.pair_ids: list[Any] = trainer.pair_ids
        self._pool_loader = None
        self._reference: PairLogProbs | None = None
        self._validation_reference: PairLogProbs | None = None
        self._auxiliary_log_probs: PairLogProbs | None = None
        self._auxiliary: AuxiliaryModel | None = None
        self._previous_selection: list[int] | None = None
        self._last_epoch_handled: int | None = None
        self._epoch_start_step = 0
        self._restored_aux_num_refreshes = 0
        self.reporters: list[Reporter] = []
        # Cumulative FTE per category (`compute.py`), counted from the tokenized datasets' lengths: exact, global
        # (every rank counts the same), and without collectives or the scoring passes' padding duplicates.
        self.compute = ComputeLedger()
        self._token_counts: dict[str, np.ndarray] = {}
        self._precompute_pass_counted = False
        # The log-probs the training steps compute, kept for the next event (`scoring_reuse`).
        self.training_log_probs = TrainingLogProbs(self.sampler.pool_size, trainer.accelerator.device)
        self._checkpoint_training_log_probs: dict[str, torch.Tensor] = {}

    # ----- hooks -----

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.global_step == 0 and self.trainer.accelerator.is_main_process:
            self.history.reset()
        if self.trainer.args.precompute_ref_log_probs and not self._precompute_pass_counted:
            # TRL's precompute pass (π_ref over the pool, before training) is part of training compute, as in a plain run
            self.compute.add("train", self.token_counts("pool").sum(), FORWARD)
            self._precompute_pass_counted = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        # The micro-batches this epoch ran (all of them, or fewer when `max_steps` stopped it): 3 FTE per token for
        # the policy's forward and backward, plus 1 for π_ref's forward inside the step unless precomputed.
        micro_batches = (state.global_step - self._epoch_start_step) * args.gradient_accumulation_steps
        factor = TRAIN_STEP + (0.0 if args.precompute_ref_log_probs else FORWARD)
        self.compute.add(
            "train", rows_tokens(self.token_counts("pool"), self.sampler.trained_rows(micro_batches)), factor
        )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.training_log_probs.stop()
        logger.info(self.compute.summary())

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, train_dataloader=None, **kwargs
    ) -> None:
        epoch = math.floor(state.epoch + 1e-6)
        if epoch == self._last_epoch_handled:
            # Resumed mid-epoch: the Trainer skips the micro-batches the checkpoint had trained.
            skipped = 0 if args.ignore_data_skip else (state.global_step - self._epoch_start_step)
            self._record_training_log_probs(epoch, skipped * args.gradient_accumulation_steps, state)
            return
        self._last_epoch_handled = epoch
        self._epoch_start_step = state.global_step
        if epoch < args.selection_warmup_epochs:
            self._record_warmup(epoch, state)
        else:
            self._select(epoch, state, train_dataloader)
        if POLICY in self._reused_kinds(epoch, state):
            self.training_log_probs.clear(POLICY)  # the event has used the previous epoch's
        self._record_training_log_probs(epoch, 0, state)

    def _reused_kinds(self, epoch: int, state: TrainerState) -> set[str]:
        """Which log-probs epoch `epoch`'s training steps record for a later event (`scoring_reuse`).

        π_ref's during the warm-up epochs, until the reference is cached (not when TRL precomputed them: those are
        read from the dataset's columns); θ's in every epoch that a selection event follows.
        """
        args = self.trainer.args
        needs = scorer_needs(args.required_scores)
        kinds = set()
        if (
            args.scoring_reuse != "none"
            and needs & {"reference", "auxiliary"}
            and not args.precompute_ref_log_probs
            and epoch < args.selection_warmup_epochs
            and self._reference is None
        ):
            kinds.add(REFERENCE)
        if args.scoring_reuse == "reference_and_policy" and "policy" in needs and epoch + 1 < state.num_train_epochs:
            kinds.add(POLICY)
        return kinds

    def _record_training_log_probs(self, epoch: int, first_batch: int, state: TrainerState) -> None:
        self.training_log_probs.begin_epoch(self.sampler.rank_batches(), first_batch, self._reused_kinds(epoch, state))

    # ----- the event -----

    @property
    def sampler(self):
        return self.trainer.selection_sampler

    def _record_warmup(self, epoch: int, state: TrainerState) -> None:
        pool_size = self.sampler.pool_size
        self._apply_selection(epoch, list(range(pool_size)))
        self._write_record(
            {
                "epoch": epoch,
                "event": "warmup",
                "global_step": state.global_step,
                "pool_size": pool_size,
                "num_selected": pool_size,
                "rule": self.trainer.args.selection_rule,
                "thresholds": {},
                "selected_ids": self.pair_ids,
                "trimmed_ids": self._trimmed_ids(),
            }
        )
        self._report(
            SelectionEvent(
                epoch=epoch,
                global_step=state.global_step,
                kind="warmup",
                rule=self.trainer.args.selection_rule,
                pair_ids=self.pair_ids,
                keep=np.ones(pool_size, dtype=bool),
            ),
            state,
        )

    def token_counts(self, split: str) -> np.ndarray:
        """Tokens per pair of the pool (`split="pool"`) or the validation pairs, as the collator builds them."""
        if split not in self._token_counts:
            dataset = self.trainer.train_dataset if split == "pool" else self.validation_dataset
            max_length = getattr(self.trainer.data_collator, "max_length", self.trainer.args.max_length)
            self._token_counts[split] = pair_token_counts(dataset, max_length)
        return self._token_counts[split]

    def _select(self, epoch: int, state: TrainerState, train_dataloader) -> None:
        args = self.trainer.args
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        scores = self._compute_scores(epoch, metrics, reuse_training=True)
        keep, bands = apply_rule(args.selection_rule, scores, self.selection_context(epoch))
        selected = np.flatnonzero(keep).tolist()
        pool_size = self.sampler.pool_size
        self._check_selection_size(epoch, selected, scores)
        similarity = jaccard(selected, self._previous_selection) if self._previous_selection is not None else 1.0
        self._apply_selection(epoch, selected)
        self._retime_schedule(epoch, state, train_dataloader)
        elapsed = time.perf_counter() - start
        metrics.update(
            {
                "selection/epoch": float(epoch),
                "selection/pool_size": float(pool_size),
                "selection/num_selected": float(len(selected)),
                "selection/kept_fraction": len(selected) / pool_size,
                "selection/jaccard_prev": similarity,
                "selection/churn": 1.0 - similarity,
                "selection/seconds": elapsed,
                **self.compute.as_metrics(),
            }
        )
        for name, band in bands.items():
            metrics[f"selection/{name}/band_lo"] = band.lo
            metrics[f"selection/{name}/band_hi"] = band.hi
        for name, values in scores.items():
            for key, value in score_quantiles(values).items():
                metrics[f"selection/{name}/{key}"] = value
        self._publish(metrics)
        logger.info(
            "Selection at epoch %d: kept %d/%d (%.1f%%), %s, churn %.3f, %.1fs",
            epoch,
            len(selected),
            pool_size,
            100 * len(selected) / pool_size,
            ", ".join(f"{name} in [{band.lo:.4g}, {band.hi:.4g}]" for name, band in bands.items()),
            1.0 - similarity,
            elapsed,
        )
        self._write_record(
            {
                "epoch": epoch,
                "event": "selection",
                "global_step": state.global_step,
                "pool_size": pool_size,
                "num_selected": len(selected),
                "rule": args.selection_rule,
                "thresholds": {name: {"lo": band.lo, "hi": band.hi} for name, band in bands.items()},
                "percentiles": {
                    name: {"lo": band.lo_percentile, "hi": band.hi_percentile} for name, band in bands.items()
                },
                "aux_refreshed": "selection/aux/refreshed" in metrics,
                "selected_ids": [self.pair_ids[row] for row in selected],
                "trimmed_ids": self._trimmed_ids(),
            }
        )
        self._report(
            SelectionEvent(
                epoch=epoch,
                global_step=state.global_step,
                kind="selection",
                rule=args.selection_rule,
                pair_ids=self.pair_ids,
                keep=keep,
                scores=scores,
                bands=bands,
                metrics=metrics,
                aux_refreshed="selection/aux/refreshed" in metrics,
            ),
            state,
        )

    def selection_context(self, epoch: int) -> SelectionContext:
        """What the rule sees besides the scores (the same on every rank)."""
        trainer = self.trainer
        return SelectionContext(
            epoch=epoch,
            seed=trainer.args.seed,
            pool_size=self.sampler.pool_size,
            pair_ids=self.pair_ids,
            args=trainer.args,
            dataset=trainer.train_dataset,
        )

    def _compute_scores(
        self,
        epoch: int,
        metrics: dict[str, float],
        score_names: tuple[str, ...] | None = None,
        reuse_training: bool = False,
    ) -> dict[str, np.ndarray]:
        """Every score in `score_names` (default: those `selection_rule` needs), computing only the inputs they need.

        With `reuse_training` (a selection event), the pool log-probs the training steps recorded (`scoring_reuse`)
        stand in for the passes over the pairs they cover.
        """
        args, trainer = self.trainer.args, self.trainer
        score_names = args.required_scores if score_names is None else score_names
        needs = scorer_needs(score_names)
        inputs: dict[str, Any] = {}
        if needs & {"reference", "auxiliary"}:
            with _timed(metrics, "selection/seconds_reference"):
                inputs["reference"] = self.reference_log_probs(reuse_training=reuse_training)
        if "policy" in needs:
            with _timed(metrics, "selection/seconds_policy"):
                inputs["policy"] = self.policy_log_probs(reuse_training=reuse_training, metrics=metrics)
        if "auxiliary" in needs:
            inputs["auxiliary"] = self._auxiliary_pool_log_probs(epoch, metrics)
        if "model" in needs:
            inputs.update(
                model=trainer.accelerator.unwrap_model(trainer.model),
                pool=trainer.train_dataset,
                collator=trainer.data_collator,
                accelerator=trainer.accelerator,
                batch_size=trainer.scoring_batch_size,
                checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
        if "validation" in needs:
            inputs.update(
                validation=self.validation_dataset, validation_reference=self.validation_reference_log_probs()
            )
        context = ScoringContext(
            pool_size=self.sampler.pool_size,
            beta=args.beta,
            loss_type=args.loss_type[0],
            selection=self.selection_context(epoch),
            **inputs,
        )
        return {name: run_scorer(name, context) for name in score_names}

    def _auxiliary_pool_log_probs(self, epoch: int, metrics: dict[str, float]) -> PairLogProbs:
        """θ_aux's pool log-probs: rebuilt and realigned when due (`aux_refresh_epochs`), else the cached ones."""
        args = self.trainer.args
        if self._auxiliary_log_probs is None or (epoch - args.selection_warmup_epochs) % args.aux_refresh_epochs == 0:
            with _timed(metrics, "selection/seconds_aux"):
                result = self.auxiliary().refresh(self.pool_loader(), self.sampler.pool_size)
            self._auxiliary_log_probs = result.pool_log_probs
            metrics["selection/aux/refreshed"] = 1.0
            metrics["selection/aux/val_loss_before"] = result.validation_loss_before
            metrics["selection/aux/val_loss_after"] = result.validation_loss_after
            metrics["selection/aux/steps"] = float(result.num_steps)
            metrics["selection/aux/skipped_steps"] = float(result.skipped_steps)
            validation_tokens = self.token_counts("validation")
            self.compute.add("aux_alignment", rows_tokens(validation_tokens, result.alignment_rows), TRAIN_STEP)
            self.compute.add("aux_validation", 2 * validation_tokens.sum(), FORWARD)  # the losses before and after
            self.compute.add("aux_pool", self.token_counts("pool").sum(), FORWARD)
            logger.info(
                "Aux model refreshed at epoch %d: validation loss %.4f -> %.4f in %d steps",
                epoch,
                result.validation_loss_before,
                result.validation_loss_after,
                result.num_steps,
            )
        return self._auxiliary_log_probs

    def _check_selection_size(self, epoch: int, selected: list[int], scores: dict[str, np.ndarray]) -> None:
        """Stop the run if the rule kept fewer pairs than one batch per rank.

        An error, not a fallback to the previous selection: so small a selection means degenerate scores (NaN/inf,
        usually an fp16 overflow, or a collapsed distribution) or bands too narrow for the pool. Training on, with
        pairs the rule no longer picks, would hide that and record a selection the rule did not make.
        """
        args = self.trainer.args
        minimum = min_selection_size(args.per_device_train_batch_size, self.trainer.accelerator.num_processes)
        if len(selected) >= minimum:
            return
        nonfinite = {name: int((~np.isfinite(values)).sum()) for name, values in scores.items()}
        raise RuntimeError(
            f"Epoch {epoch}: selection_rule={args.selection_rule!r} kept {len(selected)} of {self.sampler.pool_size} "
            f"pairs, fewer than one batch per rank ({minimum}). Bands {args.percentile_bands()}; non-finite scores "
            f"(never kept) per score: {nonfinite}. If scores are non-finite, train in bf16/fp32 instead of fp16; "
            "otherwise widen the bands. The last checkpoint's weights can start a new run (`model=<checkpoint dir>`)."
        )

    # ----- log-prob passes (every rank) -----

    def pool_loader(self):
        if self._pool_loader is None:
            trainer = self.trainer
            self._pool_loader = build_pass_loader(
                trainer.train_dataset, trainer.data_collator, trainer.accelerator, trainer.scoring_batch_size
            )
        return self._pool_loader

    def _pool_subset(self, rows: list[int]):
        """The pool restricted to `rows` and a scoring loader over it (the cached whole-pool loader for all rows)."""
        trainer = self.trainer
        if len(rows) == self.sampler.pool_size:
            return trainer.train_dataset, self.pool_loader()
        subset = trainer.train_dataset.select(rows)
        return subset, build_pass_loader(
            subset, trainer.data_collator, trainer.accelerator, trainer.scoring_batch_size
        )

    def _recorded(self, kind: str, reuse_training: bool) -> tuple[PairLogProbs | None, list[int]]:
        """The training steps' records of `kind` if this call reuses them, and the rows still to score."""
        if reuse_training and kind in self._reusable_kinds():
            recorded = self.training_log_probs.gathered(kind, self.trainer.accelerator)
            return recorded, missing_rows(recorded)
        return None, list(range(self.sampler.pool_size))

    def _reusable_kinds(self) -> set[str]:
        reuse = self.trainer.args.scoring_reuse
        return {"none": set(), "reference": {REFERENCE}, "reference_and_policy": {REFERENCE, POLICY}}[reuse]

    def policy_log_probs(self, reuse_training: bool = False, metrics: dict[str, float] | None = None) -> PairLogProbs:
        """θ_t's pool log-probs: a pass over the pool, or over the pairs the last epoch did not train (`reuse_training`
        with `scoring_reuse="reference_and_policy"`, the others taken from their training steps)."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        recorded, rows = self._recorded(POLICY, reuse_training)

        def forward(batch):
            with trainer.accelerator.autocast():
                return sequence_log_probs(model, batch)

        fresh = None
        if rows:
            dataset, loader = self._pool_subset(rows)
            with inference_mode(model, trainer.args.gradient_checkpointing_kwargs):
                fresh = run_log_prob_pass(
                    loader, forward, trainer.accelerator, len(dataset), desc="Scoring pool with policy"
                )
            self.compute.add("policy_scoring", rows_tokens(self.token_counts("pool"), rows), FORWARD)
        if metrics is not None:
            metrics["selection/policy_rescored_fraction"] = len(rows) / self.sampler.pool_size
        if recorded is None:
            return fresh
        return fill_rows(recorded, rows, fresh) if fresh is not None else recorded

    def reference_log_probs(self, reuse_training: bool = False) -> PairLogProbs:
        """π_ref's pool log-probs, cached: read from TRL's precomputed columns, taken from the warm-up epochs' training
        steps (`reuse_training` with `scoring_reuse` other than `"none"`; a pass over the pairs they missed), or a
        pass over the pool."""
        if self._reference is None:
            trainer, pool = self.trainer, self.trainer.train_dataset
            if trainer.reads_precomputed_reference(pool):
                self._reference = trainer.reference_log_probs(pool, None)  # TRL's columns: no forward
            else:
                recorded, rows = self._recorded(REFERENCE, reuse_training)
                fresh = trainer.reference_log_probs(*self._pool_subset(rows)) if rows else None
                self.compute.add("reference", rows_tokens(self.token_counts("pool"), rows), FORWARD)
                self._reference = (
                    fresh if recorded is None else recorded if fresh is None else fill_rows(recorded, rows, fresh)
                )
            self.training_log_probs.clear(REFERENCE)
        return self._reference

    def validation_reference_log_probs(self) -> PairLogProbs:
        """π_ref's log-probs over the validation pairs: computed once and cached.

        With `precompute_ref_log_probs=True` they were computed before training began (the trainer adds the columns
        to the validation set as TRL does to `eval_dataset`): without a `ref_model`, π_ref is only available then.
        """
        if self._validation_reference is None:
            trainer = self.trainer
            self._validation_reference = trainer.reference_log_probs(
                self.validation_dataset,
                build_pass_loader(
                    self.validation_dataset, trainer.data_collator, trainer.accelerator, trainer.scoring_batch_size
                ),
            )
            # π_ref over the validation pairs, once: live here, or precomputed by the trainer for the selection
            self.compute.add("reference", self.token_counts("validation").sum(), FORWARD)
        return self._validation_reference

    def auxiliary(self) -> AuxiliaryModel:
        if self._auxiliary is None:
            trainer, args = self.trainer, self.trainer.args
            validation_reference = self.validation_reference_log_probs()
            self._auxiliary = AuxiliaryModel(
                policy=trainer.accelerator.unwrap_model(trainer.model),
                accelerator=trainer.accelerator,
                collator=trainer.data_collator,
                validation=self.validation_dataset,
                validation_reference=validation_reference,
                settings=AlignmentSettings(
                    beta=args.beta,
                    loss_type=args.loss_type[0],
                    learning_rate=args.aux_learning_rate or args.learning_rate,
                    weight_decay=args.weight_decay,
                    batch_size=args.aux_batch_size or args.per_device_train_batch_size,
                    num_epochs=args.aux_num_train_epochs,
                    max_steps=args.aux_max_steps,
                    max_grad_norm=args.max_grad_norm,
                    seed=args.seed,
                    mode=args.aux_mode,
                    lora_r=args.aux_lora_r,
                    lora_alpha=float(args.aux_lora_alpha),
                    lora_target_modules=(
                        "all-linear"
                        if args.aux_lora_target_modules is None
                        else (args.aux_lora_target_modules,)
                        if isinstance(args.aux_lora_target_modules, str)
                        else tuple(args.aux_lora_target_modules)
                    ),
                    deepspeed_config=(
                        trainer.accelerator.state.deepspeed_plugin.deepspeed_config
                        if trainer.is_deepspeed_enabled
                        else None
                    ),
                    # DeepSpeed's fp16 block brings its own loss scaler; the plain torch path needs one
                    loss_scaling=trainer.accelerator.mixed_precision == "fp16" and not trainer.is_deepspeed_enabled,
                ),
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
            # A resumed run continues the aux shuffle seeds (`seed + num_refreshes`) where the checkpoint left them.
            self._auxiliary.num_refreshes = self._restored_aux_num_refreshes
        return self._auxiliary

    # ----- checkpoint state -----

    def selection_state(
        self, global_step: int, pool: dict[str, Any], config: dict[str, Any]
    ) -> tuple[SelectionState, dict[str, torch.Tensor]]:
        """The selection as of `global_step`, and the cached log-probs, for `checkpoint.save_selection_state`."""
        if self._last_epoch_handled is None:
            raise RuntimeError("A checkpoint before the first epoch began has no selection to save.")
        state = SelectionState(
            global_step=global_step,
            epoch=self._last_epoch_handled,
            epoch_start_step=self._epoch_start_step,
            batches_in_epoch=len(self.sampler),
            selected_rows=self.sampler.rows,
            previous_selection=self._previous_selection,
            aux_num_refreshes=(
                self._auxiliary.num_refreshes if self._auxiliary is not None else self._restored_aux_num_refreshes
            ),
            pool=pool,
            config=config,
        )
        tensors = dict(self._checkpoint_training_log_probs)
        for name, log_probs in (("reference", self._reference), ("auxiliary", self._auxiliary_log_probs)):
            if log_probs is not None:
                tensors[f"{name}.chosen"], tensors[f"{name}.rejected"] = log_probs.chosen, log_probs.rejected
        return state, tensors

    def gather_for_checkpoint(self) -> None:
        """Combine the ranks' training-step records for the checkpoint `selection_state` writes. Every rank calls it.

        A resume restores them, so the next event reuses the same log-probs as the uninterrupted run and selects the
        same pairs.
        """
        self._checkpoint_training_log_probs = {}
        if self.trainer.args.scoring_reuse == "none":
            return
        for kind in (REFERENCE, POLICY):
            recorded = self.training_log_probs.gathered(kind, self.trainer.accelerator)
            if not bool(torch.isnan(recorded.chosen).all()):
                self._checkpoint_training_log_probs[f"training_{kind}.chosen"] = recorded.chosen
                self._checkpoint_training_log_probs[f"training_{kind}.rejected"] = recorded.rejected

    def start_from_full_pool(self) -> None:
        """Forget the previous training loop: the next epoch 0 trains, and records, the full pool again.

        The trainer calls this at the start of every training loop (each `train()`, and each retry of
        `auto_find_batch_size` after an out-of-memory error, which restarts the loop from step 0), before the Trainer
        sizes the run from the sampler's length: a sampler still holding the last selection would make `max_steps`
        too short, and a remembered epoch would skip the new loop's warm-up event. π_ref's cached log-probs stay (π_ref
        never changes); θ_aux's are dropped and its shuffle seeds restart, as in a new run. A resume then restores its
        checkpoint's selection over this.
        """
        self.sampler.set_selection(range(self.sampler.pool_size))
        self.sampler.set_epoch(0)
        self._previous_selection = None
        self._last_epoch_handled = None
        self._epoch_start_step = 0
        self._auxiliary_log_probs = None
        self._restored_aux_num_refreshes = 0
        if self._auxiliary is not None:
            self._auxiliary.num_refreshes = 0
        for kind in (REFERENCE, POLICY):
            self.training_log_probs.clear(kind)

    def restore_selection_state(self, state: SelectionState, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint: its selection, its cached log-probs, and no second event for its epoch."""
        self.sampler.set_selection(state.selected_rows)
        self.sampler.set_epoch(state.epoch)
        self._previous_selection = state.previous_selection
        self._last_epoch_handled = state.epoch
        self._epoch_start_step = state.epoch_start_step
        self._restored_aux_num_refreshes = state.aux_num_refreshes
        if self._auxiliary is not None:  # built by an earlier `train()` of this trainer
            self._auxiliary.num_refreshes = state.aux_num_refreshes
        if "reference.chosen" in tensors:
            self._reference = PairLogProbs(tensors["reference.chosen"], tensors["reference.rejected"])
        if "auxiliary.chosen" in tensors:
            self._auxiliary_log_probs = PairLogProbs(tensors["auxiliary.chosen"], tensors["auxiliary.rejected"])
        for kind in (REFERENCE, POLICY):
            if f"training_{kind}.chosen" in tensors:
                recorded = PairLogProbs(tensors[f"training_{kind}.chosen"], tensors[f"training_{kind}.rejected"])
                self.training_log_probs.restore(kind, recorded)

    # ----- side effects -----

    def _apply_selection(self, epoch: int, rows: list[int]) -> None:
        check_same_on_all_ranks(rows, self.trainer.accelerator, f"The selection for epoch {epoch}")
        self.sampler.set_selection(rows)
        self.sampler.set_epoch(epoch)  # the Trainer sets it again before iterating; set now for `trimmed_rows`
        self._previous_selection = rows

    def _trimmed_ids(self) -> list[Any]:
        """Selected pairs this epoch skips so that every rank trains as many pairs (< world size of them)."""
        return [self.pair_ids[row] for row in sorted(self.sampler.trimmed_rows())]

    def _retime_schedule(self, epoch: int, state: TrainerState, train_dataloader) -> None:
        """Move the run's horizon (`state.max_steps`, the progress bar) and the LR schedule's end to this selection.

        The later epochs are counted at this selection's length (`selective_horizon`); the next selection moves the
        horizon again, and the last one makes it exact, so transformers' `global_step >= max_steps` fires on the real
        last step (final save and evaluation) and never before it.
        """
        horizon = selective_horizon(
            state.global_step,
            epoch,
            state.num_train_epochs,
            len(train_dataloader),
            self.trainer.args.gradient_accumulation_steps,
        )
        self.trainer.set_horizon(horizon)
        scheduler = self.trainer.lr_scheduler
        if not isinstance(scheduler, RetimedLR):
            logger.warning(
                "The LR scheduler (%s) is not a trl_select RetimedLR, so its horizon stays that of the full pool and "
                "it will not reach its end.",
                type(scheduler).__name__,
            )
            return
        scheduler.retarget(state.global_step, horizon - state.global_step)

    def _publish(self, metrics: dict[str, float]) -> None:
        # Not `trainer.log`: DPOTrainer.log picks train/eval from `model.training` and clears its buffer. The buffer
        # is averaged and merged into the next train log, which every `report_to` backend receives.
        buffer = self.trainer._metrics["train"]
        for key, value in metrics.items():
            buffer[key] = [float(value)]

    def _report(self, event: SelectionEvent, state: TrainerState) -> None:
        for reporter in self.reporters:
            reporter(event, self.trainer.args, state)

    def _write_record(self, record: dict[str, Any]) -> None:
        if self.trainer.accelerator.is_main_process:
            self.history.append(record)
