"""The validation-aligned auxiliary model θ_aux (docs/design.md §6).

At each refresh θ_aux is rebuilt from the current policy θ_t, trained for a fixed number of steps on the validation
pairs with the trainer's own preference loss (same β, same reference), used for one no-grad pass over the pool, and
then discarded: LossDiff only needs its pool log-probabilities, which are cached until the next refresh.

- With PEFT, θ_aux is a second adapter (`"aux"`) on the same base weights, initialised from the policy adapter, so no
  third model is held in memory; the policy adapter is frozen while it trains.
- Without PEFT, `aux_mode="lora"`: θ_aux = θ_t + a low-rank update, LoRA layers injected into the policy module in place
  for the stage (the policy's weights frozen meanwhile) and removed after it. No second copy of the weights and no
  second full optimizer state: the extra memory is the adapter, its gradients, its fp32 masters (bf16/fp16 only) and
  its AdamW moments, r·(d_in + d_out) parameters per adapted matrix.
- Without PEFT, `aux_mode="full"`: θ_aux is a full copy of the policy (a DeepSpeed engine of its own under DeepSpeed),
  with its own full AdamW state: about 16 more bytes per policy parameter at the refresh peak (`memory.py`).

Either way it has its own AdamW optimizer (constant LR), and the policy's weights, gradients, optimizer state and LR
scheduler are not touched. Gradients are averaged over ranks after every backward, so θ_aux stays identical on every
rank.

Precision follows the policy: the aux adapter is created in the policy adapter's dtype (so θ_aux = θ_t exactly before
alignment, and LossDiff carries no dtype offset), the injected LoRA update takes the dtype of the weights it adapts
(B = 0, so θ_aux = θ_t exactly before alignment in any dtype). Either adapter computes in that dtype but is stepped
through fp32 master weights when it is bf16/fp16 (`_MasterWeights`), as DeepSpeed steps the policy. The aux loss is
scaled and steps whose gradients overflow are skipped (a `GradScaler`) under fp16 autocast and whenever an adapter
computes in fp16 (DeepSpeed fp16: the engine's loss scaler serves only the policy); the full-copy engine under
DeepSpeed fp16 uses its own DeepSpeed loss scaler. Gradients are averaged over ranks in a few bucketed all-reduces
(`average_in_buckets`). Under DeepSpeed the full copy is rebuilt from the policy's class and config, so a policy that
rebuild would not reproduce (compiled, kernels patched on the instance) is refused (`rebuild_mismatches`). A DeepSpeed
config that offloads the optimizer gives the full-copy engine DeepSpeed's CPU Adam, as accelerate gives the policy (the
adapters, a few MB to a few hundred MB, keep a torch AdamW on the device).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from datasets import Dataset
from tqdm.auto import tqdm
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, use_adapter

from .sampler import num_rank_batches, shard_batches
from .scores import CompletionLengths, PairLogProbs, PreferenceLoss
from .scoring import (
    ROW_KEY,
    build_pass_loader,
    enable_activation_checkpointing,
    inference_mode,
    is_activation_checkpointing,
    progress_disabled,
    reshard_fsdp,
    run_log_prob_pass,
    sequence_log_probs,
)


logger = logging.getLogger(__name__)

AUX_ADAPTER = "aux"
# The name of the LoRA adapter injected into a fully fine-tuned policy (`aux_mode="lora"`); unusual, so that it cannot
# collide with a module name of the model, which PEFT matches as a substring of parameter names.
INJECTED_AUX_ADAPTER = "trl_select_aux"


@dataclass(frozen=True)
class AlignmentSettings:
    """What one aux alignment stage does; all of it comes from `SelectiveDPOConfig`."""

    beta: float
    loss_type: str
    learning_rate: float
    weight_decay: float
    batch_size: int
    num_epochs: float
    max_steps: int
    max_grad_norm: float
    seed: int
    deepspeed_config: dict | None = None  # the run's DeepSpeed config (auto values filled), if DeepSpeed is on
    # Without PEFT: "lora" (θ_t + an injected low-rank update) or "full" (a copy of the policy); see `SelectiveDPOConfig`
    mode: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    # fp16 autocast without DeepSpeed: scale the aux loss and skip non-finite steps. An adapter that computes in fp16
    # (DeepSpeed fp16) is scaled whatever this says; the full-copy engine under DeepSpeed fp16 has its own scaler.
    loss_scaling: bool = False
    # The trainer's whole loss (every `loss_type` with its options); `None` means `loss_type` alone with `beta`
    loss: PreferenceLoss | None = None
    # TRL's `ld_alpha`: θ_aux's summed log-probs (pool, validation loss, alignment steps) are LD-DPO's, as θ_t's
    ld_alpha: float | None = None

    @property
    def use_weighting(self) -> bool:
        """Whether θ_aux's loss carries WPO's weights (TRL's `use_weighting`, read from the loss)."""
        return self.preference_loss.use_weighting

    @property
    def fused_head_outputs(self) -> tuple[str, ...]:
        """The fused LM head outputs θ_aux needs: log-probs, and `log_sum_sq_probs` for WPO's weights."""
        return ("log_probs", "log_sum_sq_probs") if self.use_weighting else ("log_probs",)

    @property
    def preference_loss(self) -> PreferenceLoss:
        """The per-pair loss the stage trains with: the trainer's (docs/design.md §2, §6)."""
        return self.loss if self.loss is not None else PreferenceLoss(beta=self.beta, loss_types=(self.loss_type,))


@dataclass(frozen=True)
class AlignmentResult:
    """The outcome of one refresh: θ_aux's pool log-probs and its validation loss before and after alignment.

    `skipped_steps` of the `num_steps` were not applied because their gradients were not finite (fp16 loss scaling).
    """

    pool_log_probs: PairLogProbs
    validation_loss_before: float
    validation_loss_after: float
    num_steps: int
    skipped_steps: int = 0
    alignment_rows: tuple[int, ...] = ()  # validation rows the stage's steps trained, over all ranks (compute count)


@dataclass
class _AuxHandle:
    """θ_aux while it exists: what to call forward on, the context that makes it active, and one optimizer step.

    `step` returns True when it skipped the update (non-finite gradients under loss scaling).
    """

    module: torch.nn.Module
    activate: Callable[[], contextlib.AbstractContextManager]
    step: Callable[[torch.Tensor], bool]


def _gathered(parameters: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Whole copies of `parameters` inside the context when ZeRO-3 partitions them; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return contextlib.nullcontext()


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """`parameter`'s whole value as a plain tensor: an FSDP2 `DTensor` shard is all-gathered (a collective: every rank
    must call it for the same parameters in the same order); anything else (also a ZeRO-3 parameter inside
    `_gathered`) is returned detached as it is."""
    full_tensor = getattr(parameter, "full_tensor", None)
    return parameter.detach() if full_tensor is None else full_tensor().detach()


# The largest flat buffer one gradient all-reduce sends, in elements (DDP's default bucket is 25 MiB; this is 25M
# elements, 100 MB of fp32): a handful of collectives per aux step instead of one per adapter tensor (1,120 at 70B
# with all-linear targets), each large enough to run at bus bandwidth, with a bounded extra buffer.
AVERAGING_BUCKET_NUMEL = 25_000_000


def bucket_ranges(numels: Sequence[int], max_numel: int) -> list[tuple[int, int]]:
    """Split consecutive tensors of `numels` elements into `[start, stop)` index ranges of at most `max_numel` elements.

    Greedy in order: a bucket is closed when the next tensor would take it over `max_numel`; a tensor larger than
    `max_numel` gets a bucket of its own.
    """
    ranges: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, numel in enumerate(numels):
        if index > start and size + numel > max_numel:
            ranges.append((start, index))
            start, size = index, 0
        size += numel
    if start < len(numels):
        ranges.append((start, len(numels)))
    return ranges


def average_in_buckets(
    tensors: list[torch.Tensor],
    world_size: int,
    all_reduce: Callable[[torch.Tensor], None],
    max_numel: int = AVERAGING_BUCKET_NUMEL,
) -> int:
    """Replace each tensor by its average over `world_size` ranks, one `all_reduce` (a sum, in place) per bucket.

    Tensors are grouped by dtype and device (a flat buffer has one of each), kept in order, flattened into buckets of
    at most `max_numel` elements, summed, divided and copied back. Every rank must pass tensors of the same shapes in
    the same order, so that the buckets line up. Returns the number of `all_reduce` calls.
    """
    # torch's own flat-buffer helpers (those DDP's and DeepSpeed's bucketing use): one `cat`, and views to copy back
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    calls = 0
    for group in groups.values():
        for start, stop in bucket_ranges([t.numel() for t in group], max_numel):
            bucket = group[start:stop]
            flat = _flatten_dense_tensors(bucket)
            all_reduce(flat)
            flat.div_(world_size)
            for tensor, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                tensor.copy_(averaged)
            calls += 1
    return calls


def _average_gradients_across_ranks(parameters: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average `parameters`' gradients over the ranks in a few bucketed all-reduces (missing gradients count as 0)."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:  # every rank must send the same buckets
            parameter.grad = torch.zeros_like(parameter)
    average_in_buckets(
        [parameter.grad for parameter in parameters],
        accelerator.num_processes,
        lambda flat: torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM),
    )


class _MasterWeights:
    """fp32 master copies of low-precision trainable parameters: the optimizer steps the masters, the module computes
    with their rounding in its own dtype (mixed precision as DeepSpeed and AMP O2 train the policy itself).

    A pure fp16/bf16 AdamW cannot train at DPO learning rates: an update of 1e-6 is below half an ulp of most bf16
    weights (A barely moves), and in fp16 `eps = 1e-8` rounds to 0, so a zero second moment divides by zero. fp32
    parameters are their own masters (no copy).
    """

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.masters = [
            p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone()) for p in parameters
        ]

    def pull_gradients(self) -> None:
        """Move the module's gradients onto the masters in fp32 (still scaled, if the loss was), freeing the half ones."""
        for parameter, master in zip(self.parameters, self.masters, strict=True):
            if master is not parameter:
                master.grad = None if parameter.grad is None else parameter.grad.float()
                parameter.grad = None

    @torch.no_grad()
    def push_weights(self) -> None:
        """Round the stepped masters into the module's parameters."""
        for parameter, master in zip(self.parameters, self.masters, strict=True):
            if master is not parameter:
                parameter.copy_(master)


def _offloads_optimizer(config: dict) -> bool:
    """Whether a DeepSpeed config offloads the optimizer and DeepSpeed insists on its own CPU optimizer for that."""
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none") and config.get("zero_force_ds_cpu_optimizer", True)


# ----- building the full-copy aux under DeepSpeed without an unsharded copy -----


def _is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `module`'s parameters (they carry a DeepSpeed id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of most of `module`'s floating-point parameter elements (counting whole parameters under ZeRO-3).

    The aux model is built in this dtype: the policy's compute dtype (bf16 under DeepSpeed bf16, whose fp32 master
    weights live in the optimizer, not the module), never a default fp32.
    """
    counts: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        if parameter.is_floating_point():
            numel = getattr(parameter, "ds_numel", parameter.numel())
            counts[parameter.dtype] = counts.get(parameter.dtype, 0) + numel
    return max(counts, key=counts.get) if counts else torch.get_default_dtype()


def _construct_on_meta(policy: torch.nn.Module) -> torch.nn.Module:
    """`type(policy)(policy.config)` with every parameter and buffer on the `meta` device: no memory, no init."""
    from transformers import initialization

    with torch.device("meta"), initialization.no_init_weights(), initialization.meta_device_safe_creation_ops():
        aux = type(policy)(policy.config)
    _tie_like(aux)
    return aux


def _construct_partitioned(policy: torch.nn.Module, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`type(policy)(policy.config)` under `deepspeed.zero.Init`, as transformers' `from_config` does under ZeRO-3.

    Each module's parameters are partitioned as soon as that module is constructed, so a rank holds at most one
    module's parameters whole (transiently) plus its own partitions (numel / world size each), in `dtype`. Weight
    initialisation is skipped: every parameter is overwritten by the policy's.
    """
    import deepspeed
    from transformers import initialization
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # The dtype goes in through the config's precision blocks, not `Init(dtype=...)`: DeepSpeed 0.19 ignores an
    # explicit dtype on accelerators without fp16 support (CPUs without mkldnn fp16) and builds in bf16.
    config = {
        **config,
        "fp16": {**config.get("fp16", {}), "enabled": dtype == torch.float16},
        "bf16": {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16},
    }
    # `prevent_arange_dtype_change` keeps RoPE buffers' explicit fp32 (it must be entered before zero.Init)
    with (
        initialization.no_init_weights(),
        prevent_arange_dtype_change(),
        deepspeed.zero.Init(config_dict_or_path=config),
    ):
        aux = type(policy)(policy.config)
    _tie_like(aux)
    return aux


