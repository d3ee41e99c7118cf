"""Whole-pool log-probability passes: TRL's collator and fused forward, sharded over ranks, gathered in pool order.

This module moves tensors; the math on the results lives in `scores.py` and `rules.py`.

Every pass runs the same number of batches on every rank (accelerate pads the last shard by repeating rows), so a
ZeRO-3 forward, which is a collective, never waits on a rank that has no batch left. Each batch carries the pool rows
it holds, and results are scattered back by row, so padding duplicates are harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .event import PROGRESS_LOGGER
from .scores import PairLogProbs, completion_sums, wpo_log_weights


logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
ROW_KEY = "pool_row"
# Keys of a collated batch that are not model inputs
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", ROW_KEY}

# A batch's `(chosen, rejected)` summed log-probs, or `(chosen, rejected, log_weight)` with WPO's per-pair weight
BatchForward = Callable[[dict[str, Any]], tuple[torch.Tensor, ...]]
# The progress bars of the selection's own passes (scoring, aux alignment, influence) show when `PROGRESS_LOGGER` is
# enabled for INFO: with the trainer's `log_level` at info or debug, or in the `trl-select` CLI. Inside a training run
# they are off by default, so a script's console shows the Trainer's bar and one line per selection event, not a bar
# per pass.


def progress_disabled(accelerator: Accelerator) -> bool:
    """Whether the selection's progress bars are off on this process (see `PROGRESS_LOGGER`)."""
    return (
        not accelerator.is_local_main_process
        or bool(os.environ.get("TQDM_DISABLE"))
        or not logging.getLogger(PROGRESS_LOGGER).isEnabledFor(logging.INFO)
    )


