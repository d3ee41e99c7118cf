"""Per-pair log-probs that the training steps compute anyway, kept by pool row so a selection event can reuse them.

Every DPO training step runs θ (and, unless precomputed or injected, π_ref) over its pairs and sums their completion
log-probs. A selection event needs exactly those sums over the pool: π_ref's never change, so the warm-up epochs
(which train every pair) give them all for free; θ's are those of the step that trained the pair, at most one epoch
old by the next event. This module records them, by pool row, without a single extra forward.

Each training batch carries its pairs' pool rows (`TrainingRowsCollator`), so a value is written at its own row
whatever order the dataloader hands the batches in (worker processes, `dataloader_in_order=False`, a resume).
A forward that dropout perturbs is never recorded (`active_dropout`): the event scores those pairs with a pass of its
own, in eval mode.

The sums are those of TRL's loss, through the same pure functions as every scoring pass (`scores.completion_sums`:
LD-DPO's down-weighted tail with `ld_alpha`); with `use_weighting`, θ's records also keep WPO's per-pair log-weight
(`scores.wpo_log_weights`) from the step's `log_sum_sq_probs`, the weight TRL multiplied that step's loss by.

Memory: two `(pool_size, 2)` fp32 buffers on the device (16 bytes per pair: 1.6 MB for 100k pairs; `(pool_size, 3)`,
24 bytes per pair, with WPO), whatever the model size. Compute: one sum per sequence inside the step. Collectives:
combining the ranks' records is one all-reduce of a flag, and, if any rank recorded anything, one all-reduce of a
`(pool_size, 4)` fp32 tensor (`(pool_size, 6)` with WPO: 16 or 24 bytes per pair, whatever the world size).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn.modules.dropout import _DropoutNd

from .scores import PairLogProbs, completion_sums, wpo_log_weights


logger = logging.getLogger(__name__)

POLICY = "policy"
REFERENCE = "reference"
KINDS = (POLICY, REFERENCE)
# The key under which a training batch carries its pairs' pool rows; the trainer removes it before TRL's loss, which
# would otherwise pass it to the model.
POOL_ROWS_KEY = "trl_select_pool_rows"


class TrainingRowsCollator:
    """Wraps the training collator so every batch also carries the pool rows of its pairs, under `POOL_ROWS_KEY`.

    Args:
        collator (`Callable`):
            The trainer's collator (TRL's preference collator), called on the examples without `index_key`.
        index_key (`str`):
            The column of each example that identifies its pair (the trainer's row index before TRL's filtering).
        pool_row_of_index (`np.ndarray`):
            The pool row (row of the tokenized training dataset) of each value of `index_key`.
    """

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], index_key: str, pool_row_of_index: np.ndarray
    ) -> None:
        self.collator = collator
        self.index_key = index_key
        self.pool_row_of_index = np.asarray(pool_row_of_index, dtype=np.int64)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [example.pop(self.index_key) for example in examples]
        batch = self.collator(examples)
        batch[POOL_ROWS_KEY] = torch.as_tensor(self.pool_row_of_index[indices], dtype=torch.long)
        return batch


def active_dropout(module: torch.nn.Module, adapters_off: bool = False) -> list[str]:
    """The parts of `module` that would perturb its next forward at random: names of modules in training mode that are
    dropout layers with `p > 0`, or that hold a positive float attribute named like a dropout or jitter rate.

    The attribute check covers the models that drop activations functionally (`attention_dropout`, `dropout_p`,
    `activation_dropout`, `layerdrop`, `jitter_noise`, ... used only when `self.training`), which TRL's
    `disable_dropout` (it zeroes `nn.Dropout` layers only) leaves on. One walk over the modules: about 10 µs per module
    on a CPU core, so the trainer checks once per epoch. With `adapters_off`, the forward runs with PEFT adapters disabled, so the
    adapters' own layers (a LoRA layer's `lora_dropout`) are left out: only each tuner layer's `base_layer` runs.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without PEFT there are no adapters to leave out
        BaseTunerLayer = ()  # noqa: N806
    skipped: set[int] = set()  # ids of the adapters' modules (`named_modules` visits a layer before its children)
    found = []
    for name, sub in module.named_modules():
        if id(sub) in skipped:
            continue
        if adapters_off and isinstance(sub, BaseTunerLayer):
            for child_name, child in sub.named_children():
                if child_name != "base_layer":
                    skipped.update(id(part) for part in child.modules())
        if not sub.training:
            continue
        if isinstance(sub, _DropoutNd):
            if sub.p > 0:
                found.append(name)
            continue
        for attribute, value in sub.__dict__.items():
            if type(value) is float and value > 0 and ("drop" in attribute or "jitter" in attribute):
                found.append(f"{name}.{attribute}" if name else attribute)
    return found


