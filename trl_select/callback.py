"""One selection event end to end: score the pool (through the `ScoringEngine`), apply the rule, hand the next epoch
its pairs, record it all."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .checkpoint import SelectionState
from .engine import ScoringEngine
from .event import EVENT_LOGGER, Reporter, SelectionEvent
from .history import SelectionHistory
from .registry import SelectionContext, apply_rule
from .rules import jaccard, score_quantiles
from .schedule import RetimedLR, selective_horizon
from .scoring import check_same_on_all_ranks
from .segments import (
    chunk_size,
    estimated_steps,
    expected_keep_fraction,
    next_event_step,
    split_kept,
)
from .training_log_probs import POLICY, REFERENCE
from .validation import FRACTION_RULES, min_selection_size


if TYPE_CHECKING:
    from .trainer import SelectiveDPOTrainer


logger = get_logger(__name__)  # logs on the main process only
# One line per selection event, at INFO, on a logger of its own that the trainer makes visible by default
# (`trainer.show_selection_events`); silence it with `logging.getLogger("trl_select.events").setLevel("WARNING")`.
event_logger = logging.getLogger(EVENT_LOGGER)  # plain: the line is logged by the main process only


def score_metrics(scores: dict[str, np.ndarray], bands: dict) -> dict[str, float]:
    """`selection/<score>/band_lo|band_hi` and the quantiles of each score, for an event's metrics."""
    metrics: dict[str, float] = {}
    for name, band in bands.items():
        metrics[f"selection/{name}/band_lo"] = band.lo
        metrics[f"selection/{name}/band_hi"] = band.hi
        if band.evidence:  # a band chosen from evidence (`lossdiff_irm_auto`): the chosen cuts and why
            metrics[f"selection/{name}/band_lo_percentile"] = band.lo_percentile
            metrics[f"selection/{name}/band_hi_percentile"] = band.hi_percentile
            for key, value in band.evidence.items():
                metrics[f"selection/{name}/evidence/{key}"] = value
    for name, values in scores.items():
        for key, value in score_quantiles(values).items():
            metrics[f"selection/{name}/{key}"] = value
    return metrics


def band_record(bands: dict) -> dict[str, dict]:
    """The bands of an event as its history record keeps them: limits (`thresholds`) and `percentiles`."""
    record = {
        "thresholds": {name: {"lo": band.lo, "hi": band.hi} for name, band in bands.items()},
        "percentiles": {name: {"lo": band.lo_percentile, "hi": band.hi_percentile} for name, band in bands.items()},
    }
    evidence = {name: dict(band.evidence) for name, band in bands.items() if band.evidence}
    return record | ({"band_evidence": evidence} if evidence else {})


class SelectionOutOfMemoryError(RuntimeError):
    """A selection event ran out of accelerator memory. Not an out-of-memory error in accelerate's eyes, on purpose.

    `auto_find_batch_size` retries the whole training loop on any out-of-memory error raised inside it, from step 0
    and at a smaller *training* batch, on the weights trained so far, and the event would rerun with the same
    scoring and aux batch sizes: silent over-training, then "No executable batch size found". So an event's OOM stops
    the run instead, naming the two batch sizes an event uses.
    """


