"""The scoring engine: every score a selection event (or `trl-select score`) computes, with the inputs it needs.

`ScoringEngine` owns what the scores are computed from, on every rank:

- the pool's scoring loader and the tokens per pair of the pool and of the validation pairs;
- the log-prob caches: π_ref over the pool and over the validation pairs (computed once, or again after each TR-DPO
  sync of the reference: `reference_synced`), θ_aux over the pool (at each refresh), and the `TrainingLogProbs`
  recorder of the training steps' own log-probs (`scoring_reuse`); once π_ref's pool log-probs are cached, the
  training steps take theirs from the cache (`cached_reference`) instead of a forward (not with `sync_ref_model`);
- the auxiliary model θ_aux (docs/design.md §6), built on first use;
- the `ComputeLedger` of forward-token equivalents (§7.1).

`compute_scores(epoch, metrics, score_names, reuse_training)` computes the named scores, running only the passes the
scores declared (`registry.scorer_needs`). The selection callback calls it at each event and keeps the Trainer hooks,
the record and the checkpoint state; the CLI's `score` calls it directly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.logging import get_logger

from . import registry_builtins  # noqa: F401  (the built-in scorers, registered before any lookup)
from .auxiliary import AlignmentSettings, AuxiliaryModel
from .compute import FORWARD, TRAIN_STEP, ComputeLedger, pair_token_counts, rows_tokens
from .registry import ScoringContext, SelectionContext, run_scorer, scorer_needs
from .scores import CompletionLengths, PairLogProbs, completion_lengths
from .scoring import build_pass_loader, inference_mode, run_log_prob_pass, sequence_log_probs
from .training_log_probs import POLICY, REFERENCE, TrainingLogProbs, fill_rows, missing_rows


if TYPE_CHECKING:
    from .trainer import SelectiveDPOTrainer


logger = get_logger(__name__)  # logs on the main process only

# Which recorded kinds each `scoring_reuse` setting lets an event reuse.
REUSABLE_KINDS: dict[str, set[str]] = {
    "none": set(),
    "reference": {REFERENCE},
    "reference_and_policy": {REFERENCE, POLICY},
}


@contextlib.contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Store the seconds the `with` block took as `metrics[key]`."""
    start = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - start


def alignment_settings(trainer: SelectiveDPOTrainer) -> AlignmentSettings:
    """The aux stage's settings (docs/design.md §6) from the trainer's config and accelerator."""
    args, accelerator = trainer.args, trainer.accelerator
    if args.aux_lora_target_modules is None:
        target_modules = "all-linear"
    elif isinstance(args.aux_lora_target_modules, str):
        target_modules = (args.aux_lora_target_modules,)
    else:
        target_modules = tuple(args.aux_lora_target_modules)
    return AlignmentSettings(
        beta=args.beta,
        loss_type=args.loss_type[0],
        loss=args.preference_loss(),
        ld_alpha=args.ld_alpha,
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
        lora_target_modules=target_modules,
        deepspeed_config=(
            accelerator.state.deepspeed_plugin.deepspeed_config if trainer.is_deepspeed_enabled else None
        ),
        # DeepSpeed's fp16 block brings its own loss scaler; the plain torch path needs one
        loss_scaling=accelerator.mixed_precision == "fp16" and not trainer.is_deepspeed_enabled,
    )


