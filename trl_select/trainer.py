"""`SelectiveDPOTrainer` and `SelectiveSLiCTrainer`: `DPOTrainer` whose epochs train only on the selected pairs.

The trainer itself stays thin: it wires the scoring engine, the selection callback, the reporters and the sampler in,
makes the per-epoch step counts, the run's horizon (`state.max_steps`) and the LR horizon follow the live selection,
starts every training loop (each `train()`, each `auto_find_batch_size` retry) from the full pool, and knows how to get
reference log-probs. The selection event is in `callback.py`, the scores and their caches in `engine.py`, the math in
`scores.py`/`rules.py`, the passes over the pool in `scoring.py`/`auxiliary.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    BitsAndBytesConfig,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalPrediction, get_last_checkpoint
from trl import DPOTrainer

from .callback import SelectionCallback
from .checkpoint import (
    SelectionState,
    check_resumable,
    config_fingerprint,
    load_selection_state,
    pool_fingerprint,
    resume_position,
    save_selection_state,
)
from .config import SelectiveDPOConfig, SelectiveSLiCConfig
from .engine import ScoringEngine
from .event import Reporter, show_selection_events
from .history import HISTORY_FILENAME
from .memory import warn_if_aux_memory_costly
from .pool_source import record_pool_source
from .registry import scorer_needs
from .reporting import default_reporters
from .sampler import SegmentedLoader, SelectionSampler
from .schedule import RetimedLR, selective_horizon, update_steps_per_epoch
from .scores import PairLogProbs
from .scoring import ROW_KEY, activation_checkpointing_off, inference_mode, pair_lengths, run_log_prob_pass
from .training_log_probs import POLICY, POOL_ROWS_KEY, REFERENCE, TrainingRowsCollator, active_dropout
from .validation import (
    FRACTION_RULES,
    check_bands_can_fill_a_batch,
    check_batches_not_dispatched,
    check_distributed_setup_supported,
    check_enough_validation_pairs,
    check_fraction_can_fill_a_batch,
    check_fsdp_aux_supported,
    check_not_vision,
    check_preference_rows,
    event_schedule,
    min_selection_size,
)


if TYPE_CHECKING:
    from peft import PeftConfig


logger = logging.getLogger(__name__)

# The row index of each pair in the dataset as the user passed it, before TRL drops over-long prompts.
ROW_INDEX_COLUMN = "trl_select_row"


class SelectiveDPOTrainer(DPOTrainer):
    """[`~trl.DPOTrainer`] with in-loop data selection (LossDiff-IRM by default); a drop-in replacement.

    Takes every argument of `DPOTrainer`, with `args` a [`SelectiveDPOConfig`], plus:

    Args:
        validation_dataset ([`~datasets.Dataset`], *optional*):
            Preference pairs the auxiliary model is aligned on (the LossDiff direction). Defaults to `eval_dataset`.
            Required when `selection_rule` uses LossDiff.
        selection_reporters (`list[Callable]`, *optional*, defaults to `None`):
            Extra reporters, each called as `reporter(event, args, state)` on every rank after every selection event
            (a [`~trl_select.event.SelectionEvent`]), after the built-in ones (score files, per-category scalars,
            wandb). A reporter that writes files checks `state.is_world_process_zero`; one that logs scalars hands them
            to `trainer.log_selection_metrics`. See docs/monitoring.md.

    Each pair's stable id is the training dataset's `id` column if it has one, else its row index in the dataset as
    passed (before TRL drops pairs whose prompt fills `max_length`). Ids are what `selection_history.jsonl` records.

    Example:

    ```python
    >>> from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer

    >>> args = SelectiveDPOConfig(output_dir="out", num_train_epochs=3)  # LossDiff-IRM, bands 10-90
    >>> trainer = SelectiveDPOTrainer(model, args=args, train_dataset=train, eval_dataset=validation)
    >>> trainer.train()
    ```
    """

    _config_class: type[SelectiveDPOConfig] = SelectiveDPOConfig
    _tag_names = ["trl", "dpo", "trl-select"]

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module,
        ref_model: PreTrainedModel | None = None,
        args: SelectiveDPOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        validation_dataset: Dataset | None = None,
        selection_reporters: Sequence[Reporter] | None = None,
    ) -> None:
        args = self._check_args(model, args)
        # Again here: the environment (`accelerate launch --use_fsdp`) or the model (`tp_plan`) may say what the
        # config could not.
        check_distributed_setup_supported(args, model)
        # FSDP2 cannot deep-copy the policy for a full-copy aux (a PEFT policy's aux is an adapter instead)
        check_fsdp_aux_supported(
            args, peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        )
        _check_precomputed_reference_is_shared(
            args,
            {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "validation_dataset": validation_dataset},
        )
        raw_train_dataset = train_dataset  # as the user passed it: what `trl-select suspects` shows the text of
        if args.selection_enabled:
            args.check_loss_is_scorable()  # again: the rule's scorers may have been registered after the config
            check_batches_not_dispatched(getattr(args.accelerator_config, "dispatch_batches", None))
            train_dataset = self._check_train_dataset(train_dataset)
            if validation_dataset is None:
                validation_dataset = eval_dataset
            validation_dataset = self._check_validation_dataset(validation_dataset, args)
            minimum = min_selection_size(args.per_device_train_batch_size, args.world_size)
            if args.selection_rule in FRACTION_RULES:
                check_fraction_can_fill_a_batch(len(train_dataset), args.selection_fraction, minimum)
            else:
                check_bands_can_fill_a_batch(len(train_dataset), args.percentile_bands(), minimum)
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        self.selection_sampler: SelectionSampler | None = None
        self.selection_engine: ScoringEngine | None = None
        self.selection_callback: SelectionCallback | None = None
        self._pool_fingerprint: dict[str, Any] | None = None
        self._resumed_selection: tuple[SelectionState, dict[str, torch.Tensor], str] | None = None
        self._pairs_trained = 0.0  # pairs the current training loop trained, for `train()`'s speed metrics
        self._pending_selection_metrics: dict[str, float] = {}  # `log_selection_metrics`, merged into the next log
        self._pending_selection_step = -1
        self._forward_noise_cache: tuple[tuple[int, frozenset[str]], dict[str, list[str]]] | None = None
        if not args.selection_enabled:
            return
        # A pre-configured accelerate state can turn FSDP or a parallelism config on with no argument showing it.
        check_distributed_setup_supported(args, self.model, accelerator=self.accelerator)
        check_fsdp_aux_supported(
            args, is_peft_model(self.accelerator.unwrap_model(self.model)), accelerator=self.accelerator
        )
        check_batches_not_dispatched(self.accelerator.dataloader_config.dispatch_batches)
        if "influence" in args.required_scores and self.accelerator.num_processes > 1:
            # Fail now rather than after the warm-up epochs, at the first selection event.
            raise NotImplementedError(
                f"`selection_rule={args.selection_rule!r}` uses the exact influence score, which runs on one process "
                f"only; this run has {self.accelerator.num_processes}. Use `lossdiff_irm`, or score offline on one "
                "process with `trl-select score --scores influence` and train on `trl-select select`'s subset."
            )
        warn_if_aux_memory_costly(args, self.model, self.accelerator)  # a full-copy aux: name aux_mode="lora"
        show_selection_events(args.log_level)  # one console line per event, whatever the script configured
        if self.accelerator.is_main_process and isinstance(raw_train_dataset, Dataset):
            record_pool_source(args.output_dir, raw_train_dataset)
        self.pair_ids = self._stable_pair_ids(self.train_dataset)
        if validation_dataset is not None:
            if validation_dataset is eval_dataset and isinstance(self.eval_dataset, Dataset):
                validation_dataset = self.eval_dataset  # already tokenized (and maybe with precomputed ref log-probs)
            else:
                validation_dataset = self._prepare_dataset(
                    validation_dataset, self.processing_class, self.args, "validation"
                )
                validation_dataset = self._precompute_validation_reference(validation_dataset)
        if validation_dataset is not None:
            check_enough_validation_pairs(
                len(validation_dataset),
                # the aux stage trains on whole batches on every rank; influence reads any number of pairs
                (args.aux_batch_size or args.per_device_train_batch_size) if args.needs_auxiliary else 1,
                self.accelerator.num_processes if args.needs_auxiliary else 1,
                "`validation_dataset` after tokenization (TRL drops pairs whose prompt fills `max_length`)",
            )
        self.selection_sampler = SelectionSampler(
            len(self.train_dataset),
            max_batch_size=args.per_device_train_batch_size,
            seed=args.seed,
            world_size=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            order=args.train_sampling_strategy,
            lengths=self._pair_lengths() if args.train_sampling_strategy == "group_by_length" else None,
            accumulation=args.gradient_accumulation_steps,
        )
        # Refuse a schedule with no event now, and say once when this run will select.
        schedule = self._event_schedule(args.per_device_train_batch_size)
        if schedule.strategy == "steps":
            events = max(0, -(-(schedule.horizon - schedule.warmup_steps) // schedule.interval))
            logger.warning(
                "trl-select: this run is %d optimizer steps (%.2g epochs of the pool), so it selects inside the epochs: "
                "first at step %d, then every %d steps (about %d events), each scoring the next pairs it will train "
                "(selection_strategy='steps').",
                schedule.horizon,
                schedule.horizon / schedule.steps_per_epoch,
                schedule.warmup_steps,
                schedule.interval,
                events,
            )
        self.selection_engine = ScoringEngine(self, validation_dataset)
        self.selection_callback = SelectionCallback(self, self.selection_engine)
        self.selection_callback.reporters.extend(default_reporters(self))  # score files, per-category, wandb
        self.selection_callback.reporters.extend(selection_reporters or [])
        self.add_callback(self.selection_callback)

    # ----- construction checks -----

    def _check_args(self, model, args: SelectiveDPOConfig | None) -> SelectiveDPOConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = self._config_class(f"{name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self._config_class):
            raise TypeError(
                f"`args` must be a {self._config_class.__name__}, got {type(args).__name__}. Build one with the same "
                f"fields: {self._config_class.__name__}(**your_config.to_dict()) keeps every DPOConfig setting."
            )
        return args

    @staticmethod
    def _check_train_dataset(train_dataset) -> Dataset:
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if isinstance(train_dataset, IterableDataset) or not isinstance(train_dataset, Dataset):
            raise TypeError(
                f"`train_dataset` must be a map-style `datasets.Dataset` for selection (the whole pool is rescored "
                f"every epoch), got {type(train_dataset).__name__}. Set `selection_rule='none'` to stream."
            )
        if len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty: selection needs at least one preference pair.")
        check_not_vision(train_dataset, "train_dataset")
        check_preference_rows(train_dataset, "train_dataset")
        if ROW_INDEX_COLUMN in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns(ROW_INDEX_COLUMN)
        return train_dataset.add_column(ROW_INDEX_COLUMN, list(range(len(train_dataset))))

    @staticmethod
    def _check_validation_dataset(validation_dataset, args: SelectiveDPOConfig) -> Dataset | None:
        if not args.needs_validation:
            return None  # only LossDiff's aux model and validation-directed scores (influence) use validation pairs
        if validation_dataset is None:
            raise ValueError(
                f"`selection_rule={args.selection_rule!r}` (`--selection_rule`) uses {list(args.required_scores)}, "
                "which need validation pairs (LossDiff aligns the auxiliary model on them): pass `validation_dataset=` "
                "(or `eval_dataset=`). From TRL's `dpo.py`, which passes `eval_dataset` only when it evaluates, add "
                "`--eval_strategy epoch` (or `steps`) and `--dataset_test_split <split>` (a split of the dataset with "
                "preference pairs, e.g. `test`). Or select without validation pairs: `--selection_rule irm_band` "
                "(`selection_rule='irm_band'`)."
            )
        if not isinstance(validation_dataset, Dataset):
            raise TypeError(
                f"`validation_dataset` must be a single `datasets.Dataset`, got {type(validation_dataset).__name__}. "
                "With several eval datasets, pass the one to align on as `validation_dataset=`."
            )
        if len(validation_dataset) == 0:
            raise ValueError("`validation_dataset` is empty: the auxiliary model needs validation pairs to align on.")
        check_not_vision(validation_dataset, "validation_dataset")
        check_preference_rows(validation_dataset, "validation_dataset")
        if args.needs_auxiliary:  # the aux stage trains on whole batches; influence reads any number of pairs
            check_enough_validation_pairs(
                len(validation_dataset),
                args.aux_batch_size or args.per_device_train_batch_size,
                args.world_size,
                "`validation_dataset`",
            )
        return validation_dataset

    @staticmethod
    def _stable_pair_ids(dataset: Dataset) -> list[Any]:
        ids = dataset["id"] if "id" in dataset.column_names else dataset[ROW_INDEX_COLUMN]
        if len(set(ids)) != len(ids):
            raise ValueError("The training dataset's `id` column has duplicate values; pair ids must be unique.")
        return list(ids)

    # ----- selection plumbing -----

    def _event_schedule(self, batch_size: int):
        return event_schedule(
            self.args,
            len(self.train_dataset),
            batch_size,
            self.accelerator.num_processes,
            scorer_needs(self.args.required_scores),
        )

    def _pair_lengths(self) -> np.ndarray:
        """Each pool pair's length for `train_sampling_strategy="group_by_length"`: the dataset's
        `length_column_name` column if it has one (as transformers reads it), else the pair's padded length in a batch,
        its longer sequence `max(min(P + C, L), min(P + R, L))` (prompt, chosen, rejected tokens, `max_length` L)."""
        dataset = self.train_dataset
        if self.args.length_column_name in dataset.column_names:
            return np.asarray(dataset[self.args.length_column_name], dtype=np.int64)
        max_length = getattr(self.data_collator, "max_length", self.args.max_length)
        longer = pair_lengths(dataset)  # from the Arrow offsets: no Python list of the pool's tokens
        return longer if max_length is None else np.minimum(longer, max_length)

    @property
    def scoring_batch_size(self) -> int:
        return self.args.scoring_batch_size or self.args.per_device_eval_batch_size

    def _precompute_validation_reference(self, validation_dataset: Dataset) -> Dataset:
        """Add π_ref's log-probs to a separately passed validation set now, before any training step.

        TRL precomputes `train_dataset` and `eval_dataset` in `__init__`; a `validation_dataset` that is not the eval
        set would otherwise be scored at the first selection, and with no `ref_model` on a full model (TRL keeps no
        reference copy when precomputing) the reference forward would run the policy as trained so far. TRL's own
        precompute pass (its DeepSpeed inference engine, its dataset cache file shared by the ranks) does it here, at
        the one time the untrained policy is π_ref: one no-grad forward over the validation pairs.
        """
        if not self.args.precompute_ref_log_probs or _has_reference_columns(validation_dataset):
            return validation_dataset
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        return self._precompute_ref_logps(validation_dataset, "validation", batch_size)

    def reads_precomputed_reference(self, dataset: Dataset) -> bool:
        """Whether `reference_log_probs(dataset, ...)` reads TRL's precomputed columns instead of running π_ref."""
        return self.args.precompute_ref_log_probs and _has_reference_columns(dataset)

    def reference_log_probs(self, dataset: Dataset, loader) -> PairLogProbs:
        """π_ref's summed completion log-probs over `dataset`, in row order.

        With `precompute_ref_log_probs=True`, reads TRL's precomputed `ref_chosen_logps`/`ref_rejected_logps` columns
        (also added to a separate validation set at construction). Otherwise, whatever columns the data carries, runs
        the live reference (`compute_ref_log_probs`: the `ref_model`, or the base with adapters disabled for a PEFT
        policy) over `loader` on every rank, as TRL's loss does.
        """
        if self.reads_precomputed_reference(dataset):
            return PairLogProbs(
                chosen=torch.tensor(dataset["ref_chosen_logps"], dtype=torch.float32),
                rejected=torch.tensor(dataset["ref_rejected_logps"], dtype=torch.float32),
            )
        if self.ref_model is None and not is_peft_model(self.accelerator.unwrap_model(self.model)):
            # Only reachable with precompute on and no columns: the policy is no longer π_ref once training started.
            raise RuntimeError(
                "No reference model to score with: `precompute_ref_log_probs=True` without a `ref_model` keeps no copy "
                "of the initial model, and this dataset has no precomputed `ref_chosen_logps`/`ref_rejected_logps`. "
                "Pass `ref_model=`, or set `precompute_ref_log_probs=False`."
            )
        model = self.ref_model if self.ref_model is not None else self.model

        def forward(batch):
            return self.compute_ref_log_probs(model, {k: v for k, v in batch.items() if k != ROW_KEY})

        with (
            inference_mode(self.accelerator.unwrap_model(model), self.args.gradient_checkpointing_kwargs),
            _trl_checkpointing_switch_on_current_api(),
        ):
            return run_log_prob_pass(loader, forward, self.accelerator, len(dataset), desc="Scoring with reference")

    def log_selection_metrics(self, metrics: dict[str, float]) -> None:
        """Send `metrics` (`selection/*` scalars) to every `report_to` backend with the next log, whatever its kind.

        They wait in a buffer of their own and are merged into the next `log` call, train or eval. Not TRL's train
        metric buffer: `DPOTrainer.log` merges that one only when the model is in training mode, and after an
        evaluation the next logs (with `eval_strategy="epoch"`, the run's final one) run in eval mode, so an event
        followed by no train log (an epoch shorter than `logging_steps`) never reached the backends. If an event's
        metrics are still waiting when the next event publishes, they are logged on their own first, so no event's
        metrics are lost. Calls at the same optimizer step (an event and its reporters) are merged, a later value of
        a key replacing the earlier one.
        """
        if self._pending_selection_metrics and self._pending_selection_step != self.state.global_step:
            pending, self._pending_selection_metrics = self._pending_selection_metrics, {}
            super().log(pending)  # `DPOTrainer.log`: with them its own buffer of the current mode
        self._pending_selection_step = self.state.global_step
        self._pending_selection_metrics.update({key: float(value) for key, value in metrics.items()})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if getattr(self, "_pending_selection_metrics", None):
            logs = {**logs, **self._pending_selection_metrics}
            self._pending_selection_metrics = {}
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.selection_engine is None or POOL_ROWS_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        rows = inputs.pop(POOL_ROWS_KEY)  # TRL's loss would hand it to the model
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        engine, recorder = self.selection_engine, self.selection_engine.training_log_probs
        # π_ref's cached log-probs stand in for the step's reference forward when that forward would compute the same
        # values: a fixed reference, summed as TRL sums it, without dropout noise. TRL's precompute path then reads
        # them from the batch, as the float32 a precomputed column gives. With `ld_alpha` the cache holds LD-weighted
        # sums (every pass and the recorder form them with `scores.completion_sums`, TRL's own masks), which is what
        # TRL's loss reads from precomputed columns too (`compute_ref_log_probs`), so they stand in as well.
        reference = None
        if not (self.precompute_ref_logps or self.args.sync_ref_model):
            reference = engine.cached_reference(rows)
        noise = self._forward_noise({*recorder.recording, *([REFERENCE] if reference is not None else [])})
        for kind in recorder.recording & set(noise):
            recorder.give_up(kind, f"dropout is active in its training forward ({', '.join(noise[kind][:3])}, ...)")
        if REFERENCE in noise:
            reference = None  # TRL's live forward, noise and all, as without selection
        if not self.precompute_ref_logps:
            engine.note_reference_forward(live=reference is None)
        # The step's own θ and π_ref forwards, summed per pair for the next selection event (`scoring_reuse`).
        modules = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:
            modules.append(self.accelerator.unwrap_model(self.ref_model))
        with recorder.record(modules, inputs["completion_mask"], rows):
            if reference is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = reference
            precomputed, self.precompute_ref_logps = self.precompute_ref_logps, True  # TRL's loss reads the flag
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.precompute_ref_logps = precomputed

    def _forward_noise(self, kinds: set[str]) -> dict[str, list[str]]:
        """The training forwards of `kinds` (θ's; π_ref's: the `ref_model`, or the policy with its adapters off) that
        dropout would perturb, each with the parts that would (`active_dropout`); a kind without any is left out.

        Checked once per epoch and set of kinds (a walk over every module, too slow for every step of a PEFT model):
        the Trainer puts the models in the same mode at every step.
        """
        key = (math.floor(self.state.epoch + 1e-6), frozenset(kinds))
        if self._forward_noise_cache is not None and self._forward_noise_cache[0] == key:
            return self._forward_noise_cache[1]
        policy = self.accelerator.unwrap_model(self.model)
        modules = {POLICY: (policy, False)}
        if self.ref_model is not None:
            modules[REFERENCE] = (self.accelerator.unwrap_model(self.ref_model), False)
        else:  # TRL's reference forward: the PEFT policy with its adapters off, or a "ref" adapter on
            modules[REFERENCE] = (policy, "ref" not in getattr(policy, "peft_config", {}))
        noise = {kind: parts for kind in kinds if (parts := active_dropout(*modules[kind]))}
        self._forward_noise_cache = (key, noise)
        return noise

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if not (is_training and self.selection_engine is not None):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        # Training batches carry their pairs' pool rows, so the training steps' log-probs are recorded at the right
        # rows whatever order the batches come in. Only the training loader's collator is wrapped.
        indices = np.asarray(self.train_dataset[ROW_INDEX_COLUMN], dtype=np.int64)
        pool_row_of_index = np.full(int(indices.max()) + 1, -1, dtype=np.int64)
        pool_row_of_index[indices] = np.arange(len(indices))
        collator = self.data_collator
        self.data_collator = TrainingRowsCollator(collator, ROW_INDEX_COLUMN, pool_row_of_index)
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        finally:
            self.data_collator = collator

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # `remove_unused_columns` keeps the row index the training collator turns into pool rows
        if getattr(self, "selection_engine", None) is not None and ROW_INDEX_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_INDEX_COLUMN]

    def _get_train_sampler(self, train_dataset=None):
        if self.selection_sampler is None:
            return super()._get_train_sampler(train_dataset)
        # `get_train_dataloader` asks for the sampler at the start of every training loop, after `auto_find_batch_size`
        # has set the loop's batch size: batch at that live size, as the Trainer's own DataLoader would.
        self.selection_sampler.max_batch_size = self._train_batch_size
        return self.selection_sampler

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.selection_sampler is not None and created and type(scheduler) is LambdaLR:
            # Every LambdaLR schedule of transformers.get_scheduler; the selection callback retimes it.
            self.lr_scheduler = RetimedLR.wrap(
                scheduler, self.optimizer if optimizer is None else optimizer, num_training_steps
            )
        return self.lr_scheduler

    def set_horizon(self, max_steps: int) -> None:
        """Make `max_steps` the run's last optimizer step: `state.max_steps` and the progress bar's total.

        transformers stops training, and forces the final save (`save_strategy="steps"`) and evaluation
        (`eval_strategy="steps"`), on the step where `global_step >= state.max_steps`; `load_best_model_at_end` needs
        that last evaluation. Fractional `logging_steps`/`eval_steps`/`save_steps` are not moved: transformers resolved
        them once, against the full-pool horizon, when the loop began.
        """
        self.state.max_steps = max_steps
        for callback in self.callback_handler.callbacks:
            # The bars that size themselves from `state.max_steps` at `on_train_begin`: transformers' `ProgressCallback`
            # (tqdm) and `NotebookProgressCallback` (tracker), TRL's `RichProgressCallback` (a rich task).
            for name in ("training_bar", "training_tracker"):
                bar = getattr(callback, name, None)
                if bar is not None and hasattr(bar, "total"):
                    bar.total = max_steps
                    if callable(getattr(bar, "refresh", None)):
                        bar.refresh()
                elif bar is not None and getattr(callback, "training_task", None) is not None:
                    bar.update(callback.training_task, total=max_steps)

    def _inner_training_loop(
        self,
        batch_size: int | None = None,
        args: SelectiveDPOConfig | None = None,
        resume_from_checkpoint: str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """Every training loop starts at step 0 of the selection schedule, on the full pool.

        `train()` runs this loop once, and again from step 0 at a smaller batch size after each out-of-memory error
        with `auto_find_batch_size`; a second `train()` runs it again too. The Trainer sizes the loop (steps per epoch,
        `max_steps`, the LR horizon, fractional `*_steps`) from the training dataloader's length before the first
        epoch, so the sampler must hold the full pool by then, not the previous loop's last selection.
        """
        if self.selection_callback is not None:
            self.selection_callback.start_from_full_pool()
            # The events of this loop, at its live batch size (`auto_find_batch_size` lowers it between retries).
            schedule = self._event_schedule(self._train_batch_size if batch_size is None else batch_size)
            self.selection_callback.configure(
                schedule.strategy,
                schedule.warmup_steps,
                schedule.interval,
                self.args.max_steps if self.args.max_steps > 0 else None,
            )
        self._pairs_trained = 0.0
        return super()._inner_training_loop(
            batch_size,
            args=args,
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        if self.selection_sampler is None or args.max_steps <= 0:
            return values
        # A step budget with selection: epochs are as short as their selections, so the Trainer's epoch count from the
        # full pool would stop too early; `global_step >= max_steps` ends the run, as for a dataset of unknown length.
        _, *rest = values
        return (sys.maxsize, *rest)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # The Trainer passes step counts frozen from the full pool; recount them from the live selection so the epoch
        # ends, steps its last partial accumulation and sets `state.epoch` where the selection really ends.
        if self.selection_sampler is None:
            return super()._run_epoch(*args, **kwargs)
        if self.selection_callback.strategy == "steps":
            return self._run_steps_epoch(*args, **kwargs)
        num_batches = len(kwargs["train_dataloader"])
        num_steps = update_steps_per_epoch(num_batches, self.args.gradient_accumulation_steps)
        kwargs["steps_in_epoch"] = num_batches
        kwargs["num_update_steps_per_epoch"] = num_steps
        epoch_size, start_step = self.selection_sampler.epoch_size, self.state.global_step
        result = super()._run_epoch(*args, **kwargs)
        # A resumed or stopped epoch ran only part of its steps; the balanced batches make each step's share equal.
        self._pairs_trained += epoch_size * (self.state.global_step - start_step) / num_steps
        return result

    def _run_steps_epoch(self, *args: Any, **kwargs: Any):
        """One pass of the `"steps"` strategy: segments chosen as the Trainer asks for batches, ended by the callback.

        Its length is known only as its events decide, so the Trainer gets an upper bound (every step trains at least
        one pair per micro-batch per rank), in whole accumulation steps so that no step but a segment's last syncs
        gradients, and the loader stops the epoch (`should_epoch_stop`) when the pass has no pairs left. Resumed
        batches are skipped by the sampler itself (`restore_selection_state`), not by the Trainer.
        """
        callback, accumulation = self.selection_callback, self.args.gradient_accumulation_steps
        bound = self.selection_sampler.pool_size // self.selection_sampler.world_size + 1
        loader = kwargs["train_dataloader"]

        def exhausted() -> None:
            self.control.should_epoch_stop = True

        segmented = SegmentedLoader(loader, lambda: callback.next_segment(self.state), exhausted)
        kwargs["train_dataloader"] = segmented
        kwargs["steps_in_epoch"] = bound * accumulation
        kwargs["num_update_steps_per_epoch"] = bound
        kwargs["steps_trained_in_current_epoch"] = 0
        start_step = self.state.global_step
        result = super()._run_epoch(*args, **kwargs)
        steps = self.state.global_step - start_step
        self._pairs_trained += steps * accumulation * self._train_batch_size * self.selection_sampler.world_size
        return result

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float):
        if self.selection_sampler is not None:
            # transformers reports `num_train_samples * steps run / state.max_steps` samples (full-pool epochs); hand
            # it the figure that makes this the pairs this loop really trained, for `train_samples_per_second`.
            steps_run = self.state.global_step - self._initial_global_step
            num_train_samples = self._pairs_trained * max(self.state.max_steps, 1) / steps_run if steps_run else 0
        return super()._finalize_training(trial, num_train_samples, start_time)

    # ----- checkpoints and resume -----

    def pool_fingerprint(self) -> dict[str, Any]:
        """The training pool's fingerprint (pair ids + token hash), computed once: a resume must match it."""
        if self._pool_fingerprint is None:
            self._pool_fingerprint = pool_fingerprint(self.pair_ids, self.train_dataset)
        return self._pool_fingerprint

    def _selection_config_fingerprint(self) -> dict[str, Any]:
        return config_fingerprint(self.args, self.accelerator.num_processes)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # The checkpoint is checked against this run before the Trainer loads any weights or runs any forward.
        self._resumed_selection = None
        if self.selection_callback is not None and resume_from_checkpoint not in (None, False):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            state, tensors = load_selection_state(resume_from_checkpoint)
            check_resumable(
                state, self.pool_fingerprint(), self._selection_config_fingerprint(), resume_from_checkpoint
            )
            self._resumed_selection = (state, tensors, str(resume_from_checkpoint))
            if self.args.sync_ref_model:
                logger.warning(
                    "Resuming a `sync_ref_model=True` (TR-DPO) run: TRL does not save the synced reference in "
                    "checkpoints, so the resumed run trains against the `ref_model` it was given, not the one the "
                    "checkpointed run had synced. Selection scores with that same reference: the checkpoint carries "
                    "no π_ref log-probs."
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        epochs_trained, batches_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if self._resumed_selection is None or resume_from_checkpoint is None:
            return epochs_trained, batches_trained
        # The Trainer's `global_step // num_update_steps_per_epoch` assumes full-pool epochs; the saved state knows
        # where the selected epoch began and how long it is.
        state, tensors, checkpoint_dir = self._resumed_selection
        self.selection_callback.restore_selection_state(state, tensors)
        if self.accelerator.is_main_process:
            # Events after the checkpoint are dropped: the resumed run records them again.
            history = Path(checkpoint_dir) / HISTORY_FILENAME
            self.selection_callback.history.rewrite(history.read_bytes() if history.is_file() else b"")
        if state.strategy == "steps":
            # The pass goes on at the checkpoint's segment; the sampler skips what that segment already trained.
            epochs_trained, batches_trained = state.epoch, 0
            self.set_horizon(state.max_steps)
        else:
            epochs_trained, batches_trained = resume_position(
                state, self.state.global_step, self.args.gradient_accumulation_steps
            )
            if self.args.max_steps <= 0:  # a step budget is the horizon already
                # The Trainer has just reset `state.max_steps` to the full-pool horizon; the run being resumed had
                # moved it.
                self.set_horizon(
                    selective_horizon(
                        state.epoch_start_step,
                        state.epoch,
                        self.args.num_train_epochs,
                        state.batches_in_epoch,
                        self.args.gradient_accumulation_steps,
                    )
                )
        logger.info(
            "Resuming selection from %s: epoch %d, %d of its batches already trained, %d pairs selected.",
            checkpoint_dir,
            epochs_trained,
            batches_trained,
            len(state.selected_rows),
        )
        return epochs_trained, 0 if self.args.ignore_data_skip else batches_trained

    def _save_checkpoint(self, model, trial) -> None:
        # Written before the Trainer's files: its `trainer_state.json`, written last, marks a complete checkpoint.
        if self.selection_callback is not None:
            self.selection_callback.gather_for_checkpoint()  # a collective: on every rank, before the main one writes
        if self.selection_callback is not None and self.args.should_save:
            checkpoint_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state, tensors = self.selection_callback.selection_state(
                self.state.global_step, self.pool_fingerprint(), self._selection_config_fingerprint()
            )
            history = self.selection_callback.history.path
            save_selection_state(checkpoint_dir, state, tensors, history.read_bytes() if history.is_file() else b"")
        super()._save_checkpoint(model, trial)


class SelectiveSLiCTrainer(SelectiveDPOTrainer):
    """SLiC with in-loop selection: the reference-normalised hinge loss `max(0, 1 - β·h_θ(z))` (TRL's `hinge`).

    Same arguments as [`SelectiveDPOTrainer`], with `args` a [`SelectiveSLiCConfig`]; every score uses the hinge loss.
    """

    _config_class = SelectiveSLiCConfig
    _tag_names = ["trl", "slic", "trl-select"]
    _name = "SLiC"
    _paper = {
        "title": "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
        "id": "2305.10425",
        "citation": textwrap.dedent("""\
            @article{zhao2023slic,
                title   = {{SLiC-HF: Sequence Likelihood Calibration with Human Feedback}},
                author  = {Yao Zhao and Rishabh Joshi and Tianqi Liu and Misha Khalman and Mohammad Saleh and Peter J. Liu},
                year    = 2023,
                journal = {arXiv preprint arXiv:2305.10425},
            }"""),
    }


__all__ = ["ROW_INDEX_COLUMN", "SelectiveDPOTrainer", "SelectiveSLiCTrainer"]


@contextlib.contextmanager
def _trl_checkpointing_switch_on_current_api():
    """Inside the block, TRL's `compute_ref_log_probs` switches activation checkpointing off and back on with
    `scoring.activation_checkpointing_off` (transformers 5.23's names) instead of `trl.models.utils.
    disable_gradient_checkpointing`, which reads the deprecated `is_gradient_checkpointing` and so warns (a
    FutureWarning) at every reference pass of a selection event. The same switch: off if it was on, back on with the
    trainer's kwargs. The training steps keep TRL's own (they warn once per process, as in a plain run)."""
    from trl.trainer import dpo_trainer

    saved = dpo_trainer.disable_gradient_checkpointing
    dpo_trainer.disable_gradient_checkpointing = activation_checkpointing_off
    try:
        yield
    finally:
        dpo_trainer.disable_gradient_checkpointing = saved


def _has_reference_columns(dataset: Dataset) -> bool:
    return {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)


def _check_precomputed_reference_is_shared(args: SelectiveDPOConfig, datasets: dict[str, Any]) -> None:
    """Refuse, before any forward, what `precompute_ref_log_probs` cannot do across processes.

    TRL's precompute pass has the main process write the log-probs to the dataset's cache file, and every other rank
    read that file back. An in-memory dataset (`Dataset.from_list`, `from_dict`, ...) caches in a temporary folder
    private to each process, so the other ranks would fail with a FileNotFoundError after the whole reference pass.
    """
    if not args.precompute_ref_log_probs or args.world_size == 1:
        return
    for name, dataset in datasets.items():
        for split, part in dataset.items() if isinstance(dataset, dict) else [(None, dataset)]:
            if isinstance(part, Dataset) and not part.cache_files:
                where = name if split is None else f"{name}[{split!r}]"
                raise ValueError(
                    f"`precompute_ref_log_probs=True` on {args.world_size} processes needs `{where}` backed by files "
                    "that every rank can read, but it is an in-memory dataset. Load it with `datasets.load_dataset` "
                    "or `load_from_disk` (or call `.save_to_disk(path)` then `load_from_disk(path)`), or set "
                    "`precompute_ref_log_probs=False`."
                )
