"""Checks on the user's preference data, run on the raw datasets before TRL tokenizes them or any model runs.

Each check raises with the dataset, the column, the first offending rows (row index and `id`) and the fix, so that
a bad row fails in seconds instead of as a NaN or a crash an epoch later.

Accepted, as in TRL's `DPOTrainer`: `chosen`/`rejected` as strings or conversations (lists of `{"role", "content"}`
messages), `prompt` likewise or absent (TRL then extracts the shared prefix of `chosen` and `rejected`); a dataset
already tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`) is not checked here. Empty prompts are allowed (a
preference between two unconditioned completions is valid data); empty completions are not. Vision-language datasets
(an `images`/`image` column) are refused: TRL does not tokenize them, and selection scores tokenized text pairs.

Also here: `check_distributed_setup_supported`, which refuses FSDP1 and tensor/context/sequence parallelism with
selection, from the config and again when the trainer is built.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from .sampler import num_rank_batches
from .schedule import update_steps_per_epoch
from .segments import resolve_steps


TEXT_COLUMNS = ("prompt", "chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_MAX_ROWS_NAMED = 5
_SCAN_BATCH_SIZE = 1024


def _name_rows(rows: list[tuple[int, Any]]) -> str:
    """`row 3 (id 'a'), row 7 (id 'b')`, the first few only."""
    named = [f"row {row} (id {pair_id!r})" if pair_id is not None else f"row {row}" for row, pair_id in rows]
    more = f" and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    return ", ".join(named[:_MAX_ROWS_NAMED]) + more


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not str(message["content"]).strip() for message in value)


# The columns by which TRL's DPOTrainer recognises a vision-language dataset (`_is_vision_dataset`).
VISION_COLUMNS = ("images", "image")


def check_not_vision(dataset: Dataset, name: str) -> None:
    """Refuse a vision-language dataset (an `images` or `image` column), naming the column and the way out.

    TRL's `DPOTrainer` treats a dataset whose first row has such a key as vision data: it skips tokenization up front
    and processes images and text per batch in its vision collator. Selection rescores the whole pool from the
    tokenized `prompt_ids`/`chosen_ids`/`rejected_ids`, which such a dataset never gets, so without this check the
    warm-up epoch trains and the run then fails at the first selection event.
    """
    column = next((c for c in VISION_COLUMNS if c in dataset.column_names), None)
    if column is not None:
        raise ValueError(
            f"`{name}` has an `{column}` column, so TRL treats it as vision-language data and does not tokenize it "
            "up front; selection rescores the pool from tokenized text pairs (`prompt_ids`/`chosen_ids`/"
            "`rejected_ids`), so selection on vision-language data is not supported. Set `selection_rule='none'` to "
            f"train it as plain DPO, or, if the text alone is what you mean to train on, drop the column with "
            f"`dataset.remove_columns({column!r})`."
        )


def check_preference_rows(dataset: Dataset, name: str) -> None:
    """Raise (`ValueError`/`TypeError`) naming `name`, the column, the rows and the fix, for any malformed pair.

    Checks: `chosen` and `rejected` columns present; every `prompt`/`chosen`/`rejected` value a string or a
    conversation; no empty `chosen`/`rejected`; `chosen != rejected` (such a pair has `h_θ(z) = 0` for every θ, so it
    carries no preference and only dilutes the percentiles); `id`, if present, set on every row and unique.
    """
    columns = set(dataset.column_names)
    if set(TOKENIZED_COLUMNS) <= columns:
        return
    missing = [column for column in ("chosen", "rejected") if column not in columns]
    if missing:
        raise ValueError(
            f"`{name}` has no {' or '.join(f'`{c}`' for c in missing)} column (columns: {sorted(columns)}). A "
            "preference dataset needs `chosen` and `rejected` (and usually `prompt`); rename yours with "
            "`dataset.rename_column(old, new)`."
        )
    text_columns = [column for column in TEXT_COLUMNS if column in columns]
    has_id = "id" in columns
    wrong_type: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    empty: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    identical: list[tuple[int, Any]] = []
    missing_id: list[tuple[int, Any]] = []
    rows_of_id: dict[Any, list[int]] = defaultdict(list)
    offset = 0
    scanned = dataset.select_columns(text_columns + (["id"] if has_id else []))
    for batch in scanned.iter(batch_size=_SCAN_BATCH_SIZE):
        size = len(batch["chosen"])
        for i in range(size):
            row = offset + i
            pair_id = batch["id"][i] if has_id else None
            if has_id:
                if pair_id is None:
                    missing_id.append((row, None))
                else:
                    rows_of_id[pair_id].append(row)
            values = {column: batch[column][i] for column in text_columns}
            bad = [c for c, v in values.items() if not (isinstance(v, str) or _is_conversation(v))]
            for column in bad:
                wrong_type[column].append((row, pair_id))
            for column in ("chosen", "rejected"):
                if column not in bad and _is_empty(values[column]):
                    empty[column].append((row, pair_id))
            if not bad and values["chosen"] == values["rejected"]:
                identical.append((row, pair_id))
        offset += size
    for column, rows in wrong_type.items():
        example = dataset[rows[0][0]][column]
        raise TypeError(
            f"`{name}` column `{column}` must hold strings or conversations (lists of {{'role', 'content'}} "
            f"messages); {len(rows)} row(s) do not, e.g. {type(example).__name__} {example!r:.60} at "
            f"{_name_rows(rows)}. Fix or drop those rows (`dataset.filter(...)`)."
        )
    for column, rows in empty.items():
        raise ValueError(
            f"`{name}` column `{column}` is empty in {len(rows)} row(s): {_name_rows(rows)}. An empty completion has "
            "no tokens to score; drop those rows (`dataset.filter(...)`)."
        )
    if identical:
        raise ValueError(
            f"`{name}` has {len(identical)} pair(s) whose `chosen` equals `rejected`: {_name_rows(identical)}. Such a "
            "pair states no preference (its reward margin is 0 for every model); drop it, e.g. "
            "`dataset.filter(lambda r: r['chosen'] != r['rejected'])`."
        )
    if missing_id:
        raise ValueError(
            f"`{name}` column `id` is missing (None) in {len(missing_id)} row(s): {_name_rows(missing_id)}. Give every"
            " pair an id, or remove the `id` column to use row indices."
        )
    duplicates = {pair_id: rows for pair_id, rows in rows_of_id.items() if len(rows) > 1}
    if duplicates:
        shown = "; ".join(f"id {pair_id!r} at rows {rows}" for pair_id, rows in list(duplicates.items())[:5])
        raise ValueError(
            f"`{name}` column `id` has {len(duplicates)} duplicated value(s): {shown}. Pair ids must be unique (the "
            "selection history records pairs by id); deduplicate the rows or remove the `id` column to use row indices."
        )


def check_enough_validation_pairs(num_pairs: int, batch_size: int, world_size: int, what: str) -> None:
    """The aux model's alignment stage needs at least one batch per rank: `num_pairs >= batch_size * world_size`."""
    if num_pairs < batch_size * world_size:
        raise ValueError(
            f"{what} has {num_pairs} pairs, fewer than one aux batch per rank ({batch_size} x {world_size} ranks = "
            f"{batch_size * world_size}). Add validation pairs (from TRL's `dpo.py`: a larger `--dataset_test_split`), "
            "or lower `aux_batch_size` (`--aux_batch_size`; defaults to `per_device_train_batch_size`)."
        )