def _tie_like(aux: torch.nn.Module) -> None:
    """Tie the aux's embeddings as the config says, as `from_config` does after construction (a no-op when untied)."""
    tie_weights = getattr(aux, "tie_weights", None)
    if tie_weights is not None:
        tie_weights()


def _check_same_parameters(policy: torch.nn.Module, aux: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The policy's parameters by name; fails when the rebuilt aux does not have exactly the same names and shapes."""
    source = dict(policy.named_parameters())
    target = dict(aux.named_parameters())
    if source.keys() != target.keys():
        raise RuntimeError(
            "The aux model rebuilt from the policy's config has other parameters than the policy: "
            f"missing {sorted(source.keys() - target.keys())[:5]}, extra {sorted(target.keys() - source.keys())[:5]}."
        )
    for name, parameter in source.items():
        shape = getattr(parameter, "ds_shape", parameter.shape)
        if tuple(getattr(target[name], "ds_shape", target[name].shape)) != tuple(shape):
            raise RuntimeError(f"The aux model's {name} has shape {target[name].shape}, the policy's {shape}.")
    return source


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` is a `torch.compile` wrapper (`OptimizedModule`, holding `_orig_mod`) or was compiled in place
    (`module.compile()`, as DeepSpeed's `engine.compile()` does)."""
    return "_orig_mod" in module._modules or getattr(module, "_compiled_call_impl", None) is not None


def _call_identity(function, depth: int = 3) -> tuple:
    """What a (bound) function runs: its code and, recursively, the code of the functions it closes over.

    TRL's fused LM head is an instance-level forward that closes over the forward it wraps; two of them run the same
    thing exactly when they wrap forwards with the same code.
    """
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    if code is None or depth == 0:
        return (code if code is not None else type(function),)
    cells = []
    for cell in function.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(content) and not isinstance(content, (type, torch.nn.Module)):
            cells.append(_call_identity(content, depth - 1))
    return (code, tuple(cells))


def rebuild_mismatches(policy: torch.nn.Module, aux: torch.nn.Module) -> list[str]:
    """Where an aux rebuilt as `type(policy)(policy.config)` (and given TRL's fused head, as the policy was) would not
    compute what `policy` computes; empty when it would.

    Construction from the class drops what was done to the policy's instance after it was built: `torch.compile`
    wrappers or in-place compilation, forwards patched on the instance (Liger kernels bind theirs to each norm and MLP
    module), module classes swapped on the instance or in the modeling module since. Then θ_aux ≠ θ_t before alignment,
    a LossDiff offset on every pair that no alignment step explains.
    """
    mismatches: list[str] = []
    aux_modules = dict(aux.named_modules())
    for name, module in policy.named_modules():
        label = name or type(policy).__name__
        if _is_compiled(module):
            mismatches.append(f"{label} is compiled (torch.compile)")
            continue
        twin = aux_modules.get(name)
        if twin is None:
            mismatches.append(f"{label} has no counterpart in the rebuilt model")
            continue
        if type(twin) is not type(module):
            mismatches.append(f"{label} is a {type(module).__name__}, the rebuilt one a {type(twin).__name__}")
        forwards = [vars(m).get("forward") for m in (module, twin)]
        if forwards[0] is not None and (
            forwards[1] is None or _call_identity(forwards[0]) != _call_identity(forwards[1])
        ):
            function = getattr(forwards[0], "__func__", forwards[0])
            mismatches.append(
                f"{label}.forward is patched on the instance ({getattr(function, '__qualname__', function)})"
            )
    return mismatches


def _refuse_unfaithful_rebuild(policy: torch.nn.Module, aux: torch.nn.Module) -> None:
    """Raise when the rebuilt aux would not equal the policy before alignment (see `rebuild_mismatches`)."""
    mismatches = rebuild_mismatches(policy, aux)
    if mismatches:
        shown = "; ".join(mismatches[:5]) + (f"; and {len(mismatches) - 5} more" if len(mismatches) > 5 else "")
        raise ValueError(
            "`aux_mode='full'` under DeepSpeed rebuilds θ_aux from the policy's class and config, which would not "
            f"compute what the policy computes: {shown}. θ_aux would differ from θ_t before any alignment step, an "
            "offset in every pair's LossDiff. Set `aux_mode='lora'` (the default: LoRA layers injected into the policy "
            "module itself, so its compiled or patched modules stay), or train without torch.compile / instance-level "
            "kernel patches."
        )


def _copy_buffers(policy: torch.nn.Module, aux: torch.nn.Module) -> None:
    """Every aux buffer (never partitioned; rotary frequencies and the like) becomes a clone of the policy's."""
    policy_buffers = dict(policy.named_buffers())
    for name, _ in list(aux.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        module = aux.get_submodule(module_name)
        source = policy_buffers.get(name)
        if source is None:
            raise RuntimeError(f"The policy has no buffer {name} for the aux model's.")
        module._buffers[leaf] = source.detach().clone()


@torch.no_grad()
def _materialise_from(aux: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Give a `meta`-device `aux` clones of the policy's parameters and buffers: same device, dtype and values.

    ZeRO-1/2 keep the module's weights whole on every rank in the compute dtype (the fp32 masters live in the
    optimizer), so the aux costs exactly one more copy of them on the device (2 bytes/parameter under bf16), and
    nothing on the host. Tied parameters stay tied: each distinct parameter is cloned once.
    """
    sources = _check_same_parameters(policy, aux)
    clones: dict[int, torch.nn.Parameter] = {}
    for module_name, module in aux.named_modules():
        for leaf, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in clones:
                source = sources[f"{module_name}.{leaf}" if module_name else leaf]
                clones[id(parameter)] = torch.nn.Parameter(source.detach().clone(), requires_grad=source.requires_grad)
            module._parameters[leaf] = clones[id(parameter)]
    _copy_buffers(policy, aux)


def _same_partitioning(source: torch.nn.Parameter, target: torch.nn.Parameter) -> bool:
    """Whether this rank's partition of `source` covers exactly the elements this rank's partition of `target` does.

    ZeRO-3 flattens each parameter, pads it to a multiple of the partition group's size and gives rank r the r-th
    slice; so the partitions correspond one to one when the shapes, partition sizes, dtypes and partition groups
    (same ranks, same order) agree, and neither side uses a secondary (hpZ) copy, quantised or NVMe-swapped partitions.
    """
    import torch.distributed as dist
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    a, b = source.ds_tensor, target.ds_tensor
    if a is None or b is None or tuple(source.ds_shape) != tuple(target.ds_shape):
        return False
    if a.dtype != b.dtype or a.numel() != b.numel() or a.ds_numel != b.ds_numel:
        return False
    if any(getattr(t, "status", PartitionedParamStatus.AVAILABLE) != PartitionedParamStatus.AVAILABLE for t in (a, b)):
        return False
    if any(hasattr(t, "ds_quant_scale") for t in (a, b)):
        return False
    # A partition whose home is NVMe is a swap buffer: a write to it might never reach the file. (The ZeRO-3 optimizer
    # marks the partitions it moved into its flat buffers "not-nvme"; zero.Init leaves None.)
    if any(getattr(t, "final_location", None) == OffloadDeviceEnum.nvme for t in (a, b)):
        return False
    if (
        getattr(source, "ds_secondary_tensor", None) is not None
        or getattr(target, "ds_secondary_tensor", None) is not None
    ):
        return False
    try:
        return dist.get_process_group_ranks(source.ds_process_group) == dist.get_process_group_ranks(
            target.ds_process_group
        )
    except (AttributeError, RuntimeError, ValueError):
        return False


@torch.no_grad()
def _copy_partitions(policy: torch.nn.Module, aux: torch.nn.Module) -> None:
    """Copy the ZeRO-3 policy's weights into the ZeRO-3 aux, partition by partition.

    Where the two partitionings match (`_same_partitioning`: the usual case, both built over the same ranks), each
    rank copies its own policy partition into its aux partition: no communication and no whole parameter anywhere.
    Otherwise that one parameter is gathered on both sides and copied (at most one parameter whole at a time).
    """
    import deepspeed

    sources = _check_same_parameters(policy, aux)
    gathered = 0
    for name, target in aux.named_parameters():
        source = sources[name]
        if _same_partitioning(source, target):
            target.ds_tensor.copy_(source.ds_tensor)
            continue
        gathered += 1
        # The policy's copy is discarded on exit (its partition is not rewritten); the aux's is re-partitioned
        with (
            deepspeed.zero.GatheredParameters([source], modifier_rank=None),
            deepspeed.zero.GatheredParameters([target], modifier_rank=0),
        ):
            target.data.copy_(source.data)
    if gathered:
        logger.info("Aux build: %d parameters partitioned differently from the policy's were gathered.", gathered)
    _copy_buffers(policy, aux)


class AuxiliaryModel:
    """Builds, aligns, uses and discards θ_aux.

    Args:
        policy (`torch.nn.Module`):
            The trainer's (unwrapped) policy model: a `PreTrainedModel` or a `PeftModel`.
        accelerator ([`~accelerate.Accelerator`]):
            The trainer's accelerator.
        collator (`Callable`):
            The trainer's preference collator.
        validation ([`~datasets.Dataset`]):
            The tokenized validation pairs.
        validation_reference ([`PairLogProbs`]):
            π_ref's log-probs of `validation`, in row order.
        validation_lengths ([`CompletionLengths`], *optional*):
            The completion lengths of `validation`, in row order; needed by the losses that read them (`ipo`, ...).
        settings ([`AlignmentSettings`]):
            The alignment stage.
        gradient_checkpointing_kwargs (`dict`, *optional*, defaults to `None`):
            The trainer's, to restore checkpointing after no-grad passes.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        accelerator: Accelerator,
        collator,
        validation: Dataset,
        validation_reference: PairLogProbs,
        settings: AlignmentSettings,
        gradient_checkpointing_kwargs: dict | None = None,
        validation_lengths: CompletionLengths | None = None,
    ) -> None:
        self.validation_lengths = validation_lengths
        self.policy = policy
        self.accelerator = accelerator
        self.collator = collator
        self.validation = validation
        self.validation_reference = validation_reference
        self.settings = settings
        self.gradient_checkpointing_kwargs = gradient_checkpointing_kwargs
        self.num_refreshes = 0
        # The fp16 loss scale carries over from one alignment stage to the next, so each refresh does not spend its
        # first steps finding it again (GradScaler starts at 2^16 and halves on every overflow).
        self.grad_scaler_state: dict | None = None

    def batches_per_pass(self) -> int:
        """Batches each rank runs in one pass over the validation pairs."""
        return num_rank_batches(len(self.validation), self.accelerator.num_processes, self.settings.batch_size)

    def steps_per_stage(self) -> int:
        """Optimizer steps in one alignment stage; the same on every rank."""
        if self.settings.max_steps > 0:
            return self.settings.max_steps
        return max(1, math.ceil(self.settings.num_epochs * self.batches_per_pass()))

    def refresh(self, pool_loader, pool_size: int) -> AlignmentResult:
        """Rebuild θ_aux from the policy, align it, and return its log-probs over the pool. Call on every rank."""
        # FSDP2: the policy's sharded parameters registered (not the root's transient whole ones), so that the build
        # freezes and restores the parameters the trainer steps; and again after, freeing the whole copies.
        reshard_fsdp(self.policy)
        with self._build() as aux:
            validation_loader = build_pass_loader(
                self.validation, self.collator, self.accelerator, self.settings.batch_size
            )
            with aux.activate():
                loss_before = self._validation_loss(aux.module, validation_loader)
                num_steps, skipped_steps, alignment_rows = self._align(aux)
                loss_after = self._validation_loss(aux.module, validation_loader)
                with inference_mode(aux.module, self.gradient_checkpointing_kwargs):
                    pool = run_log_prob_pass(
                        pool_loader,
                        lambda batch: self._forward(aux.module, batch),
                        self.accelerator,
                        pool_size,
                        desc="Scoring pool with aux model",
                    )
        reshard_fsdp(self.policy)
        self.num_refreshes += 1
        if skipped_steps:
            logger.warning(
                "Aux alignment skipped %d of %d steps: their gradients were not finite (fp16 overflow).",
                skipped_steps,
                num_steps,
            )
        return AlignmentResult(pool, loss_before, loss_after, num_steps, skipped_steps, alignment_rows)

    @contextlib.contextmanager
    def _build(self) -> Iterator[_AuxHandle]:
        if self.settings.mode == "lora" and not is_peft_model(self.policy):
            yield from self._build_injected_lora()
        elif self.settings.deepspeed_config is not None:
            if is_peft_model(self.policy):
                yield from self._build_adapter()
            else:
                yield from self._build_engine()
        elif is_peft_model(self.policy):
            yield from self._build_adapter()
        else:
            aux = copy.deepcopy(self.policy)
            yield self._torch_handle(aux, [p for p in aux.parameters() if p.requires_grad], contextlib.nullcontext)
            del aux

    def _build_adapter(self) -> Iterator[_AuxHandle]:
        policy = self.policy
        if AUX_ADAPTER in policy.peft_config:
            policy.delete_adapter(AUX_ADAPTER)
        policy.add_adapter(AUX_ADAPTER, policy.peft_config[policy.active_adapter])
        source = f".{policy.active_adapter}."
        policy_adapter = {name: p for name, p in policy.named_parameters() if source in name}
        # Under ZeRO-3 the policy adapter is partitioned; the aux adapter, added after partitioning, is whole on
        # every rank (a few MB) and its gradients are averaged by hand, like any plain torch parameter.
        # PEFT creates the new adapter in fp32 (`autocast_adapter_dtype`); a bf16 policy adapter (ZeRO-3 + LoRA, QLoRA)
        # would then differ from its fp32 copy by rounding, a per-pair LossDiff offset with no validation signal. So
        # each aux parameter takes its policy twin's dtype, and θ_aux equals θ_t bit for bit before alignment.
        with _gathered(list(policy_adapter.values())), torch.no_grad():
            for name, parameter in policy_adapter.items():
                twin = policy.get_parameter(name.replace(source, f".{AUX_ADAPTER}."))
                twin.data = _whole(parameter).to(device=twin.device, dtype=parameter.dtype, copy=True)
        parameters = [p for n, p in policy.named_parameters() if f".{AUX_ADAPTER}." in n]
        try:
            # `use_adapter` makes the aux adapter the only trainable one, and restores the policy adapter after
            yield self._torch_handle(policy, parameters, lambda: use_adapter(policy, AUX_ADAPTER), fp32_masters=True)
        finally:
            policy.delete_adapter(AUX_ADAPTER)

    def _build_injected_lora(self) -> Iterator[_AuxHandle]:
        """θ_aux = θ_t + (α/r)·B·A on the adapted linear layers, injected into the policy module in place for the stage.

        PEFT's `inject_adapter_in_model` wraps each target `nn.Linear` in a `LoraLayer` that holds the original module
        as `base_layer` (the same object, so DeepSpeed's ZeRO-3 parameter hooks on it still gather its weights), with
        `B = 0`, so θ_aux equals θ_t bit for bit before the first step. The policy's own parameters are frozen while the
        stage runs; only A and B train, with a plain torch AdamW (gradients averaged over ranks by hand, as for the
        PEFT aux adapter). A and B are plain whole tensors on every rank (they are created after DeepSpeed partitioned
        the model) in the dtype of the weight they adapt, and A is drawn from a generator seeded identically on every
        rank (`seed + refresh`), without touching the global RNG streams the training run uses.

        On exit every `LoraLayer` is replaced by its `base_layer` (the original module object), the policy's
        `requires_grad` flags are restored, and the attributes PEFT set on the model are removed: the policy's module
        tree, weights, gradients, optimizer state and LR schedule are as before the stage.
        """
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
        from transformers.pytorch_utils import Conv1D

        policy = self.policy
        if any(isinstance(module, LoraLayer) for module in policy.modules()):
            raise RuntimeError(
                "The policy already holds LoRA layers outside a PeftModel; `aux_mode='lora'` injects its own. Wrap the "
                "policy with PEFT (its aux model is then a second adapter), or set `aux_mode='full'`."
            )
        requires_grad = [(parameter, parameter.requires_grad) for parameter in policy.parameters()]
        peft_attributes = {name: policy.__dict__[name] for name in ("peft_config",) if name in policy.__dict__}
        target_modules = self.settings.lora_target_modules
        if not isinstance(target_modules, str) and len(target_modules) == 1 and target_modules[0] == "all-linear":
            target_modules = (
                "all-linear"  # `--aux_lora_target_modules all-linear` on the command line parses to a list
            )
        config = LoraConfig(
            r=self.settings.lora_r,
            lora_alpha=self.settings.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
            # GPT-2's Conv1D stores its weight transposed: PEFT would warn and set this itself. Said here, not by
            # silencing the warning: a `warnings.catch_warnings()` block resets Python's once-per-location memory, and
            # every warning already shown (a deprecation inside TRL's steps, ...) would be shown again after each
            # refresh.
            fan_in_fan_out=any(isinstance(module, Conv1D) for module in policy.modules()),
        )
        try:
            # A's Kaiming draw happens on the CPU (PEFT builds the layers there, then moves them to the base layer's
            # device): a forked CPU generator seeded alike on every rank makes θ_aux identical across ranks.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.seed + self.num_refreshes)
                inject_adapter_in_model(config, policy, adapter_name=INJECTED_AUX_ADAPTER)
            injected = [(name, module) for name, module in policy.named_modules() if isinstance(module, LoraLayer)]
            if not injected:
                raise ValueError(
                    f"`aux_lora_target_modules={target_modules!r}` matched no linear layer of the policy "
                    f"({type(policy).__name__})."
                )
            for parameter, _ in requires_grad:
                parameter.requires_grad_(False)
            parameters: list[torch.nn.Parameter] = []
            with torch.no_grad():
                for _, module in injected:
                    # The dtype of the weights it adapts (an `nn.Linear`, or fused MoE expert weights under
                    # `all-linear`); PEFT upcasts bf16/fp16 adapters to fp32 (`autocast_adapter_dtype`): cast back.
                    base = module.get_base_layer()
                    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
                    for name, adapter in module.named_parameters():
                        # Not the base layer's own parameters, nor those of a LoRA layer nested in it (PEFT nests one
                        # wrapper per adapted parameter of fused MoE experts); that one is in `injected` too.
                        if name.startswith("base_layer.") or f".{INJECTED_AUX_ADAPTER}." not in f".{name}.":
                            continue
                        if dtype is not None:
                            adapter.data = adapter.data.to(dtype=dtype)
                        adapter.requires_grad_(True)
                        parameters.append(adapter)
            yield self._torch_handle(policy, parameters, contextlib.nullcontext, fp32_masters=True)
        finally:
            # Every LoraLayer back to the module it wraps (also those of an injection that failed half-way), outermost
            # first: a nested wrapper goes with its outer one, which `get_base_layer` unwraps all the way.
            while outermost := next(((n, m) for n, m in policy.named_modules() if isinstance(m, LoraLayer)), None):
                name, module = outermost
                parent_name, _, child = name.rpartition(".")
                parent = policy.get_submodule(parent_name) if parent_name else policy
                setattr(parent, child, module.get_base_layer())
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)
            policy.__dict__.pop("peft_config", None)
            policy.__dict__.update(peft_attributes)

    def _torch_handle(
        self,
        module: torch.nn.Module,
        parameters: list[torch.nn.Parameter],
        activate: Callable[[], contextlib.AbstractContextManager],
        fp32_masters: bool = False,
    ) -> _AuxHandle:
        """θ_aux stepped by a torch AdamW: over fp32 masters of `parameters` when `fp32_masters` (the adapters), else
        over `parameters` themselves (the full copy without DeepSpeed, stepped as the policy is)."""
        masters = _MasterWeights(parameters if fp32_masters else [])
        trained = masters.masters if fp32_masters else parameters
        optimizer = torch.optim.AdamW(trained, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay)
        # fp16 gradients underflow without a loss scale and overflow now and then with one; the scaler finds the
        # overflows and skips those steps. The scale is a power of two, so a finite step is exactly the unscaled one.
        # Gradients are averaged over ranks before the inf check, so every rank skips the same steps. An adapter that
        # computes in fp16 needs it whatever launched the run: under DeepSpeed fp16 the settings ask for none (the
        # policy's engine scales its own loss, not this one).
        scaler = None
        computes_in_fp16 = fp32_masters and any(p.dtype == torch.float16 for p in parameters)
        if self.settings.loss_scaling or computes_in_fp16:
            scaler = torch.amp.GradScaler(self.accelerator.device.type)
            if self.grad_scaler_state is not None:
                scaler.load_state_dict(self.grad_scaler_state)

        def step(loss: torch.Tensor) -> bool:
            (loss if scaler is None else scaler.scale(loss)).backward()
            masters.pull_gradients()
            # Averaged in fp32 when there are masters: a bf16 sum over many ranks loses the small gradients
            _average_gradients_across_ranks(trained, self.accelerator)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if self.settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained, self.settings.max_grad_norm)
            if scaler is None:
                optimizer.step()
                skipped = False
            else:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when the unscaled gradients hold an inf or a NaN
                scaler.update()  # ... and then the scale is lowered
                skipped = scaler.get_scale() < scale
                self.grad_scaler_state = scaler.state_dict()
            optimizer.zero_grad(set_to_none=True)
            if not skipped:
                masters.push_weights()
            return skipped

        return _AuxHandle(module, activate, step)

    def _build_engine(self) -> Iterator[_AuxHandle]:
        """θ_aux in its own DeepSpeed engine, built as sharded as the policy is (ZeRO-1/2/3).

        ZeRO-3: the aux model is constructed inside `deepspeed.zero.Init` with the aux engine's config, in the
        policy's dtype, so each rank allocates only its partitions; each rank then copies its policy partitions into
        its aux partitions (`_copy_partitions`), so no rank ever holds a whole copy of the weights. ZeRO-1/2 (weights
        not partitioned): constructed on the `meta` device and materialised as clones of the policy's tensors, on
        their device and in their dtype (`_materialise_from`). Either way no fp32 model is built on the host, and the
        aux recomputes activations in backward when the policy does, with the trainer's checkpointing kwargs.
        """
        import deepspeed

        config = self._engine_config()
        policy = self.policy
        if _is_partitioned(policy):
            aux = _construct_partitioned(policy, config, _parameter_dtype(policy))
            _copy_partitions(policy, aux)
        else:
            aux = _construct_on_meta(policy)
            _materialise_from(aux, policy)
        add_fused_lm_head(aux, outputs=self.settings.fused_head_outputs)  # the policy's head, as TRL patched it
        disable_dropout_in_model(aux)
        if is_activation_checkpointing(policy):
            enable_activation_checkpointing(aux, self.gradient_checkpointing_kwargs)
        _refuse_unfaithful_rebuild(policy, aux)
        parameters = [p for p in aux.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay
        )
        if _offloads_optimizer(config):
            # DeepSpeed refuses a torch optimizer with ZeRO-Offload (`zero_force_ds_cpu_optimizer`, on by default);
            # accelerate maps the policy's the same way: same lr and weight decay, AdamW mode, DeepSpeedCPUAdam.
            from accelerate.utils import map_pytorch_optim_to_deepspeed

            optimizer = map_pytorch_optim_to_deepspeed(optimizer)
        engine, *_ = deepspeed.initialize(model=aux, optimizer=optimizer, config=config)

        def step(loss: torch.Tensor) -> bool:
            skipped = engine.skipped_steps
            engine.backward(loss)
            engine.step()  # clips to `gradient_clipping`, steps, zeroes the gradients; fp16: skips an overflow
            return engine.skipped_steps > skipped

        try:
            yield _AuxHandle(engine, contextlib.nullcontext, step)
        finally:
            engine.destroy()  # frees its partitions and hooks; the module and optimizer go with this frame

    def _engine_config(self) -> dict:
        """The run's DeepSpeed config for θ_aux: same ZeRO stage and precision, its own batch, no optimizer or scheduler."""
        config = copy.deepcopy(self.settings.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config.update(
            train_micro_batch_size_per_gpu=self.settings.batch_size,
            gradient_accumulation_steps=1,
            train_batch_size=self.settings.batch_size * self.accelerator.num_processes,
            gradient_clipping=max(self.settings.max_grad_norm, 0.0),
            zero_allow_untested_optimizer=True,
        )
        return config

    def _forward(self, module: torch.nn.Module, batch) -> tuple[torch.Tensor, ...]:
        """θ_aux's `(chosen, rejected)` summed log-probs of `batch` (LD-weighted with `ld_alpha`), and with WPO its
        own per-pair log-weight: the aux stage's loss is WPO-weighted by θ_aux, as TRL's by the model it trains."""
        with self.accelerator.autocast():
            return sequence_log_probs(module, batch, self.settings.ld_alpha, self.settings.use_weighting)

    def _batch_loss(self, module: torch.nn.Module, batch) -> torch.Tensor:
        chosen, rejected, *log_weight = self._forward(module, batch)
        rows = batch[ROW_KEY].cpu()
        reference = PairLogProbs(
            chosen=self.validation_reference.chosen[rows].to(chosen.device),
            rejected=self.validation_reference.rejected[rows].to(chosen.device),
        )
        lengths = None if self.validation_lengths is None else self.validation_lengths.select(rows).to(chosen.device)
        weight = log_weight[0].float() if log_weight else None
        return self.settings.preference_loss(
            PairLogProbs(chosen.float(), rejected.float(), weight), reference, lengths
        )

    def _align(self, aux: _AuxHandle) -> tuple[int, int, tuple[int, ...]]:
        """Run one alignment stage; returns the number of steps, how many were skipped, and every rank's rows."""
        num_steps = self.steps_per_stage()
        # A fresh shuffle per pass and per refresh, the same on every rank; each step's rows are split evenly over
        # the ranks (no padding duplicates), so the aux stage equals one process with world_size times the batch.
        generator = torch.Generator().manual_seed(self.settings.seed + self.num_refreshes)
        world_size = self.accelerator.num_processes
        rank_batches: list[list[list[int]]] = [[] for _ in range(world_size)]
        while len(rank_batches[0]) < num_steps:
            order = torch.randperm(len(self.validation), generator=generator)
            for rank in range(world_size):
                rank_batches[rank] += shard_batches(order, world_size, rank, self.settings.batch_size)
        batches = rank_batches[self.accelerator.process_index]
        alignment_rows = tuple(row for per_rank in rank_batches for batch in per_rank[:num_steps] for row in batch)
        loader = build_pass_loader(
            self.validation, self.collator, self.accelerator, self.settings.batch_size, batches=batches[:num_steps]
        )
        module = aux.module
        was_training = module.training
        module.train()
        batches = iter(loader)
        progress = tqdm(
            range(num_steps),
            desc="Aligning aux model",
            disable=progress_disabled(self.accelerator),
            leave=False,
        )
        skipped_steps = 0
        for _ in progress:
            skipped_steps += bool(aux.step(self._batch_loss(module, next(batches)).mean()))
        module.train(was_training)
        return num_steps, skipped_steps, alignment_rows

    def _validation_loss(self, module: torch.nn.Module, loader) -> float:
        with inference_mode(module, self.gradient_checkpointing_kwargs):
            log_probs = run_log_prob_pass(
                loader,
                lambda batch: self._forward(module, batch),
                self.accelerator,
                len(self.validation),
                desc="Aux validation loss",
            )
        loss = self.settings.preference_loss(log_probs, self.validation_reference, self.validation_lengths)
        return float(loss.mean())