class ScoringEngine:
    """Computes per-pair scores of the trainer's pool, caching the log-probs that do not change between events.

    Args:
        trainer ([`SelectiveDPOTrainer`]):
            The trainer whose model, reference, tokenized pool (`train_dataset`), collator, accelerator and config the
            passes use. Its `selection_sampler` gives the pool size and the batches the training steps record.
        validation_dataset ([`~datasets.Dataset`], *optional*, defaults to `None`):
            The tokenized validation pairs θ_aux aligns on (and influence reads). Required by scores that need
            `auxiliary` or `validation`.
    """

    def __init__(self, trainer: SelectiveDPOTrainer, validation_dataset=None) -> None:
        self.trainer = trainer
        self.validation_dataset = validation_dataset
        self.pair_ids: list[Any] = trainer.pair_ids
        self._pool_loader = None
        self._reference: PairLogProbs | None = None
        # π_ref's pool log-probs as a (pool, 2) fp32 tensor on the device (NaN where unknown), for the training steps,
        # and whether it holds every pair the steps train now (the whole pool, or the rows of `plan_training`)
        self._device_reference: torch.Tensor | None = None
        self._reference_complete = False
        self._plan_covered = False
        self._validation_reference: PairLogProbs | None = None
        self._auxiliary_log_probs: PairLogProbs | None = None
        self._auxiliary: AuxiliaryModel | None = None
        self._restored_aux_num_refreshes = 0
        # TR-DPO (`sync_ref_model`): how many times the reference was mixed toward the policy in this process. Every
        # π_ref value the caches hold is of the reference as it is now: each sync drops them (`reference_synced`).
        self.reference_syncs = 0
        # Cumulative FTE per category (`compute.py`), counted from the tokenized datasets' lengths: exact, global
        # (every rank counts the same), and without collectives or the scoring passes' padding duplicates.
        self.compute = ComputeLedger()
        self._token_counts: dict[str, np.ndarray] = {}
        self._completion_lengths: dict[str, CompletionLengths] = {}
        self._precompute_pass_counted = False
        # This epoch's training micro-batches by how π_ref's log-probs were had: a live forward or the cache
        self._reference_forwards = {"live": 0, "cached": 0}
        # The log-probs the training steps compute, kept for the next event (`scoring_reuse`).
        self.training_log_probs = TrainingLogProbs(
            self.pool_size,
            trainer.accelerator.device,
            ld_alpha=trainer.args.ld_alpha,
            use_weighting=bool(trainer.args.use_weighting),
        )
        self._checkpoint_training_log_probs: dict[str, torch.Tensor] = {}

    @property
    def sampler(self):
        return self.trainer.selection_sampler

    @property
    def pool_size(self) -> int:
        return len(self.pair_ids)

    @property
    def auxiliary_model(self) -> AuxiliaryModel | None:
        """θ_aux's builder if a refresh has built it, else `None` (it is built on first use)."""
        return self._auxiliary

    @property
    def aux_num_refreshes(self) -> int:
        """How many aux refreshes this run has made (the aux shuffle seeds continue from it after a resume)."""
        return self._auxiliary.num_refreshes if self._auxiliary is not None else self._restored_aux_num_refreshes

    def token_counts(self, split: str) -> np.ndarray:
        """Tokens per pair of the pool (`split="pool"`) or the validation pairs, as the collator builds them."""
        if split not in self._token_counts:
            dataset = self.trainer.train_dataset if split == "pool" else self.validation_dataset
            max_length = getattr(self.trainer.data_collator, "max_length", self.trainer.args.max_length)
            self._token_counts[split] = pair_token_counts(dataset, max_length)
        return self._token_counts[split]

    def completion_lengths(self, split: str) -> CompletionLengths:
        """Completion token counts of the pool (`split="pool"`) or the validation pairs, truncated as the collator
        truncates them (the losses `ipo`, `sigmoid_norm`, `sft` read them)."""
        key = f"completion_lengths/{split}"
        if key not in self._completion_lengths:
            dataset = self.trainer.train_dataset if split == "pool" else self.validation_dataset
            collator = self.trainer.data_collator
            self._completion_lengths[key] = completion_lengths(
                [len(ids) for ids in dataset["prompt_ids"]],
                [len(ids) for ids in dataset["chosen_ids"]],
                [len(ids) for ids in dataset["rejected_ids"]],
                getattr(collator, "max_length", self.trainer.args.max_length),
                getattr(collator, "truncation_mode", self.trainer.args.truncation_mode),
            )
        return self._completion_lengths[key]

    def selection_context(self, epoch: int, rows: list[int] | None = None) -> SelectionContext:
        """What a rule sees besides the scores (the same on every rank): the whole pool, or the chunk `rows`."""
        trainer = self.trainer
        if rows is None:
            return SelectionContext(
                epoch=epoch,
                seed=trainer.args.seed,
                pool_size=self.pool_size,
                pair_ids=self.pair_ids,
                args=trainer.args,
                dataset=trainer.train_dataset,
            )
        return SelectionContext(
            epoch=epoch,
            seed=trainer.args.seed,
            pool_size=len(rows),
            pair_ids=[self.pair_ids[row] for row in rows],
            args=trainer.args,
            dataset=trainer.train_dataset.select(rows),
        )

    # ----- scores -----

    def compute_scores(
        self,
        epoch: int,
        metrics: dict[str, float],
        score_names: tuple[str, ...] | None = None,
        reuse_training: bool = False,
        rows: list[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every score in `score_names` (default: those `selection_rule` needs), computing only the inputs they need.

        Timings and aux-stage figures go into `metrics` (`selection/seconds_*`, `selection/aux/*`). With
        `reuse_training` (a selection event), the pool log-probs the training steps recorded (`scoring_reuse`) stand
        in for the passes over the pairs they cover. With `rows` (an in-epoch event's chunk), only those pool rows are
        scored, θ_t afresh, π_ref from its cache where known, θ_aux realigned for them; the scores are in `rows` order.
        """
        args, trainer = self.trainer.args, self.trainer
        score_names = args.required_scores if score_names is None else score_names
        needs = scorer_needs(score_names)
        if rows is not None and needs & {"model", "validation"}:
            raise ValueError(
                f"Scores {list(score_names)} read the model over the whole pool; they cannot score a chunk."
            )
        inputs: dict[str, Any] = {}
        if needs & {"reference", "auxiliary"}:
            with timed(metrics, "selection/seconds_reference"):
                inputs["reference"] = self.reference_log_probs(reuse_training=reuse_training, rows=rows)
        if "policy" in needs:
            with timed(metrics, "selection/seconds_policy"):
                inputs["policy"] = self.policy_log_probs(reuse_training=reuse_training, metrics=metrics, rows=rows)
        if "auxiliary" in needs:
            inputs["auxiliary"] = self.auxiliary_log_probs(epoch, metrics, rows=rows)
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
        try:
            loss = args.preference_loss()
        except ValueError:  # a loss with no per-pair form (`aot`), which only rules that read no loss accept
            loss = None
        lengths = None
        if loss is not None and loss.needs_lengths:
            lengths = self.completion_lengths("pool")
            lengths = lengths if rows is None else lengths.select(rows)
            if "validation" in needs:
                inputs["validation_lengths"] = self.completion_lengths("validation")
        context = ScoringContext(
            pool_size=self.pool_size if rows is None else len(rows),
            beta=args.beta,
            loss_type=args.loss_type[0],
            loss=loss,
            lengths=lengths,
            ld_alpha=args.ld_alpha,
            selection=self.selection_context(epoch, rows),
            **inputs,
        )
        return {name: run_scorer(name, context) for name in score_names}

    # ----- log-prob passes (every rank) -----

    def pool_loader(self):
        """The scoring loader over the whole pool (length-sorted batches, sharded over ranks), built once."""
        if self._pool_loader is None:
            trainer = self.trainer
            self._pool_loader = build_pass_loader(
                trainer.train_dataset, trainer.data_collator, trainer.accelerator, trainer.scoring_batch_size
            )
        return self._pool_loader

    def _pool_subset(self, rows: list[int]):
        """The pool restricted to `rows` (results come back in `rows` order) and a scoring loader over it (the cached
        whole-pool loader for all rows in pool order)."""
        trainer = self.trainer
        if len(rows) == self.pool_size and all(row == index for index, row in enumerate(rows)):
            return trainer.train_dataset, self.pool_loader()
        subset = trainer.train_dataset.select(rows)
        return subset, build_pass_loader(
            subset, trainer.data_collator, trainer.accelerator, trainer.scoring_batch_size
        )

    def _pool_pass(
        self,
        kind: str,
        reuse_training: bool,
        category: str,
        run_pass: Callable[..., PairLogProbs],
        known: PairLogProbs | None = None,
        wanted: list[int] | None = None,
    ) -> tuple[PairLogProbs, int]:
        """`kind`'s pool log-probs (NaN where not computed) and how many rows were scored: `known` values and the
        training steps' records where this call reuses them (`scoring_reuse`), `run_pass(dataset, loader)` over the
        other rows of `wanted` (default: the whole pool), counted under `category`."""
        if reuse_training and kind in REUSABLE_KINDS[self.trainer.args.scoring_reuse]:
            recorded = self.training_log_probs.combined(kind, self.trainer.accelerator)
            if known is not None:
                unrecorded = missing_rows(recorded)
                recorded = fill_rows(recorded, unrecorded, known.take(unrecorded))
        else:
            recorded = known
        wanted_rows = list(range(self.pool_size)) if wanted is None else list(wanted)
        if recorded is None:
            rows = wanted_rows
            recorded = _nan_log_probs(
                self.pool_size, weighted=kind == POLICY and bool(self.trainer.args.use_weighting)
            )
        else:
            missing = set(missing_rows(recorded))
            rows = [row for row in wanted_rows if row in missing]
        fresh = run_pass(*self._pool_subset(rows)) if rows else None
        self.compute.add(category, rows_tokens(self.token_counts("pool"), rows), FORWARD)
        return fill_rows(recorded, rows, fresh), len(rows)

    def policy_log_probs(
        self, reuse_training: bool = False, metrics: dict[str, float] | None = None, rows: list[int] | None = None
    ) -> PairLogProbs:
        """θ_t's pool log-probs: a pass over the pool, or over the pairs the last epoch did not train (`reuse_training`
        with `scoring_reuse="reference_and_policy"`, the others taken from their training steps); with `rows`, a pass
        over those rows only, in `rows` order."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)

        def forward(batch):
            with trainer.accelerator.autocast():
                # LD-weighted sums and, with WPO, θ_t's own per-pair weight: what TRL's loss reads of this forward
                return sequence_log_probs(model, batch, trainer.args.ld_alpha, bool(trainer.args.use_weighting))

        def run_pass(dataset, loader) -> PairLogProbs:
            with inference_mode(model, trainer.args.gradient_checkpointing_kwargs):
                return run_log_prob_pass(
                    loader, forward, trainer.accelerator, len(dataset), desc="Scoring pool with policy"
                )

        if rows is not None:
            log_probs, num_scored = self._pool_pass(POLICY, False, "policy_scoring", run_pass, wanted=rows)
            if metrics is not None:
                metrics["selection/policy_rescored_fraction"] = num_scored / self.pool_size
            return log_probs.take(rows)
        log_probs, num_scored = self._pool_pass(POLICY, reuse_training, "policy_scoring", run_pass)
        if metrics is not None:
            metrics["selection/policy_rescored_fraction"] = num_scored / self.pool_size
        return log_probs

    def reference_log_probs(self, reuse_training: bool = False, rows: list[int] | None = None) -> PairLogProbs:
        """π_ref's pool log-probs (with `rows`, those rows' in `rows` order), cached: read from TRL's precomputed
        columns, taken from the training steps that recorded them (`reuse_training` with `scoring_reuse` other than
        `"none"`), or computed by a pass over the rows still missing. The cache fills as events need rows, so an
        in-epoch event never runs π_ref over pairs it does not score."""
        trainer, pool = self.trainer, self.trainer.train_dataset
        if self._reference is None and trainer.reads_precomputed_reference(pool):
            self._set_reference(trainer.reference_log_probs(pool, None))  # TRL's columns: no forward
        wanted = list(range(self.pool_size)) if rows is None else rows
        if self._reference is None or missing_rows(self._reference.take(wanted)):
            self._set_reference(
                self._pool_pass(
                    REFERENCE, reuse_training, "reference", trainer.reference_log_probs, self._reference, wanted
                )[0]
            )
            if rows is None:
                self.training_log_probs.clear(REFERENCE)
        return self._reference if rows is None else self._reference.take(rows)

    def _set_reference(self, log_probs: PairLogProbs | None) -> None:
        self._reference = log_probs
        self._device_reference, self._reference_complete, self._plan_covered = None, False, False
        if log_probs is not None:
            stacked = torch.stack([log_probs.chosen, log_probs.rejected], dim=1).float()
            self._device_reference = stacked.to(self.trainer.accelerator.device)
            self._reference_complete = bool(torch.isfinite(stacked).all())

    def plan_training(self, rows: Sequence[int]) -> None:
        """Say which pool rows, over all ranks, the training steps train until the next call (an epoch's selection, an
        in-epoch segment): `cached_reference` serves them if the cache holds every one.

        The answer depends on the cache and on these rows only, both the same on every rank, never on the rank's own
        batch: every rank skips the same reference forwards, which under ZeRO-3 (and DDP's forward) are collectives.
        """
        rows = list(rows)
        self._plan_covered = self._reference is not None and not missing_rows(self._reference.take(rows))

    def cached_reference(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """π_ref's cached log-probs `(chosen, rejected)` of the pool rows `rows` (a training micro-batch's, within
        the planned rows), fp32 on `rows`' device; `None` unless the cache holds the whole pool or every planned row.
        The same answer on every rank, whatever its rows."""
        if self._device_reference is None or not (self._reference_complete or self._plan_covered):
            return None
        values = self._device_reference[rows.to(self._device_reference.device)].to(rows.device)
        return values[:, 0], values[:, 1]

    def validation_reference_log_probs(self) -> PairLogProbs:
        """π_ref's log-probs over the validation pairs: computed once and cached (again after a TR-DPO sync).

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
        """θ_aux's builder (docs/design.md §6), built on first use, aligning against π_ref's validation log-probs as the
        reference is now (a TR-DPO sync since the last call drops them: `reference_synced`)."""
        if self._auxiliary is None:
            trainer = self.trainer
            self._auxiliary = AuxiliaryModel(
                policy=trainer.accelerator.unwrap_model(trainer.model),
                accelerator=trainer.accelerator,
                collator=trainer.data_collator,
                validation=self.validation_dataset,
                validation_reference=self.validation_reference_log_probs(),
                settings=alignment_settings(trainer),
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
                validation_lengths=self.completion_lengths("validation"),
            )
            # A resumed run continues the aux shuffle seeds (`seed + num_refreshes`) where the checkpoint left them.
            self._auxiliary.num_refreshes = self._restored_aux_num_refreshes
        else:
            self._auxiliary.validation_reference = self.validation_reference_log_probs()
        return self._auxiliary

    def auxiliary_log_probs(
        self, epoch: int, metrics: dict[str, float], rows: list[int] | None = None
    ) -> PairLogProbs:
        """θ_aux's pool log-probs: rebuilt and realigned when due (`aux_refresh_epochs`), else the cached ones. With
        `rows` (an in-epoch event), realigned and run over those rows only, in `rows` order, and not cached."""
        args = self.trainer.args
        if rows is not None:
            subset, loader = self._pool_subset(rows)
            with timed(metrics, "selection/seconds_aux"):
                result = self.auxiliary().refresh(loader, len(subset))
            self._count_refresh(epoch, metrics, result, rows)
            return result.pool_log_probs
        if self._auxiliary_log_probs is None or (epoch - args.selection_warmup_epochs) % args.aux_refresh_epochs == 0:
            with timed(metrics, "selection/seconds_aux"):
                result = self.auxiliary().refresh(self.pool_loader(), self.pool_size)
            self._auxiliary_log_probs = result.pool_log_probs
            self._count_refresh(epoch, metrics, result, list(range(self.pool_size)))
        return self._auxiliary_log_probs

    def _count_refresh(self, epoch: int, metrics: dict[str, float], result, rows: list[int]) -> None:
        """An aux refresh's metrics and compute: its alignment steps, the validation losses, its pass over `rows`."""
        metrics["selection/aux/refreshed"] = 1.0
        metrics["selection/aux/val_loss_before"] = result.validation_loss_before
        metrics["selection/aux/val_loss_after"] = result.validation_loss_after
        metrics["selection/aux/steps"] = float(result.num_steps)
        metrics["selection/aux/skipped_steps"] = float(result.skipped_steps)
        validation_tokens = self.token_counts("validation")
        self.compute.add("aux_alignment", rows_tokens(validation_tokens, result.alignment_rows), TRAIN_STEP)
        self.compute.add("aux_validation", 2 * validation_tokens.sum(), FORWARD)  # the losses before and after
        self.compute.add("aux_pool", rows_tokens(self.token_counts("pool"), rows), FORWARD)
        logger.info(
            "Aux model refreshed at epoch %d: validation loss %.4f -> %.4f in %d steps",
            epoch,
            result.validation_loss_before,
            result.validation_loss_after,
            result.num_steps,
        )

    # ----- the training steps' log-probs and compute -----

    def count_precompute_pass(self) -> None:
        """Count TRL's precompute pass (π_ref over the pool, before training) once, as training compute."""
        if self.trainer.args.precompute_ref_log_probs and not self._precompute_pass_counted:
            self.compute.add("train", self.token_counts("pool").sum(), FORWARD)
            self._precompute_pass_counted = True

    def note_reference_forward(self, live: bool) -> None:
        """Note how a training micro-batch had π_ref's log-probs: a `live` forward, or the cache (`count_training`)."""
        self._reference_forwards["live" if live else "cached"] += 1

    def count_training(self, micro_batches: int) -> None:
        """Count an epoch's first `micro_batches` training micro-batches: 3 FTE per token for the policy's forward and
        backward, plus 1 for π_ref's forward inside the step unless precomputed or taken from the cache.

        The rows are the sampler's (every rank's, without a collective); whether the steps ran π_ref is what
        `note_reference_forward` noted since the last call. That is decided alike on every rank and stays the same
        between two calls (an epoch, or a segment of the in-epoch strategy: the cache changes only at events, the
        models' dropout not at all), so the share of live micro-batches is 0 or 1.
        """
        tokens = rows_tokens(self.token_counts("pool"), self.sampler.trained_rows(micro_batches))
        self.compute.add("train", tokens, TRAIN_STEP)
        live, cached = self._reference_forwards["live"], self._reference_forwards["cached"]
        self._reference_forwards = {"live": 0, "cached": 0}
        if not self.trainer.args.precompute_ref_log_probs:
            # An epoch whose steps were not noted (counted without running them) ran TRL's live reference forward
            self.compute.add("train", tokens * (live / (live + cached) if live + cached else 1.0), FORWARD)

    def reused_kinds(self, epoch: int, num_train_epochs: float) -> set[str]:
        """Which log-probs epoch `epoch`'s training steps record for a later event (`scoring_reuse`).

        π_ref's during the warm-up epochs, until the reference is cached (not when TRL precomputed them: those are
        read from the dataset's columns); θ's in every epoch that a selection event follows.
        """
        args = self.trainer.args
        needs = scorer_needs(args.required_scores)
        reusable = REUSABLE_KINDS[args.scoring_reuse]
        kinds = set()
        if (
            REFERENCE in reusable
            and needs & {"reference", "auxiliary"}
            and not args.precompute_ref_log_probs
            and epoch < args.selection_warmup_epochs
            and self._reference is None
        ):
            kinds.add(REFERENCE)
        if POLICY in reusable and "policy" in needs and epoch + 1 < num_train_epochs:
            kinds.add(POLICY)
        return kinds

    def record_training_log_probs(self, epoch: int, num_train_epochs: float) -> None:
        """Record the log-probs of epoch `epoch`'s training steps (each at its pairs' pool rows), whose pairs are the
        sampler's selection."""
        self.training_log_probs.begin_epoch(self.reused_kinds(epoch, num_train_epochs))
        self.plan_training(self.sampler.rows)

    # ----- a moving reference (TR-DPO) -----

    def reference_synced(self) -> None:
        """TRL's `SyncRefModelCallback` has just mixed π_ref toward the policy (`sync_ref_model`): forget every π_ref
        log-prob computed before, so the next event (and the aux stage) reads the reference the trainer trains against.

        Dropped: the pool cache (and the copy the training steps could read), the validation cache the aux stage aligns
        against, and the training steps' records of π_ref (recorded before this sync, so of the old reference; the
        steps after it record the new one). Kept: θ_aux's pool log-probs (θ_aux is a model of its own) and θ's
        records. Called at the end of every optimizer step where TRL syncs, on every rank alike (a function of
        `global_step` only): no collective.
        """
        self.reference_syncs += 1
        self._set_reference(None)
        self._validation_reference = None
        self.training_log_probs.clear(REFERENCE)

    # ----- checkpoint state -----

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The cached log-probs a checkpoint keeps: π_ref's (not with `sync_ref_model`), θ_aux's and the training
        steps' records."""
        tensors = dict(self._checkpoint_training_log_probs)
        for name, log_probs in (("reference", self._reference), ("auxiliary", self._auxiliary_log_probs)):
            if name == "reference" and self.trainer.args.sync_ref_model:
                continue  # `restore` drops them: the resumed run's reference is not the one they were computed with
            if log_probs is not None:
                # θ_aux's WPO log-weight (`auxiliary.log_weight`) too: its loss is evaluated at the next events
                tensors.update({f"{name}.{field}": value for field, value in log_probs.fields().items()})
        return tensors

    def gather_for_checkpoint(self) -> None:
        """Combine the ranks' training-step records for the checkpoint `checkpoint_tensors` writes. Every rank calls
        it."""
        self._checkpoint_training_log_probs = {}
        if self.trainer.args.scoring_reuse == "none":
            return
        for kind in (REFERENCE, POLICY):
            if kind == REFERENCE and self.trainer.args.sync_ref_model:
                continue  # `restore` drops them (see `checkpoint_tensors`)
            recorded = self.training_log_probs.combined(kind, self.trainer.accelerator)
            if not bool(torch.isnan(recorded.chosen).all()):
                for field, value in recorded.fields().items():  # θ's WPO log-weight too
                    self._checkpoint_training_log_probs[f"training_{kind}.{field}"] = value

    def start_new_loop(self) -> None:
        """Forget the previous training loop: θ_aux's log-probs are dropped and its shuffle seeds restart, the
        training-step records are cleared; π_ref's cached log-probs stay (they are of π_ref as it is now: fixed, or
        with `sync_ref_model` as last synced, the cache dropped at every sync)."""
        self._auxiliary_log_probs = None
        self._restored_aux_num_refreshes = 0
        if self._auxiliary is not None:
            self._auxiliary.num_refreshes = 0
        for kind in (REFERENCE, POLICY):
            self.training_log_probs.clear(kind)

    def restore(self, tensors: dict[str, torch.Tensor], aux_num_refreshes: int) -> None:
        """Continue from a checkpoint's cached log-probs and aux refresh count.

        With `sync_ref_model`, no π_ref value is restored (the checkpoint holds none): TRL does not save the synced
        reference in checkpoints, so the resumed run trains against the `ref_model` it holds, not the one the
        checkpointed run had; π_ref values this process cached are of the reference it holds, and stay.
        """
        self._restored_aux_num_refreshes = aux_num_refreshes
        if self._auxiliary is not None:  # built by an earlier `train()` of this trainer
            self._auxiliary.num_refreshes = aux_num_refreshes
        if self.trainer.args.sync_ref_model:
            tensors = {
                name: value
                for name, value in tensors.items()
                if not name.startswith(("reference.", f"training_{REFERENCE}."))
            }
        if "reference.chosen" in tensors:
            self._set_reference(_restored(tensors, "reference"))
        if "auxiliary.chosen" in tensors:
            self._auxiliary_log_probs = _restored(tensors, "auxiliary")
        for kind in (REFERENCE, POLICY):
            if f"training_{kind}.chosen" in tensors:
                recorded = _restored(tensors, f"training_{kind}")
                # on one rank only: the combine then gives each value back exactly
                self.training_log_probs.restore(kind, recorded, keep=self.trainer.accelerator.is_main_process)

    def forget_cached_log_probs(self) -> None:
        """Drop every cached pool and validation log-prob, so the next `compute_scores` runs every pass again (for
        timing a cold event)."""
        self._set_reference(None)
        self._validation_reference = self._auxiliary_log_probs = None


def _nan_log_probs(size: int, weighted: bool = False) -> PairLogProbs:
    """All-NaN log-probs of `size` rows; `weighted`: with a (NaN) WPO log-weight too."""

    def nan() -> torch.Tensor:
        return torch.full((size,), float("nan"), dtype=torch.float32)

    return PairLogProbs(chosen=nan(), rejected=nan(), log_weight=nan() if weighted else None)


def _restored(tensors: dict[str, torch.Tensor], name: str) -> PairLogProbs:
    """The log-probs a checkpoint saved under `name` (`{name}.chosen`, `.rejected`, `.log_weight` if WPO)."""
    return PairLogProbs(tensors[f"{name}.chosen"], tensors[f"{name}.rejected"], tensors.get(f"{name}.log_weight"))


__all__ = ["REUSABLE_KINDS", "ScoringEngine", "alignment_settings", "timed"]
