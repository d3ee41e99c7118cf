"""Per-pair log-probs that the training steps compute anyway, kept by pool row so a selection event can reuse them.

Every DPO training step runs θ (and, unless precomputed, π_ref) over its pairs and sums their completion log-probs.
A selection event needs exactly those sums over the pool: π_ref's never change, so the warm-up epochs (which train
every pair) give them all for free; θ's are those of the step that trained the pair, at most one epoch old by the next
event. This module records them, by pool row, without a single extra forward.

Memory: two `(pool_size, 2)` fp32 buffers on the device (16 bytes per pair: 1.6 MB for 100k pairs), whatever the
model size. Compute: one sum per sequence inside the step, and one gather of the buffers per event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from accelerate import Accelerator

from .scores import PairLogProbs


logger = logging.getLogger(__name__)

POLICY = "policy"
REFERENCE = "reference"
KINDS = (POLICY, REFERENCE)


class TrainingLogProbs:
    """Summed completion log-probs of θ and π_ref from the training forwards, by pool row.

    The training loop hands micro-batches in the sampler's order, so the `k`-th micro-batch of an epoch on this rank
    holds the rows of `sampler.rank_batches()[k]`; `begin_epoch` takes those batches and the index of the first
    micro-batch still to run (non-zero when a checkpoint resumes mid-epoch). Inside each training step,
    `record(modules, completion_mask)` hooks the forwards: the one with gradients is θ's, one without is π_ref's live
    reference forward (TRL runs it under `no_grad`). Each rank records its own rows; `gathered(kind)` combines the ranks.

    Args:
        pool_size (`int`):
            Rows of the training pool.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Where the buffers live (the accelerator's device: recording never synchronises with the host).
    """

    def __init__(self, pool_size: int, device: torch.device | str = "cpu") -> None:
        self.pool_size = pool_size
        self.device = torch.device(device)
        self.buffers = {kind: self._empty() for kind in KINDS}
        self.recording: set[str] = set()
        self._batches: list[list[int]] = []
        self._next_batch = 0
        self._warned = False

    def _empty(self) -> torch.Tensor:
        return torch.full((self.pool_size, 2), float("nan"), dtype=torch.float32, device=self.device)

    def clear(self, kind: str) -> None:
        """Forget every recorded row of `kind`."""
        self.buffers[kind] = self._empty()

    def begin_epoch(self, batches: Sequence[Sequence[int]], first_batch: int, kinds: set[str]) -> None:
        """Record `kinds` over this rank's `batches` of the epoch, starting at micro-batch `first_batch`."""
        self._batches = [list(batch) for batch in batches]
        self._next_batch = first_batch
        self.recording = set(kinds)

    def stop(self) -> None:
        self.recording = set()

    @contextlib.contextmanager
    def record(self, modules: Sequence[torch.nn.Module], completion_mask: torch.Tensor) -> Iterator[None]:
        """Record the log-probs of one training micro-batch computed by the forwards of `modules` in this block.

        `modules` are the unwrapped policy and, if any, the reference model; a forward hook on each sums the fused LM
        head's per-token log-probs over the completion, as TRL's loss does (positions outside the completion carry
        zero log-prob). Without `recording`, or past the epoch's batches, it records nothing.
        """
        if not self.recording or self._next_batch >= len(self._batches):
            yield
            return
        rows = self._batches[self._next_batch]
        self._next_batch += 1
        seq_len = completion_mask.size(1) - 1
        captured: list[tuple[bool, torch.Tensor]] = []

        def hook(module: torch.nn.Module, args, output) -> None:
            log_probs = getattr(output, "log_probs", None)
            if log_probs is not None:
                # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
                captured.append((torch.is_grad_enabled(), log_probs[:, -seq_len:].detach().sum(dim=1).float()))

        handles = [module.register_forward_hook(hook) for module in dict.fromkeys(modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        sums = {
            POLICY: next((value for grad, value in captured if grad), None),
            REFERENCE: next((value for grad, value in captured if not grad), None),
        }
        for kind in self.recording:
            value = sums[kind]
            if value is None:
                continue
            if value.numel() != 2 * len(rows):
                self._give_up(f"a training batch of {value.numel() // 2} pairs where the sampler planned {len(rows)}")
                return
            chosen, rejected = value.chunk(2)
            index = torch.as_tensor(rows, dtype=torch.long, device=value.device)
            self.buffers[kind][index.to(self.device)] = torch.stack([chosen, rejected], dim=1).to(self.device)

    def _give_up(self, why: str) -> None:
        # Never a wrong row: a batch that does not match the sampler's plan voids the epoch's records, and the next
        # event scores those pairs with a pass of its own, as without reuse.
        if not self._warned:
            logger.warning("Not reusing the training log-probs of this epoch: %s.", why)
            self._warned = True
        for kind in self.recording:
            self.clear(kind)
        self.stop()

    def gathered(self, kind: str, accelerator: Accelerator | None = None) -> PairLogProbs:
        """Every rank's records of `kind` combined, on the CPU: NaN for a row no rank recorded.

        Ranks record disjoint rows; a row held by several ranks (restored from a checkpoint on all of them) has the
        same value on each, so the mean over the ranks that hold it is that value. Must run on every rank.
        """
        buffer = self.buffers[kind]
        if accelerator is not None and accelerator.num_processes > 1:
            buffer = accelerator.gather(buffer.to(accelerator.device)).view(
                accelerator.num_processes, self.pool_size, 2
            )
            buffer = buffer.nanmean(dim=0)
        buffer = buffer.float().cpu()
        return PairLogProbs(chosen=buffer[:, 0].clone(), rejected=buffer[:, 1].clone())

    def restore(self, kind: str, log_probs: PairLogProbs) -> None:
        """Put back the records of `kind` a checkpoint saved (the same on every rank)."""
        self.buffers[kind] = torch.stack([log_probs.chosen, log_probs.rejected], dim=1).float().to(self.device)


def missing_rows(log_probs: PairLogProbs) -> list[int]:
    """Rows with no recorded log-prob on either side (never trained in the epochs recorded)."""
    missing = torch.isnan(log_probs.chosen) | torch.isnan(log_probs.rejected)
    return torch.nonzero(missing).flatten().tolist()


def fill_rows(log_probs: PairLogProbs, rows: Sequence[int], values: PairLogProbs | None) -> PairLogProbs:
    """`log_probs` with `rows` replaced by `values` (in `rows` order; `None` when `rows` is empty)."""
    chosen, rejected = log_probs.chosen.clone(), log_probs.rejected.clone()
    if rows:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        chosen[index], rejected[index] = values.chosen.float(), values.rejected.float()
    return PairLogProbs(chosen=chosen, rejected=rejected)