def min_selection_size(batch_size: int, world_size: int) -> int:
    """The fewest pairs a selection may keep: one full batch on every rank."""
    return batch_size * world_size


def check_bands_can_fill_a_batch(pool_size: int, bands: dict[str, tuple[float, float]], minimum: int) -> None:
    """Refuse bands that would keep fewer than `minimum` pairs of `pool_size` (score bands taken as independent).

    A single band keeps about `pool_size * (hi - lo) / 100` pairs; LossDiff-IRM about the product of the two
    fractions (docs/design.md §4.3: 64% for 10-90 bands). Below one batch per rank, the run would stop at its first selection.
    """
    expected = float(pool_size)
    for lo, hi in bands.values():
        expected *= (hi - lo) / 100
    if expected < minimum:
        names = ", ".join(
            f"`{score}_lo_percentile`/`{score}_hi_percentile` = {lo}/{hi}" for score, (lo, hi) in bands.items()
        )
        raise ValueError(
            f"The selection bands ({names}) keep about {expected:.1f} of the {pool_size} training pairs, fewer than "
            f"one batch per rank ({minimum}). Widen the bands or add training pairs."
        )


# Built-in rules that keep a fixed fraction of the pool (`selection_fraction`) instead of percentile bands.
FRACTION_RULES = ("reward_gap", "davir")


