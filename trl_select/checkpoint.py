"""Selection state in checkpoints: what is saved, how a resume finds its place, and when a checkpoint is refused.

Every `checkpoint-N/` a selective trainer writes holds, next to the HF Trainer's files:

- `trl_select_state.json`: the selection now trained (pool rows), the previous one, where the current epoch began,
  how many batches it has, the aux model's refresh count (it seeds the aux shuffle), and two fingerprints: of the
  training pool (a SHA-256 of the pair ids and of the token columns' Arrow values, with the hashing scheme) and of
  the config fields that decide the selection or the batch order.
- `trl_select_log_probs.safetensors`: the cached π_ref and θ_aux log-probs of the pool (θ_aux's come from an earlier
  policy when `aux_refresh_epochs > 1`, so they cannot be rebuilt from the checkpoint's weights).
- `selection_history.jsonl`: the history file as it was at this step; a resume rewrites the output directory's copy
  from it, so events after the checkpoint are never duplicated.

The files are written atomically and before the Trainer's own `trainer_state.json`, which `train()` needs to resume:
a checkpoint that a kill interrupted is either missing `trainer_state.json` or has all of the above.
The LR schedule's retiming lives in the scheduler's own `state_dict` (`scheduler.pt`), the sampler's order is a pure
function of the seed, the epoch and the selection, so neither needs more here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .history import HISTORY_FILENAME, write_atomically


STATE_FILENAME = "trl_select_state.json"
LOG_PROBS_FILENAME = "trl_select_log_probs.safetensors"
STATE_VERSION = 1

# Config fields that change which pairs are selected, in which order they are trained, or at which LR. A resume with
# any of them changed would not continue the run the checkpoint belongs to, so it is refused.
SELECTION_CONFIG_FIELDS = (
    "selection_rule",
    "lossdiff_lo_percentile",
    "lossdiff_hi_percentile",
    "irm_lo_percentile",
    "irm_hi_percentile",
    "influence_lo_percentile",
    "influence_hi_percentile",
    "selection_fraction",
    "selection_warmup_epochs",
    "selection_strategy",
    "selection_steps",
    "selection_warmup_steps",
    "max_steps",
    "aux_refresh_epochs",
    "scoring_reuse",
    "aux_num_train_epochs",
    "aux_max_steps",
    "aux_learning_rate",
    "aux_batch_size",
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
    # the cached and recorded log-probs are LD-weighted sums and carry WPO's weights
    "ld_alpha",
    "use_weighting",
    "seed",
    "train_sampling_strategy",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
)

# Columns of the tokenized pool that define a pair's content (TRL's DPO tokenization).
_CONTENT_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# How `pool_fingerprint` hashes the tokens; recorded with the fingerprint, so that a checkpoint whose pool was hashed
# another way (the JSON encoding of every token, before this scheme) is refused with the reason, not as another pool.
POOL_FINGERPRINT_SCHEME = "arrow-int64-v2"
# Rows hashed per slice: bounds the int64 copy of a slice's token values (a few tens of MB at most).
_FINGERPRINT_SLICE_ROWS = 16_384


def _hash_list_column(digest: Any, column: Any) -> None:
    """Feed a list column (a pyarrow `ChunkedArray` of lists of integers) into `digest`: first every row's length,
    then every value, each as little-endian int64 in row order.

    The bytes depend only on the rows' contents, not on how the column is chunked, sliced, stored (int32 or int64,
    list or large_list) or mapped through a dataset's indices: the lengths mark where each row ends, so moving a token
    from one row into the next changes the hash too.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    slices = [
        chunk.slice(start, _FINGERPRINT_SLICE_ROWS)
        for chunk in column.chunks
        for start in range(0, len(chunk), _FINGERPRINT_SLICE_ROWS)
    ]
    for part in slices:
        lengths = pc.list_value_length(part).fill_null(-1)  # a null row is not an empty one
        digest.update(lengths.cast(pa.int64()).to_numpy(zero_copy_only=False).astype("<i8", copy=False).tobytes())
    for part in slices:
        values = pc.list_flatten(part)  # the sliced rows' values only, whatever the offsets' base
        if values.null_count:
            values = values.fill_null(-1)
        digest.update(values.cast(pa.int64()).to_numpy(zero_copy_only=False).astype("<i8", copy=False).tobytes())