def _is_out_of_memory(error: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


@contextlib.contextmanager
def event_memory_guard(where: str, scoring_batch_size: int, aux_batch_size: int) -> Iterator[None]:
    """Turn an out-of-memory error inside a selection event into a `SelectionOutOfMemoryError` naming the fix.

    On several ranks the rank that ran out stops here; the others wait in the pass's next collective until
    `ddp_timeout` and then stop too (the launcher ends the job): no rank trains on.
    """
    try:
        yield
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        raise SelectionOutOfMemoryError(
            f"The selection event at {where} ran out of accelerator memory (the error above). An event runs no-grad "
            f"passes over the pool in batches of `scoring_batch_size`={scoring_batch_size} per device and aligns the "
            f"aux model in batches of `aux_batch_size`={aux_batch_size}: lower them (`--scoring_batch_size "
            f"{max(1, scoring_batch_size // 2)}`, `--aux_batch_size {max(1, aux_batch_size // 2)}`) and resume from "
            "the last checkpoint. It is not retried by `auto_find_batch_size`: a retry would restart training from "
            "step 0 on the weights already trained."
        ) from error


class SelectionCallback(TrainerCallback):
    """Runs a selection event at the start of every epoch from `selection_warmup_epochs` on.

    The event, on every rank: the scoring `engine` scores the whole pool with θ_t (and π_ref once, cached; θ_aux at
    each refresh, cached) and the rule turns the scores into a keep-mask; then the callback replaces the sampler's
    selection (the epoch's iterator is created after this hook, so the new selection applies to this very epoch) and
    moves the run's horizon (`state.max_steps`) and the LR schedule's end to the new epoch length.
    The main process appends the event to `selection_history.jsonl`. Metrics under `selection/` go to
    `trainer.log_selection_metrics`, so the next log carries them to every `report_to` backend.

    Warm-up epochs are recorded too, as events that keep the full pool.

    `reporters` are called on every rank with each `SelectionEvent`, after the sampler is updated; a reporter that
    writes files or talks to a tracker checks `state.is_world_process_zero` itself. Add your own with
    `SelectiveDPOTrainer(..., selection_reporters=[...])`.

    The callback keeps the Trainer hooks, the event's record and the selection's checkpoint state; the scores, their
    log-prob caches and the compute ledger belong to the engine.

    Args:
        trainer ([`SelectiveDPOTrainer`]):
            The trainer whose sampler, horizon and LR schedule each event updates.
        engine ([`ScoringEngine`]):
            Computes each event's scores (`ScoringEngine.compute_scores`).
    """

    def __init__(self, trainer: SelectiveDPOTrainer, engine: ScoringEngine) -> None:
        self.trainer = trainer
        self.engine = engine
        self.history = SelectionHistory(trainer.args.output_dir)
        self.pair_ids: list[Any] = engine.pair_ids
        self._previous_selection: list[int] | None = None
        self._last_epoch_handled: int | None = None
        self._epoch_start_step = 0
        self.reporters: list[Reporter] = []
        # The "steps" strategy (`segments.py`): its schedule, set by the trainer at the start of every training loop,
        # and the state of the pass (epoch) under way.
        self.strategy = "epoch"
        self.warmup_steps = 0
        self.interval = 1
        self.fixed_horizon: int | None = None  # `max_steps`, when the run has a step budget
        self._consumed: np.ndarray | None = None  # rows of the pass trained, dropped or left out
        self._segment_start_step = 0
        self._segment_counted = True
        self._keep_estimate = 1.0
        self._resumed_pass = False

    def configure(self, strategy: str, warmup_steps: int, interval: int, fixed_horizon: int | None) -> None:
        """The event schedule of the next training loop: `"epoch"`, or `"steps"` with its first event at optimizer
        step `warmup_steps` and then every `interval` steps; `fixed_horizon` is `max_steps` if the run has one."""
        self.strategy = strategy
        self.warmup_steps = warmup_steps
        self.interval = interval
        self.fixed_horizon = fixed_horizon
        args = self.trainer.args
        fraction = args.selection_fraction if args.selection_rule in FRACTION_RULES else None
        self._keep_estimate = expected_keep_fraction(args.percentile_bands(), fraction)

    # ----- hooks -----

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.global_step == 0 and self.trainer.accelerator.is_main_process:
            self.history.reset()
        # TRL's precompute pass (π_ref over the pool, before training) is part of training compute, as in a plain run
        self.engine.count_precompute_pass()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.strategy == "steps":
            self._finish_segment(state)
            return
        # The micro-batches this epoch ran (all of them, or fewer when `max_steps` stopped it).
        self.engine.count_training((state.global_step - self._epoch_start_step) * args.gradient_accumulation_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if getattr(args, "sync_ref_model", False) and state.global_step % args.ref_model_sync_steps == 0:
            # TR-DPO: TRL's `SyncRefModelCallback` mixes π_ref toward θ at the end of this step (TRL's own condition).
            # Its callback runs before this one, but the order does not matter: no forward runs between the two, and
            # every event and training step after this one reads π_ref afresh.
            self.engine.reference_synced()
        if self.strategy == "steps" and self._consumed is not None:
            # The Trainer's `epoch + step / steps_in_epoch` assumes full-pool epochs: an epoch here is a pass, and it
            # is as far as the pairs it has trained or dropped.
            state.epoch = self._last_epoch_handled + float(self._consumed.mean())

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.engine.training_log_probs.stop()
        logger.info(self.engine.compute.summary())

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, train_dataloader=None, **kwargs
    ) -> None:
        if self.strategy == "steps":
            self._begin_pass(args, state)
            return
        epoch = math.floor(state.epoch + 1e-6)
        if epoch == self._last_epoch_handled:
            # Resumed mid-epoch: the Trainer skips the micro-batches the checkpoint had trained.
            self.engine.record_training_log_probs(epoch, state.num_train_epochs)
            return
        self._last_epoch_handled = epoch
        self._epoch_start_step = state.global_step
        if epoch < args.selection_warmup_epochs:
            self._record_warmup(epoch, state)
        else:
            self._select(epoch, state, train_dataloader)
        self.engine.training_log_probs.clear(POLICY)  # the event has used the previous epoch's
        self.engine.record_training_log_probs(epoch, state.num_train_epochs)

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

    def _select(self, epoch: int, state: TrainerState, train_dataloader) -> None:
        args = self.trainer.args
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        with self._memory_guard(f"epoch {epoch}"):
            scores = self.engine.compute_scores(epoch, metrics, reuse_training=True)
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
                **self.engine.compute.as_metrics(),
            }
        )
        metrics.update(score_metrics(scores, bands))
        self.publish_metrics(metrics)
        self._log_event(
            "trl-select: epoch %d selection kept %d/%d (%.1f%%), %s, churn %.3f, %.1fs, selection %.1f%% of compute",
            epoch,
            len(selected),
            pool_size,
            100 * len(selected) / pool_size,
            ", ".join(f"{name} in [{band.lo:.4g}, {band.hi:.4g}]" for name, band in bands.items()),
            1.0 - similarity,
            elapsed,
            100 * self.engine.compute.share,
        )
        self._write_record(
            {
                "epoch": epoch,
                "event": "selection",
                "global_step": state.global_step,
                "pool_size": pool_size,
                "num_selected": len(selected),
                "rule": args.selection_rule,
                **band_record(bands),
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

    def _memory_guard(self, where: str) -> contextlib.AbstractContextManager:
        args = self.trainer.args
        return event_memory_guard(
            where, self.trainer.scoring_batch_size, args.aux_batch_size or args.per_device_train_batch_size
        )

    def selection_context(self, epoch: int) -> SelectionContext:
        """What the rule sees besides the scores (the same on every rank)."""
        return self.engine.selection_context(epoch)

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

    # ----- in-epoch events (`selection_strategy="steps"`, docs/design.md §5.1) -----

    def next_segment(self, state: TrainerState) -> bool:
        """Choose the next segment of the pass: its pairs go to the sampler. `False` when the pass has none left.

        Runs on every rank when the Trainer asks for the first batch of a new optimizer step after a segment ended
        (`sampler.SegmentedLoader`): a warm-up segment before `warmup_steps`, else a selection event over the next
        chunk of the pass. Every rank takes the same decisions from the same numbers, so all run the same passes.
        """
        self._finish_segment(state)
        accumulation = self.trainer.args.gradient_accumulation_steps
        remaining = self._remaining()
        end = next_event_step(state.global_step, self.warmup_steps, self.interval)
        if self.fixed_horizon is not None:
            end = min(end, self.fixed_horizon)
        needed = max(end - state.global_step, 1) * self._pairs_per_step
        if len(remaining) == 0:
            return False
        if state.global_step < self.warmup_steps:
            trained = self.sampler.set_segment(remaining[:needed].tolist(), accumulation)
            left_out = remaining[len(trained) : needed].tolist()
            self._start_segment(state, trained, left_out)
            self._record_segment(state, "warmup", trained, left_out)
            self._record_warmup_reference(state)
            return bool(trained)
        self.engine.training_log_probs.begin_epoch(set())
        return self._segment_event(state, remaining, needed)

    @property
    def _pairs_per_step(self) -> int:
        """Pairs one optimizer step trains over all ranks."""
        accumulation = self.trainer.args.gradient_accumulation_steps
        return accumulation * self.sampler.max_batch_size * self.sampler.world_size

    def _record_warmup_reference(self, state: TrainerState) -> None:
        """Record π_ref of the pairs the warm-up steps train, for the events that will score them (`scoring_reuse`)."""
        self.engine.training_log_probs.begin_epoch(self.engine.reused_kinds(0, state.num_train_epochs) & {REFERENCE})

    def _begin_pass(self, args: TrainingArguments, state: TrainerState) -> None:
        """A new pass (the Trainer's epoch), or the resumed one going on where its checkpoint stopped."""
        if self._resumed_pass:
            self._resumed_pass = False
            if state.global_step < self.warmup_steps:
                self._record_warmup_reference(state)
            return
        # Its segments are chosen as the Trainer asks for batches (`next_segment`).
        self._last_epoch_handled = 0 if self._last_epoch_handled is None else self._last_epoch_handled + 1
        self._epoch_start_step = state.global_step
        self._consumed = np.zeros(self.sampler.pool_size, dtype=bool)
        self.sampler.set_segment([], args.gradient_accumulation_steps)
        self._segment_start_step, self._segment_counted = state.global_step, True

    def _remaining(self) -> np.ndarray:
        """The pairs of the pass neither trained, dropped nor left out yet, in pass order."""
        order = self.sampler.pass_order(self._last_epoch_handled)
        return order[~self._consumed[order]]

    def _segment_event(self, state: TrainerState, remaining: np.ndarray, needed: int) -> bool:
        args = self.trainer.args
        epoch = self._last_epoch_handled
        start = time.perf_counter()
        chunk = remaining[: chunk_size(needed, self._keep_estimate, len(remaining))].tolist()
        metrics: dict[str, float] = {}
        with self._memory_guard(f"step {state.global_step}"):
            scores = self.engine.compute_scores(epoch, metrics, reuse_training=True, rows=chunk)
        keep, bands = apply_rule(args.selection_rule, scores, self.engine.selection_context(epoch, chunk))
        check_same_on_all_ranks(
            np.flatnonzero(keep).tolist(), self.trainer.accelerator, f"The selection at step {state.global_step}"
        )
        segment, surplus, dropped = split_kept(chunk, keep, needed)
        trained = self.sampler.set_segment(segment, args.gradient_accumulation_steps)
        left_out = segment[len(trained) :]
        whole_rest = len(chunk) == len(remaining)
        if not trained and not whole_rest:
            self._check_selection_size(epoch, trained, scores)
        self._consumed[np.asarray(dropped + segment, dtype=np.int64)] = True
        if int(keep.sum()) and not whole_rest:
            self._keep_estimate = float(keep.mean())
        if not trained:
            return False
        self._start_segment(state, trained, left_out)
        elapsed = time.perf_counter() - start
        in_segment = np.isin(np.asarray(chunk), np.asarray(trained))
        metrics.update(
            {
                "selection/epoch": float(epoch),
                "selection/pool_size": float(self.sampler.pool_size),
                "selection/num_scored": float(len(chunk)),
                "selection/num_selected": float(len(trained)),
                "selection/kept_fraction": float(keep.mean()),
                "selection/seconds": elapsed,
                **self.engine.compute.as_metrics(),
            }
        )
        metrics.update(score_metrics(scores, bands))
        self.publish_metrics(metrics)
        self._log_event(
            "trl-select: step %d (epoch %d) selection scored %d pairs, kept %d (%.1f%%), %d trained until step %d, %s, "
            "%.1fs, selection %.1f%% of compute",
            state.global_step,
            epoch,
            len(chunk),
            int(keep.sum()),
            100 * float(keep.mean()),
            len(trained),
            state.global_step + len(self.sampler) // self.trainer.args.gradient_accumulation_steps,
            ", ".join(f"{name} in [{band.lo:.4g}, {band.hi:.4g}]" for name, band in bands.items()),
            elapsed,
            100 * self.engine.compute.share,
        )
        self._record_segment(
            state,
            "selection",
            trained,
            left_out,
            {
                "num_scored": len(chunk),
                "num_kept": int(keep.sum()),
                "surplus_ids": [self.pair_ids[row] for row in surplus],
                **band_record(bands),
                "aux_refreshed": "selection/aux/refreshed" in metrics,
            },
        )
        self._report(
            SelectionEvent(
                epoch=epoch,
                global_step=state.global_step,
                kind="selection",
                rule=args.selection_rule,
                pair_ids=[self.pair_ids[row] for row in chunk],
                keep=in_segment,
                scores=scores,
                bands=bands,
                metrics=metrics,
                aux_refreshed="selection/aux/refreshed" in metrics,
                rows=np.asarray(chunk, dtype=np.int64),
            ),
            state,
        )
        return True

    def _start_segment(self, state: TrainerState, trained: list[int], left_out: list[int]) -> None:
        """Mark the segment's pairs consumed, and move the horizon and the LR to what the pass and the run have left."""
        self._consumed[np.asarray(trained + left_out, dtype=np.int64)] = True
        self._segment_start_step, self._segment_counted = state.global_step, False
        self.engine.plan_training(trained)  # the steps take π_ref from the cache if it holds all these pairs
        self._previous_selection = trained
        if self.fixed_horizon is not None:
            return
        args = self.trainer.args
        pairs_per_step = self._pairs_per_step
        segment_end = state.global_step + len(self.sampler) // args.gradient_accumulation_steps
        # Pairs of the run's `num_train_epochs` passes not consumed yet: this pass's rest and the later passes.
        budget = (args.num_train_epochs - self._last_epoch_handled) * self.sampler.pool_size - self._consumed.sum()
        warmup_left = max(0, self.warmup_steps - segment_end)
        budget -= warmup_left * pairs_per_step
        horizon = segment_end + warmup_left + estimated_steps(max(budget, 0), self._keep_estimate, pairs_per_step)
        self._move_horizon(state, horizon)

    def _record_segment(
        self, state: TrainerState, kind: str, trained: list[int], left_out: list[int], extra: dict | None = None
    ) -> None:
        self._write_record(
            {
                "epoch": self._last_epoch_handled,
                "event": kind,
                "global_step": state.global_step,
                "pool_size": self.sampler.pool_size,
                "num_selected": len(trained),
                "rule": self.trainer.args.selection_rule,
                "thresholds": {},
                **(extra or {}),
                "selected_ids": [self.pair_ids[row] for row in trained],
                "trimmed_ids": [self.pair_ids[row] for row in left_out],
            }
        )

    def _finish_segment(self, state: TrainerState) -> None:
        """Count the compute of the segment that ends here (once)."""
        if self._segment_counted:
            return
        self._segment_counted = True
        micro_batches = (state.global_step - self._segment_start_step) * self.trainer.args.gradient_accumulation_steps
        self.engine.count_training(micro_batches)

    # ----- checkpoint state -----

    def selection_state(
        self, global_step: int, pool: dict[str, Any], config: dict[str, Any]
    ) -> tuple[SelectionState, dict[str, torch.Tensor]]:
        """The selection as of `global_step`, and the cached log-probs, for `checkpoint.save_selection_state`."""
        if self._last_epoch_handled is None:
            raise RuntimeError("A checkpoint before the first epoch began has no selection to save.")
        steps = self.strategy == "steps"
        state = SelectionState(
            global_step=global_step,
            epoch=self._last_epoch_handled,
            epoch_start_step=self._epoch_start_step,
            batches_in_epoch=len(self.sampler),
            selected_rows=[] if steps else self.sampler.rows,
            previous_selection=None if steps else self._previous_selection,
            aux_num_refreshes=self.engine.aux_num_refreshes,
            pool=pool,
            config=config,
            strategy=self.strategy,
            segment_start_step=self._segment_start_step,
            max_steps=self.trainer.state.max_steps,
            keep_estimate=self._keep_estimate,
        )
        tensors = self.engine.checkpoint_tensors()
        if steps:
            tensors["pass.consumed"] = torch.as_tensor(self._consumed, dtype=torch.uint8)
            tensors["segment.rows"] = torch.as_tensor(self.sampler.segment_rows, dtype=torch.int64)
        return state, tensors

    def gather_for_checkpoint(self) -> None:
        """Combine the ranks' training-step records for the checkpoint `selection_state` writes. Every rank calls it.

        A resume restores them, so the next event reuses the same log-probs as the uninterrupted run and selects the
        same pairs.
        """
        self.engine.gather_for_checkpoint()

    def start_from_full_pool(self) -> None:
        """Forget the previous training loop: the next epoch 0 trains, and records, the full pool again.

        The trainer calls this at the start of every training loop (each `train()`, and each retry of
        `auto_find_batch_size` after an out-of-memory error, which restarts the loop from step 0), before the Trainer
        sizes the run from the sampler's length: a sampler still holding the last selection would make `max_steps`
        too short, and a remembered epoch would skip the new loop's warm-up event. π_ref's cached log-probs stay (they
        are of π_ref as it is now: with `sync_ref_model` each sync drops them); θ_aux's are dropped and its shuffle
        seeds restart, as in a new run. A resume then restores its checkpoint's selection over this.
        """
        self.sampler.end_segments()
        self.sampler.set_selection(range(self.sampler.pool_size))
        self.sampler.set_epoch(0)
        self._consumed = None
        self._segment_counted = True
        self._previous_selection = None
        self._last_epoch_handled = None
        self._epoch_start_step = 0
        self.engine.start_new_loop()

    def restore_selection_state(self, state: SelectionState, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint: its selection, its cached log-probs, and no second event for its epoch."""
        if state.strategy == "steps":
            # The pass and the segment under way; the sampler skips the segment's micro-batches already trained.
            self._consumed = tensors.pop("pass.consumed").numpy().astype(bool)
            accumulation = self.trainer.args.gradient_accumulation_steps
            skip = (state.global_step - state.segment_start_step) * accumulation
            trained = self.sampler.set_segment(tensors.pop("segment.rows").tolist(), accumulation, skip_batches=skip)
            self._segment_start_step, self._segment_counted = state.segment_start_step, False
            self._keep_estimate = state.keep_estimate
            self._last_epoch_handled = state.epoch
            self._epoch_start_step = state.epoch_start_step
            self._resumed_pass = True
            self.engine.restore(tensors, state.aux_num_refreshes)
            self.engine.plan_training(trained)  # as the uninterrupted run's steps: π_ref from the cache or not
            return
        self.sampler.set_selection(state.selected_rows)
        self.sampler.set_epoch(state.epoch)
        self._previous_selection = state.previous_selection
        self._last_epoch_handled = state.epoch
        self._epoch_start_step = state.epoch_start_step
        self.engine.restore(tensors, state.aux_num_refreshes)

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
        if self.fixed_horizon is not None:
            return  # `max_steps`: the horizon and the LR schedule are the step budget's, whatever the epochs' length
        horizon = selective_horizon(
            state.global_step,
            epoch,
            self.trainer.args.num_train_epochs,
            len(train_dataloader),
            self.trainer.args.gradient_accumulation_steps,
        )
        self._move_horizon(state, horizon)

    def _move_horizon(self, state: TrainerState, horizon: int) -> None:
        """Make `horizon` the run's last step (`state.max_steps`, the progress bar) and the LR schedule's end."""
        self.trainer.set_horizon(horizon)
        scheduler = self.trainer.lr_scheduler
        if not isinstance(scheduler, RetimedLR):
            logger.warning(
                "The LR scheduler (%s) is not a trl_select RetimedLR, so its horizon stays that of the full pool and "
                "it will not reach its end.",
                type(scheduler).__name__,
            )
            return
        # The scheduler's own counter, not `global_step`: the Trainer does not step it on skipped optimizer steps
        # (fp16 overflow), so the two drift apart, and the rest of the schedule must span the steps really left.
        scheduler.retarget(scheduler.last_epoch, max(horizon - state.global_step, 1))

    def _log_event(self, message: str, *args: Any) -> None:
        """The event's console line, on the main process (see `EVENT_LOGGER`)."""
        if self.trainer.accelerator.is_main_process:
            event_logger.info(message, *args)

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        """Hand `metrics` (`selection/*` scalars) to every `report_to` backend with the next training log.

        Reporters call this (e.g. `CategoryMetricsReporter`); it goes through `SelectiveDPOTrainer.log_selection_metrics`.
        """
        self.trainer.log_selection_metrics(metrics)

    def _report(self, event: SelectionEvent, state: TrainerState) -> None:
        for reporter in self.reporters:
            reporter(event, self.trainer.args, state)

    def _write_record(self, record: dict[str, Any]) -> None:
        if self.trainer.accelerator.is_main_process:
            self.history.append(record)