def check_fraction_can_fill_a_batch(pool_size: int, fraction: float, minimum: int) -> None:
    """Refuse a `selection_fraction` that keeps fewer than `minimum` of `pool_size` pairs (it keeps round(f·N))."""
    kept = max(1, round(fraction * pool_size))
    if kept < minimum:
        raise ValueError(
            f"`selection_fraction={fraction}` keeps {kept} of the {pool_size} training pairs, fewer than one batch per "
            f"rank ({minimum}). Raise `selection_fraction` to at least {minimum / pool_size:.3g} or add training pairs."
        )


# ----- distributed setups selection does not support -----

SUPPORTED_DISTRIBUTED = (
    "Supported with selection: one process, DDP (`accelerate launch --multi_gpu`, recipes/accelerate_configs/"
    "multi_gpu.yaml), DeepSpeed ZeRO-2 or ZeRO-3 (deepspeed_zero2.yaml / deepspeed_zero3.yaml), or FSDP2 without "
    "parameter offload or FSDP's own activation checkpointing (fsdp2.yaml; `aux_mode='lora'` or a PEFT policy); or set "
    "`selection_rule='none'` to train as plain `DPOTrainer`."
)
_TRUE_FLAGS = ("1", "true", "yes", "y", "on")


def _as_size(value: Any) -> int:
    """A parallel size as an int; unset (`None`) or `"auto"` count as 1 (no splitting was asked for)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


def _flag(value: Any) -> bool:
    """A boolean setting given as a bool, a string (`"true"`, `"1"`, ...) or an offload policy object (`cpu_offload`)."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_FLAGS
    if value is None or isinstance(value, bool):
        return bool(value)
    # FSDP2's offload policies: `CPUOffloadPolicy` offloads, the base `OffloadPolicy` is "no offload"
    return type(value).__name__ not in ("OffloadPolicy", "CPUOffload") or bool(getattr(value, "offload_params", False))


@dataclass(frozen=True)
class FsdpSetup:
    """FSDP as a run asks for it: where it was seen, its version (`None`: not known) and the two options selection
    refuses under it (CPU parameter offload, FSDP's own activation checkpointing)."""

    source: str
    version: int | None
    offload: bool = False
    activation_checkpointing: bool = False