def pool_fingerprint(pair_ids: list[Any], dataset) -> dict[str, Any]:
    """`{"num_pairs", "sha256", "scheme"}` of the pool: a SHA-256 over the pair ids and the token columns, in row order.

    The tokens are hashed from the dataset's Arrow buffers (`_hash_list_column`), about a second per million pairs;
    any changed, added, removed or moved token changes the hash. Columns that are not lists of integers (none in TRL's
    tokenization) are hashed through their JSON encoding.
    """
    import pyarrow as pa

    digest = hashlib.sha256()
    digest.update(json.dumps(pair_ids, default=str).encode())
    columns = [name for name in _CONTENT_COLUMNS if name in dataset.column_names]
    table = dataset.select_columns(columns).with_format("arrow")
    for name in columns:
        column = table[name]
        digest.update(f"\0{name}\0".encode())
        kind = column.type
        if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type):
            _hash_list_column(digest, column)
        else:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return {"num_pairs": len(pair_ids), "sha256": digest.hexdigest(), "scheme": POOL_FINGERPRINT_SCHEME}


def config_fingerprint(args, world_size: int) -> dict[str, Any]:
    """The selection-relevant config fields (JSON values), plus the world size (it decides the sharding)."""
    values = {name: getattr(args, name, None) for name in SELECTION_CONFIG_FIELDS}
    values["lr_scheduler_type"] = getattr(values["lr_scheduler_type"], "value", values["lr_scheduler_type"])
    values["f_divergence_type"] = getattr(values["f_divergence_type"], "value", values["f_divergence_type"])
    values["world_size"] = world_size
    return json.loads(json.dumps(values, default=str))


@dataclass
class SelectionState:
    """What a checkpoint records of the selection (see the module docstring). Rows are pool rows, ascending."""

    global_step: int
    epoch: int  # the epoch being trained when the checkpoint was written
    epoch_start_step: int  # global step at which that epoch began
    batches_in_epoch: int  # micro-batches per rank in that epoch (the selection's length)
    selected_rows: list[int]
    previous_selection: list[int] | None
    aux_num_refreshes: int
    pool: dict[str, Any]
    config: dict[str, Any]
    version: int = STATE_VERSION
    log_probs: list[str] = field(default_factory=list)  # names of the tensors saved next to this file
    # The "steps" strategy (older checkpoints are "epoch" ones): where the segment under way began, the run's horizon
    # as last estimated, and the rule's kept fraction the next chunk is sized by. The pass's consumed pairs and the
    # segment's rows are tensors (`pass.consumed`, `segment.rows`).
    strategy: str = "epoch"
    segment_start_step: int = 0
    max_steps: int = 0
    keep_estimate: float = 1.0