class _RowTaggingCollator:
    """Wraps TRL's preference collator so every batch also carries the pool rows it was built from."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], rows_key: str = ROW_KEY) -> None:
        self.collator = collator
        self.rows_key = rows_key

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [example.pop(self.rows_key) for example in examples]
        batch = self.collator(examples)
        batch[self.rows_key] = torch.tensor(rows, dtype=torch.long)
        return batch


class _TokenizedRows(torch.utils.data.Dataset):
    """The token columns of a tokenized preference dataset, each row tagged with its index.

    Rows are read lazily from the dataset's Arrow table (its indices mapping applied), a batch at a time through
    `__getitems__`, which the `DataLoader` calls with a whole batch of rows: the columns are never turned into Python
    lists of the whole pool (tens of GB at a million pairs), and a batch costs one Arrow gather instead of one
    `datasets` row lookup per row and column.
    """

    def __init__(self, dataset: Dataset) -> None:
        missing = [c for c in TOKEN_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The dataset has no {missing} column(s); pass it through DPOTrainer's preprocessing first."
            )
        self.table = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")
        self.size = len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        rows = [int(row) for row in rows]
        columns = self.table[rows].to_pydict()
        return [
            {**{name: columns[name][index] for name in TOKEN_COLUMNS}, ROW_KEY: row} for index, row in enumerate(rows)
        ]

    def total_lengths(self) -> np.ndarray:
        """Each row's padded pair length, `len(prompt) + max(len(chosen), len(rejected))`, as int64, in row order.

        Read from the list columns' offsets (`list_value_length`), never from the token values.
        """
        import pyarrow.compute as pc

        def lengths(name: str) -> np.ndarray:
            return pc.list_value_length(self.table[name]).fill_null(0).to_numpy().astype(np.int64)

        return lengths("prompt_ids") + np.maximum(lengths("chosen_ids"), lengths("rejected_ids"))


def pair_lengths(dataset: Dataset) -> np.ndarray:
    """Each row's padded pair length of a tokenized preference dataset, `len(prompt) + max(len(chosen),
    len(rejected))` tokens, int64 in row order, read from the Arrow offsets (`_TokenizedRows.total_lengths`)."""
    return _TokenizedRows(dataset).total_lengths()


def length_sorted_rows(rows: _TokenizedRows) -> list[int]:
    """Rows ordered by padded pair length, longest first (ties by row), so batches hold similar lengths and OOM shows
    up early."""
    # A stable sort of the negated lengths keeps equal lengths in row order
    return np.argsort(-rows.total_lengths(), kind="stable").tolist()


def pass_batch_size(num_rows: int, num_processes: int, batch_size: int) -> int:
    """The batch size of a sharded pass over `num_rows` rows: `batch_size`, or fewer when the rows do not fill one batch
    per rank (a pass over the few rows no training step covered would otherwise pad every rank to a full batch)."""
    return max(1, min(batch_size, math.ceil(num_rows / num_processes)))


def build_pass_loader(
    dataset: Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    accelerator: Accelerator,
    batch_size: int,
    *,
    batches: list[list[int]] | None = None,
) -> DataLoader:
    """A loader over `dataset` (tokenized) whose batches carry their rows under `ROW_KEY`, on the accelerator's device.

    By default: all rows, length-sorted, sharded by accelerate with equal batch counts on every rank (the last shard
    padded with repeated rows), in batches of `batch_size` rows or fewer when the rows do not fill one per rank
    (`pass_batch_size`). With `batches`: exactly these batches of rows, on this rank only (already sharded).
    """
    rows = _TokenizedRows(dataset)
    collate = _RowTaggingCollator(collator)
    if batches is not None:
        loader = DataLoader(rows, batch_sampler=batches, collate_fn=collate)
        return prepare_data_loader(
            loader, device=accelerator.device, num_processes=1, process_index=0, put_on_device=True
        )
    batch_size = pass_batch_size(len(rows), accelerator.num_processes, batch_size)
    loader = DataLoader(rows, batch_size=batch_size, sampler=length_sorted_rows(rows), collate_fn=collate)
    # The module-level helper, not `accelerator.prepare`, so a loader built per pass is not registered forever.
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        even_batches=True,
    )


def check_same_on_all_ranks(rows: Sequence[int], accelerator: Accelerator, what: str) -> None:
    """Fail loudly unless every rank holds the same `rows`: one 56-bit hash per rank, gathered."""
    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).digest()
    local = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64, device=accelerator.device)
    hashes = accelerator.gather(local).tolist()
    if len(set(hashes)) != 1:
        raise RuntimeError(
            f"{what} differs across ranks (hash per rank: {hashes}). Every rank must compute the same global scores; "
            "this usually means non-deterministic scoring or ranks running different code or data."
        )


def check_same_batch_count(num_batches: int, accelerator: Accelerator, what: str) -> None:
    """Fail on every rank, before the first forward, unless every rank is about to run `num_batches` batches.

    Under ZeRO-3 each forward gathers parameters from all ranks, so a rank with one batch fewer would leave the others
    waiting in a collective until the process-group timeout; one gather of the batch counts turns that into an error.
    """
    if accelerator.num_processes == 1:
        return
    counts = accelerator.gather(torch.tensor([num_batches], dtype=torch.int64, device=accelerator.device)).tolist()
    if len(set(counts)) != 1:
        raise RuntimeError(
            f"{what}: the ranks would run different numbers of batches ({counts}, by rank), and every forward under "
            "ZeRO-3 is a collective. Build scoring loaders with `build_pass_loader` (equal batches on every rank)."
        )


def sequence_log_probs(
    model: torch.nn.Module, batch: dict[str, Any], ld_alpha: float | None = None, use_weighting: bool = False
) -> tuple[torch.Tensor, ...]:
    """Summed completion log-probs of the chosen and rejected halves of a collated batch, as `DPOTrainer` computes them.

    Uses TRL's fused LM head (`model(..., fused_lm_head=True).log_probs`), which never materialises the logits. With
    `ld_alpha`, the sums are LD-DPO's (`scores.completion_sums`); with `use_weighting`, a third tensor is WPO's
    per-pair log-weight under `model` (`scores.wpo_log_weights`), which needs the head's `log_sum_sq_probs` output
    (TRL adds it to the policy's head when `use_weighting`; the aux stage to θ_aux's).
    """
    model_kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    completion_mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    if getattr(outputs, "log_probs", None) is None:
        raise RuntimeError(
            f"{type(model).__name__} returned no `log_probs`: its forward was not patched with TRL's fused LM head "
            "(`trl.trainer.utils.add_fused_lm_head`)."
        )
    shift_completion_mask = completion_mask[..., 1:]
    seq_len = shift_completion_mask.size(1)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
    per_token = outputs.log_probs[:, -seq_len:]
    chosen, rejected = completion_sums(per_token, shift_completion_mask, ld_alpha).chunk(2, dim=0)
    if not use_weighting:
        return chosen, rejected
    log_sum_sq_probs = getattr(outputs, "log_sum_sq_probs", None)
    if log_sum_sq_probs is None:
        raise RuntimeError(
            f"{type(model).__name__}'s fused LM head returns no `log_sum_sq_probs`, which WPO's weights need "
            "(`use_weighting=True`): patch it with `add_fused_lm_head(model, outputs=(..., 'log_sum_sq_probs'))`."
        )
    log_weight = wpo_log_weights(per_token, log_sum_sq_probs[:, -seq_len:], shift_completion_mask)
    return chosen, rejected, log_weight


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any module of `model` recomputes activations in backward.

    transformers 5.23 renamed `is_gradient_checkpointing` to `is_activation_checkpointing` and warns on the old name;
    PEFT and DeepSpeed wrappers forward attribute lookups to the wrapped model, so the new name reaches it through
    them. The old name is read only for models that lack the new one (remote code, older transformers).
    """
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def enable_activation_checkpointing(model: torch.nn.Module, checkpointing_kwargs: dict[str, Any] | None) -> None:
    """Turn activation checkpointing on as `transformers.Trainer.train` does with the trainer's kwargs.

    `every_n_layers` and `offload` of `activation_checkpointing_kwargs` are arguments of
    `activation_checkpointing_enable` itself, the other keys go to `torch.utils.checkpoint.checkpoint`; passing the
    whole dict through would checkpoint every layer and hand `checkpoint` keys it does not know.
    """
    kwargs = dict(checkpointing_kwargs or {})
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload)
    else:  # models that only define the pre-5.23 name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Turn activation checkpointing off through the non-deprecated API where the model has it."""
    disable = getattr(model, "activation_checkpointing_disable", None)
    if disable is not None:
        disable()
    else:  # models that only define the pre-5.23 name
        model.gradient_checkpointing_disable()


def reshard_fsdp(model: torch.nn.Module) -> int:
    """FSDP2: put every `fully_shard`-ed module of `model` back on its sharded parameters; returns how many there were.

    FSDP2 registers a module's whole (all-gathered) parameters while it computes and its `DTensor` shards otherwise,
    but the root module keeps its whole ones after a forward until the next backward (it would gather them again at
    once): after a no-grad scoring pass the root's embeddings and LM head stay whole, and `requires_grad` flags set then
    would be set on those transient tensors, not on the parameters the trainer's optimizer steps. Resharding first
    makes the registered parameters the sharded ones again (no communication; frees the whole copies). A no-op
    without FSDP2.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
            count += 1
    return count


@contextlib.contextmanager
def activation_checkpointing_off(
    model: torch.nn.Module, checkpointing_kwargs: dict[str, Any] | None = None
) -> Iterator[None]:
    """Activation checkpointing off for a pass, back on afterwards with the trainer's `checkpointing_kwargs`.

    Every pass that switches checkpointing off (no-grad scoring, the influence JVPs) goes through here, so they all
    restore the same state the Trainer set: the same recomputed layers and the same `checkpoint` kwargs.
    """
    checkpointing = is_activation_checkpointing(model)
    if checkpointing:
        disable_activation_checkpointing(model)
    try:
        yield
    finally:
        if checkpointing:
            enable_activation_checkpointing(model, checkpointing_kwargs)


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, gradient_checkpointing_kwargs: dict | None = None) -> Iterator[None]:
    """No grad, eval mode (no dropout) and activation checkpointing off; the previous state is restored on exit.

    `gradient_checkpointing_kwargs`: the trainer's (`args.activation_checkpointing_kwargs`), to restore checkpointing
    as the Trainer enabled it.
    """
    was_training = model.training
    model.eval()
    try:
        with activation_checkpointing_off(model, gradient_checkpointing_kwargs), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def run_log_prob_pass(
    loader: DataLoader,
    forward: BatchForward,
    accelerator: Accelerator,
    num_rows: int,
    *,
    desc: str,
) -> PairLogProbs:
    """Run `forward` over every batch of `loader` and gather `(chosen, rejected[, log_weight])` into row order (fp32,
    CPU): WPO's log-weight travels with the log-probs when the forward gives it (one more float per pair).

    Must be called on every rank: each batch is followed by a gather. Checks first that every rank has as many batches.
    """
    check_same_batch_count(len(loader), accelerator, desc)
    values: list[torch.Tensor] = []  # chosen, rejected and, if the forward gives it, WPO's log-weight
    seen = torch.zeros(num_rows, dtype=torch.bool)
    progress = tqdm(
        loader,
        desc=desc,
        disable=progress_disabled(accelerator),
        leave=False,
    )
    for batch in progress:
        outputs = forward(batch)
        if not values:
            values = [torch.full((num_rows,), float("nan"), dtype=torch.float32) for _ in outputs]
        rows, *gathered = accelerator.gather((batch[ROW_KEY], *(output.float() for output in outputs)))
        rows = rows.cpu()
        for target, value in zip(values, gathered, strict=True):
            target[rows] = value.cpu()
        seen[rows] = True
    if not bool(seen.all()):
        raise RuntimeError(f"{desc}: {int((~seen).sum())} of {num_rows} rows were never scored.")
    if not values:  # no rows, no batches
        values = [torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.float32)]
    return PairLogProbs(*values)