def record_terms(buffer: torch.Tensor) -> torch.Tensor:
    """One rank's share of the cross-rank combine: `(pool, 2k)` = the `k` recorded columns (chosen, rejected and, with
    WPO, the log-weight) with NaN as 0, then their counts."""
    recorded = ~torch.isnan(buffer)
    return torch.cat([torch.where(recorded, buffer, torch.zeros_like(buffer)), recorded.to(buffer.dtype)], dim=1)


def combine_terms(terms: torch.Tensor) -> torch.Tensor:
    """The `(pool, k)` records from the sum over ranks of `record_terms`: the mean of the ranks that recorded a row,
    NaN where none did."""
    width = terms.size(1) // 2
    sums, counts = terms[:, :width], terms[:, width:]
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


class TrainingLogProbs:
    """Summed completion log-probs of θ and π_ref from the training forwards, by pool row.

    `begin_epoch(kinds)` says which kinds this epoch's steps record. Inside each training step,
    `record(modules, completion_mask, rows)` hooks the forwards: the one with gradients is θ's, one without is π_ref's
    live reference forward (TRL runs it under `no_grad`); each pair's sums go to its pool row in `rows`. Each rank
    records its own rows; `combined(kind)` combines the ranks.

    Args:
        pool_size (`int`):
            Rows of the training pool.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Where the buffers live (the accelerator's device: recording never synchronises with the host).
        ld_alpha (`float`, *optional*):
            TRL's `ld_alpha`: the sums are LD-DPO's (`scores.completion_sums`), as the step's loss forms them.
        use_weighting (`bool`, *optional*, defaults to `False`):
            TRL's `use_weighting`: θ's records also keep WPO's per-pair log-weight (a third column; π_ref's stays NaN,
            no loss reads a reference weight).
    """

    def __init__(
        self,
        pool_size: int,
        device: torch.device | str = "cpu",
        ld_alpha: float | None = None,
        use_weighting: bool = False,
    ) -> None:
        self.pool_size = pool_size
        self.device = torch.device(device)
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting
        self.width = 3 if use_weighting else 2  # chosen, rejected[, log_weight]
        self.buffers = {kind: self._empty() for kind in KINDS}
        self.recording: set[str] = set()
        self._warned: set[str] = set()

    def _empty(self) -> torch.Tensor:
        return torch.full((self.pool_size, self.width), float("nan"), dtype=torch.float32, device=self.device)

    def clear(self, kind: str) -> None:
        """Forget every recorded row of `kind`."""
        self.buffers[kind] = self._empty()

    def begin_epoch(self, kinds: set[str]) -> None:
        """Record `kinds` in this epoch's training steps."""
        self.recording = set(kinds)

    def stop(self) -> None:
        self.recording = set()

    def give_up(self, kind: str, why: str) -> None:
        """Stop recording `kind` and forget its records: the next event scores those pairs with a pass of its own."""
        if kind not in self.recording:
            return
        if kind not in self._warned:
            logger.warning(
                "Not reusing the training steps' %s log-probs: %s. The next selection event runs a pass.", kind, why
            )
            self._warned.add(kind)
        self.clear(kind)
        self.recording.discard(kind)

    @contextlib.contextmanager
    def record(
        self, modules: Sequence[torch.nn.Module], completion_mask: torch.Tensor, rows: torch.Tensor
    ) -> Iterator[None]:
        """Record the log-probs of one training micro-batch, whose pairs are the pool rows `rows`, computed by the
        forwards of `modules` in this block.

        `modules` are the unwrapped policy and, if any, the reference model; a forward hook on each keeps the fused LM
        head's per-token log-probs (and, with WPO, `log_sum_sq_probs`), which are summed over the completion after the
        block as TRL's loss sums them (`completion_sums`, `wpo_log_weights`; positions outside the completion carry
        zero log-prob). Without `recording` it records nothing.
        """
        if not self.recording:
            yield
            return
        shift_completion_mask = completion_mask[..., 1:]
        seq_len = shift_completion_mask.size(1)
        captured: list[tuple[bool, Any]] = []

        def hook(module: torch.nn.Module, args, output) -> None:
            log_probs = getattr(output, "log_probs", None)
            if log_probs is not None:
                # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
                log_sum_sq = getattr(output, "log_sum_sq_probs", None)
                captured.append(
                    (
                        torch.is_grad_enabled(),
                        log_probs[:, -seq_len:].detach(),
                        None if log_sum_sq is None else log_sum_sq[:, -seq_len:].detach(),
                    )
                )

        handles = [module.register_forward_hook(hook) for module in dict.fromkeys(modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        forwards = {
            POLICY: next((forward for forward in captured if forward[0]), None),
            REFERENCE: next((forward for forward in captured if not forward[0]), None),
        }
        for kind in sorted(self.recording):
            forward = forwards[kind]
            if forward is None:
                continue
            _, per_token, log_sum_sq = forward
            if per_token.size(0) != 2 * rows.numel():
                self.give_up(
                    kind, f"a training batch of {per_token.size(0) // 2} pairs carried {rows.numel()} pool rows"
                )
                continue
            mask = shift_completion_mask.to(per_token.device)
            chosen, rejected = completion_sums(per_token, mask, self.ld_alpha).float().chunk(2)
            columns = [chosen, rejected]
            if self.use_weighting:
                if kind == POLICY and log_sum_sq is None:
                    self.give_up(kind, "the policy's fused LM head returned no `log_sum_sq_probs` for WPO's weights")
                    continue
                # π_ref's weight is never read (WPO weights the loss by the trained model's own weight)
                weight = wpo_log_weights(per_token, log_sum_sq, mask).float() if kind == POLICY else None
                columns.append(torch.full_like(chosen, float("nan")) if weight is None else weight)
            self.buffers[kind][rows.to(self.device)] = torch.stack(columns, dim=1).to(self.device)

    def combined(self, kind: str, accelerator: Accelerator | None = None) -> PairLogProbs:
        """Every rank's records of `kind` combined, on the CPU: NaN for a row no rank recorded.

        Ranks record disjoint rows within an epoch; a row recorded by several ranks (in two warm-up epochs) gets the
        mean of their values. Must run on every rank: one all-reduce of a flag, and one of `(pool_size, 4)` fp32 unless
        no rank recorded anything.
        """
        buffer = self.buffers[kind]
        if accelerator is not None and accelerator.num_processes > 1:
            recorded = torch.tensor([float(not bool(torch.isnan(buffer).all()))], device=accelerator.device)
            # Every rank gets the same flag, so every rank runs, or skips, the same collectives.
            if float(accelerator.reduce(recorded, reduction="sum").item()) == 0.0:
                buffer = torch.full_like(buffer, float("nan"))
            else:
                terms = accelerator.reduce(record_terms(buffer.to(accelerator.device)), reduction="sum")
                buffer = combine_terms(terms)
        buffer = buffer.float().cpu()
        log_weight = buffer[:, 2].clone() if self.use_weighting and kind == POLICY else None
        return PairLogProbs(chosen=buffer[:, 0].clone(), rejected=buffer[:, 1].clone(), log_weight=log_weight)

    def restore(self, kind: str, log_probs: PairLogProbs, keep: bool = True) -> None:
        """Put back the records of `kind` a checkpoint saved (already combined over the ranks).

        `keep=False` on every rank but one: the combine then finds each restored value on one rank only, so it gives
        the value back exactly (a mean over ranks holding the same value need not, in floating point).
        """
        self.clear(kind)
        if keep:
            columns = [log_probs.chosen, log_probs.rejected]
            if self.use_weighting:
                weight = log_probs.log_weight
                columns.append(torch.full_like(log_probs.chosen, float("nan")) if weight is None else weight)
            self.buffers[kind] = torch.stack(columns, dim=1).float().to(self.device)


def missing_rows(log_probs: PairLogProbs) -> list[int]:
    """Rows with no recorded value on either side (never trained in the epochs recorded), or, when the log-probs carry
    WPO's log-weight, no weight."""
    missing = torch.isnan(log_probs.chosen) | torch.isnan(log_probs.rejected)
    if log_probs.log_weight is not None:
        missing |= torch.isnan(log_probs.log_weight)
    return torch.nonzero(missing).flatten().tolist()


def fill_rows(log_probs: PairLogProbs, rows: Sequence[int], values: PairLogProbs | None) -> PairLogProbs:
    """`log_probs` with `rows` replaced by `values` (in `rows` order; `None` when `rows` is empty). WPO's log-weight
    is kept when either carries one (NaN where neither gave it)."""
    chosen, rejected = log_probs.chosen.clone(), log_probs.rejected.clone()
    log_weight = None if log_probs.log_weight is None else log_probs.log_weight.clone()
    if rows and values is not None and values.log_weight is not None and log_weight is None:
        log_weight = torch.full_like(chosen, float("nan"))
    if rows:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        chosen[index], rejected[index] = values.chosen.float(), values.rejected.float()
        if log_weight is not None:
            log_weight[index] = (
                values.log_weight.float() if values.log_weight is not None else torch.tensor(float("nan"))
            )
    return PairLogProbs(chosen=chosen, rejected=rejected, log_weight=log_weight)