def save_selection_state(
    checkpoint_dir: str | os.PathLike, state: SelectionState, tensors: dict[str, torch.Tensor], history: bytes
) -> None:
    """Write the state, the cached log-probs and the history into `checkpoint_dir`, each file atomically."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    state.log_probs = sorted(tensors)
    if tensors:
        tmp = directory / f".{LOG_PROBS_FILENAME}.tmp"
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp))
        os.replace(tmp, directory / LOG_PROBS_FILENAME)
    write_atomically(directory / HISTORY_FILENAME, history)
    write_atomically(directory / STATE_FILENAME, json.dumps(asdict(state), indent=1, sort_keys=True).encode())


def load_selection_state(checkpoint_dir: str | os.PathLike) -> tuple[SelectionState, dict[str, torch.Tensor]]:
    """Read what `save_selection_state` wrote; a `ValueError` says what is missing and what to do."""
    directory = Path(checkpoint_dir)
    path = directory / STATE_FILENAME
    if not path.is_file():
        raise ValueError(
            f"Checkpoint {directory} has no selection state ({STATE_FILENAME}): it was not written by a trl_select "
            "trainer (or by a version before 0.2), so the selection it was training cannot be restored. Resume from a "
            "checkpoint this trainer wrote, or start a new run from its weights (`model=<checkpoint dir>`)."
        )
    raw = json.loads(path.read_text())
    if raw.get("version") != STATE_VERSION:
        raise ValueError(
            f"Checkpoint {directory}: {STATE_FILENAME} has version {raw.get('version')}, this trl_select reads version "
            f"{STATE_VERSION}. Resume with the trl_select version that wrote it."
        )
    state = SelectionState(**raw)
    tensors = load_file(str(directory / LOG_PROBS_FILENAME)) if state.log_probs else {}
    if sorted(tensors) != state.log_probs:
        raise ValueError(
            f"Checkpoint {directory}: {LOG_PROBS_FILENAME} holds {sorted(tensors)}, the state lists {state.log_probs}."
            " The checkpoint is incomplete; resume from an earlier one."
        )
    return state, tensors


def check_resumable(state: SelectionState, pool: dict[str, Any], config: dict[str, Any], checkpoint_dir) -> None:
    """Refuse (`ValueError`) a checkpoint whose pool or selection-relevant config differs from this run's."""
    if state.pool.get("scheme") != pool.get("scheme"):
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: its training pool was fingerprinted by an earlier trl_select "
            f"(hashing scheme {state.pool.get('scheme', 'json-v1')!r}; this version uses {pool.get('scheme')!r}), so "
            "whether this trainer's pool is the one it was trained on cannot be checked. Resume with the trl_select "
            "version that wrote the checkpoint, or start a new run from its weights (`model=<checkpoint dir>`) "
            "without `resume_from_checkpoint`."
        )
    if state.pool != pool:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: it was trained on a different training pool ({state.pool['num_pairs']}"
            f" pairs, sha256 {state.pool['sha256'][:12]}...) than this trainer's ({pool['num_pairs']} pairs, sha256 "
            f"{pool['sha256'][:12]}...). Pass the same `train_dataset` (same rows, order, ids and tokenization: same "
            "tokenizer and `max_length`), or start a new run without `resume_from_checkpoint`."
        )
    # A field the checkpoint does not record (written before the field counted) is not compared.
    changed = {
        name: (state.config.get(name), value)
        for name, value in config.items()
        if name in state.config and state.config[name] != value
    }
    if changed:
        details = ", ".join(
            f"`{name}`: {old!r} in the checkpoint, {new!r} now" for name, (old, new) in changed.items()
        )
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: selection settings differ ({details}). Resuming would not continue "
            "the same run. Restore these settings, or start a new run from the checkpoint's weights "
            "(`model=<checkpoint dir>`) without `resume_from_checkpoint`."
        )


def resume_position(state: SelectionState, global_step: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """`(epochs_trained, batches_trained_in_current_epoch)` for the HF Trainer's resume, from the saved epoch.

    The Trainer's own arithmetic, `global_step // update_steps_per_epoch`, assumes every epoch is as long as the full
    pool. Here the epoch is the one the checkpoint recorded: `k = global_step - epoch_start_step` of its
    `ceil(batches / accumulation)` optimizer steps are done. If all are, the next epoch starts from its first batch
    (and runs its selection); else the Trainer skips the `k * accumulation` batches already trained (an epoch's only
    partial accumulation is its last step, so every earlier step is a full one).
    """
    steps_done = global_step - state.epoch_start_step
    steps_in_epoch = -(-state.batches_in_epoch // gradient_accumulation_steps)
    if not 0 <= steps_done <= steps_in_epoch:
        raise ValueError(
            f"The selection state says epoch {state.epoch} began at step {state.epoch_start_step} and has "
            f"{steps_in_epoch} steps, which does not contain the checkpoint's global step {global_step}. The "
            "checkpoint is inconsistent; resume from an earlier one."
        )
    if steps_done == steps_in_epoch:
        return state.epoch + 1, 0
    return state.epoch, steps_done * gradient_accumulation_steps