def fsdp_setup(args: Any, environ: Any = None, accelerator: Any = None) -> FsdpSetup | None:
    """The FSDP this run uses, from the arguments, the environment or a built accelerator; `None` without FSDP.

    - `fsdp=...` with `fsdp_config`: transformers 5.23 builds an FSDP2 plugin unless `fsdp_config['version'] = 1`.
    - `ACCELERATE_USE_FSDP` (`accelerate launch --use_fsdp` or an FSDP config file): the version is `FSDP_VERSION`,
      which accelerate 1.15 defaults to 1 when the launch does not set it.
    - the accelerator's FSDP plugin (the trainer's, or a pre-configured state's): its `fsdp_version`.
    """
    environ = os.environ if environ is None else environ
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if accelerator is not None else None
    if plugin is not None:
        version = getattr(plugin, "fsdp_version", None)
        return FsdpSetup(
            "the Accelerator's FSDP plugin",
            int(version) if version is not None else None,
            _flag(getattr(plugin, "cpu_offload", False)),
            _flag(getattr(plugin, "activation_checkpointing", False)),
        )
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        config = getattr(args, "fsdp_config", None) or {}
        return FsdpSetup(
            f"`fsdp={fsdp!r}`",
            int(config.get("version", 2)),
            _flag(config.get("cpu_offload", config.get("offload_params", False))),
            _flag(config.get("activation_checkpointing", False)),
        )
    flag = environ.get("ACCELERATE_USE_FSDP", "")
    if flag.strip().lower() in _TRUE_FLAGS:
        return FsdpSetup(
            f"`ACCELERATE_USE_FSDP={flag}` (`accelerate launch --use_fsdp` or an FSDP config)",
            _as_size(environ.get("FSDP_VERSION", "1")),
            _flag(environ.get("FSDP_OFFLOAD_PARAMS", "false")),
            _flag(environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false")),
        )
    return None


def _fsdp_refusals(setup: FsdpSetup) -> list[str]:
    """What of `setup` selection does not run under, each as "`setting` (why)"; empty for a supported FSDP2."""
    if setup.version != 2:
        version = "of unknown version" if setup.version is None else f"version {setup.version}"
        return [
            f"{setup.source}: FSDP {version} (only FSDP2 is supported with selection: FSDP1 flattens each wrapped "
            "module's parameters into one FlatParameter, so the aux adapter added after wrapping and the per-rank "
            "forwards of the scoring passes are untested there; transformers deprecates FSDP1. Set "
            "`fsdp_config['version'] = 2` or `fsdp_version: 2` in the accelerate config)"
        ]
    found = []
    if setup.offload:
        found.append(
            f"{setup.source}: FSDP2 with CPU parameter offload (untested with selection: the aux adapter or injected "
            "LoRA layers are plain parameters outside FSDP's groups, placed where PEFT puts them, not where FSDP "
            "moves the offloaded shards for compute)"
        )
    if setup.activation_checkpointing:
        found.append(
            f"{setup.source}: FSDP2 with FSDP's own activation checkpointing (untested with selection: it wraps the "
            "layers in checkpoint wrappers that the scoring passes cannot switch off; use the Trainer's "
            "`gradient_checkpointing=True`, which is tested under FSDP2)"
        )
    return found


def unsupported_distributed_settings(
    args: Any, model: Any = None, environ: Any = None, accelerator: Any = None
) -> list[str]:
    """Every setting that shards the model or splits a sequence across ranks in a way selection does not support,
    each as "`setting` (what it is)".

    Selection scores every pair with per-rank forwards whose summed log-probs are gathered pair by pair (scoring.py),
    builds the auxiliary model as a second adapter or a plain copy with its own optimizer (auxiliary.py), and gives
    each data-parallel rank an equal share of the selected pairs (sampler.py). FSDP2 (`fully_shard`) is supported:
    every rank runs the same forwards, the aux adapter is added after sharding as plain whole parameters, and the
    policy's sharded parameters are registered again before each aux build (`reshard_fsdp`). FSDP1, FSDP2 with CPU
    offload or with FSDP's own activation checkpointing are not tested and refused (`_fsdp_refusals`); a full-copy
    aux under FSDP2 is refused by the trainer (`check_fsdp_aux_supported`: FSDP2 modules cannot be deep-copied).
    Under tensor, context or sequence parallelism a rank sees only part of a layer or of a sequence, so its log-probs
    are partial and ranks are not data-parallel replicas: refused. `parallelism_config.dp_shard_size > 1` (FSDP2
    over an accelerate device mesh) is not tested and refused too.

    `accelerator`, once the Trainer has built it, is checked too: an `AcceleratorState` configured before the trainer
    (`use_configured_state`) can carry an FSDP plugin or a parallelism config that no argument shows.
    """
    environ = os.environ if environ is None else environ
    found: list[str] = []
    setup = fsdp_setup(args, environ, accelerator)
    if setup is not None:
        found += _fsdp_refusals(setup)
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is None and accelerator is not None:
        parallelism = getattr(accelerator, "parallelism_config", None)
    if parallelism is not None:
        for name, what in (
            ("dp_shard_size", "FSDP sharding over an accelerate device mesh, untested with selection"),
            ("tp_size", "tensor parallelism"),
            ("cp_size", "context parallelism"),
            ("sp_size", "sequence parallelism"),
        ):
            size = _as_size(getattr(parallelism, name, None))
            if size > 1:
                found.append(f"`parallelism_config.{name}={size}` ({what})")
    deepspeed = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    autotp = _as_size((deepspeed.get("tensor_parallel") or {}).get("autotp_size"))
    if autotp > 1:
        found.append(f"DeepSpeed `tensor_parallel.autotp_size={autotp}` (DeepSpeed AutoTP tensor parallelism)")
    tp_plan = (getattr(args, "model_init_kwargs", None) or {}).get("tp_plan")
    if isinstance(model, str) and tp_plan is not None:
        found.append(f"`model_init_kwargs['tp_plan']={tp_plan!r}` (loads the model tensor-parallel)")
    if model is not None and not isinstance(model, str):
        model_tp = max(_as_size(getattr(model, "_tp_size", None)), _as_size(getattr(model, "tp_size", None)))
        if model_tp > 1:
            found.append(f"the model is tensor-parallel (`tp_size={model_tp}`: loaded with `tp_plan`)")
    return found


def check_distributed_setup_supported(
    args: Any, model: Any = None, environ: Any = None, accelerator: Any = None
) -> None:
    """Raise a `ValueError` naming each unsupported FSDP / tensor / context / sequence parallel setting, when selection
    is on."""
    if getattr(args, "selection_rule", "none") == "none":
        return  # the trainer is exactly DPOTrainer: whatever TRL supports
    found = unsupported_distributed_settings(args, model, environ, accelerator)
    if found:
        raise ValueError(
            f"{'; '.join(found)}: not supported with `selection_rule={args.selection_rule!r}`. Selection gathers "
            "whole-sequence log-probs per pair from data-parallel replicas and builds an auxiliary model beside the "
            "policy, which these sharded or split setups do not provide or are not tested with. "
            + SUPPORTED_DISTRIBUTED
        )


# The error torch 2.13 raises when a module `fully_shard` has wrapped is deep-copied (what the plain full-copy aux does)
FSDP2_DEEPCOPY_ERROR = "AssertionError: FSDP does not support deepcopy. Please use state dict for serialization."


def check_fsdp_aux_supported(args: Any, peft_policy: bool, environ: Any = None, accelerator: Any = None) -> None:
    """Refuse `aux_mode='full'` on a fully fine-tuned policy under FSDP2, when the rule needs θ_aux.

    The full-copy aux is `copy.deepcopy(policy)` outside DeepSpeed, and torch refuses to deep-copy a module that
    `fully_shard` wrapped (`FSDP2_DEEPCOPY_ERROR`, at the first selection event). Building a second sharded model
    from the policy's state dict (as the DeepSpeed path builds its own engine) is not implemented. A PEFT policy's aux
    is a second adapter, and `aux_mode='lora'` injects LoRA layers into the sharded policy in place: both supported.
    """
    if getattr(args, "selection_rule", "none") == "none" or not getattr(args, "needs_auxiliary", False):
        return
    if peft_policy or getattr(args, "aux_mode", "lora") != "full":
        return
    setup = fsdp_setup(args, environ, accelerator)
    if setup is not None and setup.version == 2:
        raise ValueError(
            f"`aux_mode='full'` under FSDP2 ({setup.source}): not supported with "
            f"`selection_rule={args.selection_rule!r}`. The full-copy θ_aux is a deep copy of the policy, and torch "
            f"refuses to deep-copy a module `fully_shard` wrapped ({FSDP2_DEEPCOPY_ERROR}); a sharded copy built from "
            "the policy's state dict is not implemented. Use `aux_mode='lora'` (the default: LoRA layers injected into "
            "the sharded policy for the aux stage), or a PEFT policy (θ_aux is then a second adapter)."
        )


@dataclass(frozen=True)
class EventSchedule:
    """When a run's selection events happen (`selection_strategy` resolved against the run's length).

    `horizon` is the run's steps as the Trainer sizes them from the full pool (`max_steps`, or `num_train_epochs`
    full-pool epochs); `warmup_steps` and `interval` are the `"steps"` strategy's, in optimizer steps.
    """

    strategy: str
    horizon: int
    warmup_steps: int
    interval: int
    steps_per_epoch: int


def event_schedule(
    args: Any, pool_size: int, batch_size: int, world_size: int, rule_needs: set[str] | frozenset[str]
) -> EventSchedule:
    """Resolve `selection_strategy`, `selection_steps` and `selection_warmup_steps` for a pool of `pool_size` pairs
    trained `batch_size` per rank on `world_size` ranks, refusing (`ValueError`, naming the flag and the fix) a
    schedule with no event in the run or an interval shorter than one optimizer step. `rule_needs` are the inputs
    the rule's scores need (`registry.scorer_needs`)."""
    steps_per_epoch = update_steps_per_epoch(
        num_rank_batches(pool_size, world_size, batch_size), args.gradient_accumulation_steps
    )
    horizon = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    strategy = args.selection_strategy
    if strategy == "auto":
        strategy = "epoch" if horizon > args.selection_warmup_epochs * steps_per_epoch else "steps"
    if strategy == "epoch":
        if horizon <= args.selection_warmup_epochs * steps_per_epoch:
            raise ValueError(
                f"`selection_strategy='epoch'` (`--selection_strategy epoch`) selects at epoch boundaries after "
                f"`selection_warmup_epochs={args.selection_warmup_epochs}`, but this run ends at step {horizon}, within "
                f"its warm-up epochs ({steps_per_epoch} steps each): no selection would happen. Use "
                "`--selection_strategy steps` (or `auto`) to select inside the epoch, or train more epochs."
            )
        return EventSchedule(strategy, horizon, 0, 1, steps_per_epoch)
    if rule_needs & {"model", "validation"}:
        raise ValueError(
            f"`selection_rule={args.selection_rule!r}` scores the whole pool with the model, which the in-epoch "
            "`steps` strategy (it scores chunks) cannot do: set `--selection_strategy epoch` and train at least "
            f"{args.selection_warmup_epochs + 1} epochs."
        )
    if args.aux_refresh_epochs != 1:
        raise ValueError(
            f"`aux_refresh_epochs={args.aux_refresh_epochs}` applies to the `epoch` strategy; with "
            "`selection_strategy='steps'` the aux model is realigned at every event, for the chunk it scores. Leave "
            "`--aux_refresh_epochs 1`, or use `--selection_strategy epoch`."
        )
    warmup_steps = resolve_steps(args.selection_warmup_steps, horizon)
    interval = resolve_steps(args.selection_steps, horizon)
    for name, value in (
        ("selection_steps", args.selection_steps),
        ("selection_warmup_steps", args.selection_warmup_steps),
    ):
        if isinstance(value, float) and value * horizon < 1:
            raise ValueError(
                f"`{name}={value}` (`--{name}`) is a fraction of this run's {horizon} optimizer steps, which is "
                "shorter than one step. Give it in steps (an integer >= 1) or as a larger fraction."
            )
    if warmup_steps >= horizon:
        raise ValueError(
            f"`selection_warmup_steps` resolves to step {warmup_steps}, but this run ends at step {horizon}: no "
            "selection would happen. Lower `--selection_warmup_steps` (e.g. 0.2, a fifth of the run) or train longer."
        )
    return EventSchedule(strategy, horizon, warmup_steps, interval, steps_per_epoch)


def check_batches_not_dispatched(dispatch_batches: bool | None) -> None:
    """Refuse accelerate's `dispatch_batches=True` with selection.

    With it the main process reads every training batch and splits it over the ranks, while the selection sampler
    already hands each rank its own batch (docs/design.md §8): ranks would train slices of the main process's shard and
    never the other ranks' rows.
    """
    if dispatch_batches:
        raise ValueError(
            "`accelerator_config={'dispatch_batches': True}` is not supported with selection: the main process would "
            "read every training batch and split it over the ranks, but the selection sampler already gives each rank "
            "its own batch of the selected pairs. Leave `dispatch_batches` unset (or set "
            "`accelerator_config={'dispatch_batches': False}`), or set `selection_rule='none'`."
        )
