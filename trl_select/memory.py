"""The memory model of selection: bytes of model state per device, component by component.

Everything here is arithmetic on a model's shape (parameter count and its linear layers); nothing is measured. Units
are bytes throughout (`GIB = 2**30` to print them). Activations, the CUDA context, fragmentation and ZeRO-3's transient
gathered copies of a layer are not modelled: the figures are the *model states* (weights, gradients, fp32 master
weights, optimizer moments) of the policy, the reference and the auxiliary model θ_aux.

Per parameter of the policy, with `Precision(weight=w, grad=g, master=m, optimizer=o)` bytes per trained parameter:

- plain DPO, full fine-tuning: policy `w + g + m + o`, reference `w` (bf16 mixed precision with fp32 Adam as in
  DeepSpeed: 2 + 2 + 4 + 8 = 16, reference + 2 = 18 bytes per parameter);
- a full-copy aux (`aux="full"`) adds a second `w + g + m + o` (its own AdamW) while it is aligned, at each refresh;
- a LoRA aux (`aux="lora"`) adds `r · (d_in + d_out)` adapter parameters per adapted `d_in → d_out` matrix, each at
  `adapter.weight + adapter.grad + adapter.master + adapter.optimizer` bytes (fp32 adapter + AdamW: 16);
- a LoRA policy (`policy="lora"`) holds the frozen base at `w` bytes per parameter plus its trained adapter; the
  reference is the base with the adapter disabled (0 extra) and the aux is a second adapter.

Sharding over `world_size` N ranks: `"single"`/`"ddp"` divide nothing; `"zero1"` divides the master weights and
optimizer moments by N; `"zero2"` also the gradients; `"zero3"` also the weights (policy, reference and the full-copy
aux, which runs in its own engine with the run's ZeRO stage). LoRA aux adapters are whole on every rank.

When does the aux exist? It is built at the epoch boundary, after the policy's last optimizer step. Single-process
training frees the policy's gradients after every step (`zero_grad(set_to_none=True)`), so at a refresh they are gone
and the peak is `max(training step, refresh)`; DDP's gradient buckets and DeepSpeed's gradient partitions persist, so
there the refresh adds the aux on top of the full training state (`gradients_persist`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch


logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20

Strategy = Literal["single", "ddp", "zero1", "zero2", "zero3"]
STRATEGIES: tuple[str, ...] = ("single", "ddp", "zero1", "zero2", "zero3")

# The construction-time warning fires when the configured aux raises the model-state peak by more than this fraction.
AUX_MEMORY_WARNING_FRACTION = 0.25
DEFAULT_AUX_LORA_R = 16


@dataclass(frozen=True)
class Precision:
    """Bytes per *trained* parameter of each component: weight, gradient, fp32 master copy, optimizer moments.

    A frozen parameter costs `weight` only. `total` is the sum for a trained parameter.
    """

    weight: int
    grad: int
    master: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weight + self.grad + self.master + self.optimizer


# bf16 weights and gradients, fp32 master weights and fp32 Adam moments (DeepSpeed bf16/fp16): 2 + 2 + 4 + 8 = 16 bytes per trained parameter.
BF16_MIXED = Precision(weight=2, grad=2, master=4, optimizer=8)
# fp32 weights (also accelerate's bf16 autocast without DeepSpeed, which keeps fp32 weights): no master copy.
FP32 = Precision(weight=4, grad=4, master=0, optimizer=8)
# PEFT creates LoRA adapters in fp32 (`autocast_adapter_dtype`); torch AdamW keeps its moments in the same dtype.
FP32_ADAPTER = FP32
# `aux_mode="lora"` creates its adapter in the dtype of the weight it adapts and computes in it; a bf16/fp16 adapter is
# stepped through fp32 masters (torch AdamW over them, fp32 moments), its gradients moved onto the masters in fp32
# (the half ones freed): 2 + 4 + 4 + 8 = 18 bytes per adapter parameter.
BF16_ADAPTER = Precision(weight=2, grad=4, master=4, optimizer=8)


@dataclass(frozen=True)
class LinearShape:
    """`count` linear layers named `name` (the module's last name, e.g. `q_proj`), each a `d_in → d_out` matrix."""

    name: str
    d_in: int
    d_out: int
    count: int = 1


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a model: its parameter count and its linear layers (for LoRA adapters)."""

    num_parameters: int
    linears: tuple[LinearShape, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a Llama-style decoder (Llama, Mistral, Qwen2, ...) from a transformers config or a dict.

        Reads `vocab_size`, `hidden_size` h, `intermediate_size` I, `num_hidden_layers` L, `num_attention_heads` H,
        `num_key_value_heads` K (default H), `head_dim` d (default h / H), `tie_word_embeddings`, `attention_bias`,
        `mlp_bias`. Per layer: q `h → H·d`, k and v `h → K·d`, o `H·d → h`, gate and up `h → I`, down `I → h`, two
        RMSNorm weights of h; plus the embedding `V·h`, the final norm h and the LM head `h → V` unless tied.
        """

        def get(name: str, default: Any = None) -> Any:
            value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
            return default if value is None else value

        vocab, hidden = int(get("vocab_size")), int(get("hidden_size"))
        intermediate, layers = int(get("intermediate_size")), int(get("num_hidden_layers"))
        heads = int(get("num_attention_heads"))
        kv_heads = int(get("num_key_value_heads", heads))
        head_dim = int(get("head_dim", hidden // heads))
        attention_bias, mlp_bias = bool(get("attention_bias", False)), bool(get("mlp_bias", False))
        linears = [
            LinearShape("q_proj", hidden, heads * head_dim, layers),
            LinearShape("k_proj", hidden, kv_heads * head_dim, layers),
            LinearShape("v_proj", hidden, kv_heads * head_dim, layers),
            LinearShape("o_proj", heads * head_dim, hidden, layers),
            LinearShape("gate_proj", hidden, intermediate, layers),
            LinearShape("up_proj", hidden, intermediate, layers),
            LinearShape("down_proj", intermediate, hidden, layers),
        ]
        if not get("tie_word_embeddings", False):
            linears.append(LinearShape("lm_head", hidden, vocab, 1))
        matrices = sum(s.d_in * s.d_out * s.count for s in linears)
        biases = layers * (
            (heads * head_dim + 2 * kv_heads * head_dim + hidden if attention_bias else 0)
            + (2 * intermediate + hidden if mlp_bias else 0)
        )
        norms = (2 * layers + 1) * hidden
        return cls(vocab * hidden + matrices + biases + norms, tuple(linears))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """The shape of a built model: every parameter once (ZeRO-3 partitions counted whole, by `ds_numel`) and
        every `nn.Linear`, grouped by last module name and shape."""
        num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        groups: dict[tuple[str, int, int], int] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                key = (name.rsplit(".", 1)[-1], module.in_features, module.out_features)
                groups[key] = groups.get(key, 0) + 1
        linears = tuple(LinearShape(n, d_in, d_out, count) for (n, d_in, d_out), count in groups.items())
        return cls(num_parameters, linears)

    def lora_parameters(self, r: int, target_modules: Iterable[str] | None = None) -> int:
        """Parameters of a rank-`r` LoRA adapter: `r · (d_in + d_out)` per adapted matrix (A is `r × d_in`, B is
        `d_out × r`). `target_modules` are module names (`"q_proj"`); default every linear layer but `lm_head`, as
        PEFT's `"all-linear"`."""
        targets = None if target_modules is None or target_modules == "all-linear" else set(target_modules)
        return sum(
            r * (s.d_in + s.d_out) * s.count
            for s in self.linears
            if (s.name in targets if targets is not None else s.name != "lm_head")
        )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Model-state bytes per device, by component (all ints, bytes), and the peaks they make.

    `policy_*` are the policy's trained parameters (for a LoRA policy: its adapter) and `frozen_base` a LoRA policy's
    frozen base weights; `aux_*` exist only while θ_aux is aligned (at each refresh).
    """

    policy_weights: int
    policy_gradients: int
    policy_master: int
    policy_optimizer: int
    frozen_base: int
    reference: int
    aux_weights: int = 0
    aux_gradients: int = 0
    aux_master: int = 0
    aux_optimizer: int = 0
    gradients_persist: bool = False
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def aux(self) -> int:
        """Bytes θ_aux adds while it is aligned: its weights (0 for an adapter's base), gradients, master, moments."""
        return self.aux_weights + self.aux_gradients + self.aux_master + self.aux_optimizer

    @property
    def plain(self) -> int:
        """Plain DPO's peak: every policy component during a training step, the frozen base and the reference."""
        return (
            self.policy_weights
            + self.policy_gradients
            + self.policy_master
            + self.policy_optimizer
            + self.frozen_base
            + self.reference
        )

    @property
    def refresh(self) -> int:
        """The peak during an aux refresh: the policy's persistent state, the reference and θ_aux."""
        gradients = self.policy_gradients if self.gradients_persist else 0
        return self.plain - self.policy_gradients + gradients + self.aux

    @property
    def peak(self) -> int:
        """The run's model-state peak: `max(plain, refresh)`."""
        return max(self.plain, self.refresh)

    @property
    def ratio(self) -> float:
        """`peak / plain`: what selection with this aux multiplies plain DPO's model-state peak by."""
        return self.peak / self.plain

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(aux=self.aux, plain=self.plain, refresh=self.refresh, peak=self.peak, ratio=self.ratio)
        return out


def _shard(strategy: str, world_size: int) -> dict[str, int]:
    """The divisor of each component under `strategy` (weights, gradients, master/optimizer)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    if world_size < 1 or (strategy == "single" and world_size != 1):
        raise ValueError(f"`world_size` must be >= 1 (1 for 'single'), got {world_size} with {strategy!r}")
    n = world_size
    return {
        "weights": n if strategy == "zero3" else 1,
        "gradients": n if strategy in ("zero2", "zero3") else 1,
        "states": n if strategy in ("zero1", "zero2", "zero3") else 1,
    }


def _ceil_div(value: int, divisor: int) -> int:
    return math.ceil(value / divisor)


def memory_breakdown(
    shape: ModelShape,
    *,
    policy: Literal["full", "lora"] = "full",
    aux: Literal["none", "full", "lora"] = "none",
    strategy: Strategy = "single",
    world_size: int = 1,
    precision: Precision = BF16_MIXED,
    adapter_precision: Precision = FP32_ADAPTER,
    lora_r: int = 16,
    lora_target_modules: Iterable[str] | None = None,
    aux_lora_r: int | None = None,
    aux_lora_target_modules: Iterable[str] | None = None,
    aux_adapter_precision: Precision | None = None,
    gradients_persist: bool | None = None,
) -> MemoryBreakdown:
    """Model-state bytes per device of a DPO run and of its aux model.

    Args:
        shape ([`ModelShape`]):
            The policy's shape (`ModelShape.from_config` / `from_model`).
        policy (`str`, *optional*, defaults to `"full"`):
            `"full"` fine-tuning (P trained parameters at `precision.total` bytes, reference `precision.weight` per
            parameter) or `"lora"` (frozen base at `precision.weight` bytes per parameter, adapter of
            `shape.lora_parameters(lora_r, lora_target_modules)` parameters at `adapter_precision.total`, no
            reference model).
        aux (`str`, *optional*, defaults to `"none"`):
            `"none"` (plain DPO, or a rule without LossDiff), `"full"` (a copy of the policy with its own AdamW: the
            policy's trained-parameter bytes again; with a LoRA policy that is a second adapter) or `"lora"` (a rank
            `aux_lora_r` adapter on θ_t at `adapter_precision.total` bytes per adapter parameter; with a LoRA policy
            the same as `"full"`).
        strategy (`str`, *optional*, defaults to `"single"`):
            How the states are sharded (see the module docstring); bytes are per device, rounded up.
        world_size (`int`, *optional*, defaults to `1`):
            Ranks the states are sharded over.
        precision ([`Precision`], *optional*, defaults to `BF16_MIXED`):
            Bytes per parameter of the policy's trained parameters.
        adapter_precision ([`Precision`], *optional*, defaults to `FP32_ADAPTER`):
            Bytes per parameter of LoRA adapters.
        lora_r (`int`, *optional*, defaults to `16`):
            Rank of the policy's adapter, when `policy="lora"`.
        lora_target_modules (`Iterable[str]`, *optional*, defaults to `None`):
            Modules of the policy's adapter (`None`: all linear layers but the LM head).
        aux_lora_r (`int`, *optional*, defaults to `None`):
            Rank of the aux adapter when `aux="lora"` (`None`: `DEFAULT_AUX_LORA_R`).
        aux_lora_target_modules (`Iterable[str]`, *optional*, defaults to `None`):
            Modules of the aux adapter (`None`: all linear layers but the LM head).
        aux_adapter_precision ([`Precision`], *optional*, defaults to `None`):
            Bytes per parameter of the `aux="lora"` adapter on a fully fine-tuned policy (`None`: `adapter_precision`;
            `aux_mode="lora"` creates it in the policy's weight dtype, e.g. `BF16_ADAPTER`).
        gradients_persist (`bool`, *optional*, defaults to `None`):
            Whether the policy's gradients still exist during a refresh (`None`: False for `"single"`, where the
            Trainer frees them after each step, and True otherwise: DDP buckets, DeepSpeed partitions).

    Returns:
        [`MemoryBreakdown`]: `.plain` is plain DPO's peak, `.peak` this run's, `.ratio` their quotient.
    """
    if policy not in ("full", "lora"):
        raise ValueError(f"`policy` must be 'full' or 'lora', got {policy!r}")
    if aux not in ("none", "full", "lora"):
        raise ValueError(f"`aux` must be 'none', 'full' or 'lora', got {aux!r}")
    div = _shard(strategy, world_size)
    p = shape.num_parameters
    if policy == "full":
        trained, trained_precision = p, precision
        frozen_base = 0
        reference = _ceil_div(p * precision.weight, div["weights"])
    else:
        trained, trained_precision = shape.lora_parameters(lora_r, lora_target_modules), adapter_precision
        frozen_base = _ceil_div(p * precision.weight, div["weights"])
        reference = 0  # the base with the adapter disabled
    policy_bytes = {
        "weights": _ceil_div(trained * trained_precision.weight, div["weights"]),
        "gradients": _ceil_div(trained * trained_precision.grad, div["gradients"]),
        "master": _ceil_div(trained * trained_precision.master, div["states"]),
        "optimizer": _ceil_div(trained * trained_precision.optimizer, div["states"]),
    }
    if aux == "full" or (aux == "lora" and policy == "lora"):
        if policy == "full":  # a whole copy in its own engine, sharded like the policy
            aux_bytes = dict(policy_bytes)
        else:  # a second adapter, whole on every rank
            aux_bytes = _whole(trained, adapter_precision)
    elif aux == "lora":
        r = DEFAULT_AUX_LORA_R if aux_lora_r is None else aux_lora_r
        aux_precision = adapter_precision if aux_adapter_precision is None else aux_adapter_precision
        aux_bytes = _whole(shape.lora_parameters(r, aux_lora_target_modules), aux_precision)
    else:
        aux_bytes = dict.fromkeys(policy_bytes, 0)
    persist = strategy != "single" if gradients_persist is None else gradients_persist
    return MemoryBreakdown(
        policy_weights=policy_bytes["weights"],
        policy_gradients=policy_bytes["gradients"],
        policy_master=policy_bytes["master"],
        policy_optimizer=policy_bytes["optimizer"],
        frozen_base=frozen_base,
        reference=reference,
        aux_weights=aux_bytes["weights"],
        aux_gradients=aux_bytes["gradients"],
        aux_master=aux_bytes["master"],
        aux_optimizer=aux_bytes["optimizer"],
        gradients_persist=persist,
        settings={
            "num_parameters": p,
            "policy": policy,
            "aux": aux,
            "strategy": strategy,
            "world_size": world_size,
            "precision": asdict(precision),
        },
    )


def _whole(parameters: int, precision: Precision) -> dict[str, int]:
    return {
        "weights": parameters * precision.weight,
        "gradients": parameters * precision.grad,
        "master": parameters * precision.master,
        "optimizer": parameters * precision.optimizer,
    }


# ----- the construction-time warning (glue: reads the trainer's config, model and accelerator) -----


def _run_strategy(accelerator: Any) -> tuple[str, int, int | None]:
    """(strategy, world size, DeepSpeed ZeRO stage or None) of the accelerator's run."""
    world_size = int(getattr(accelerator, "num_processes", 1) or 1)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None:
        stage = int(getattr(plugin, "zero_stage", 0) or 0)
        return ({0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[stage], world_size, stage)
    return ("ddp" if world_size > 1 else "single", world_size, None)


def _run_precision(args: Any, model: torch.nn.Module, deepspeed: bool) -> Precision:
    """Bytes per trained parameter of this run: DeepSpeed half precision keeps fp32 master weights and Adam moments;
    otherwise torch AdamW keeps its two moments in the parameters' own dtype, and there is no master copy."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    weight = torch.empty((), dtype=dtype).element_size()
    if deepspeed and (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        return Precision(weight=2, grad=2, master=4, optimizer=8)
    return Precision(weight=weight, grad=weight, master=0, optimizer=2 * weight)


def warn_if_aux_memory_costly(
    args: Any, model: torch.nn.Module, accelerator: Any, fraction: float = AUX_MEMORY_WARNING_FRACTION
) -> MemoryBreakdown | None:
    """Log a warning when the configured aux model raises the model-state peak by more than `fraction` over plain DPO.

    Only a full-copy aux (a policy trained without PEFT, `aux_mode` not `"lora"`) can: the warning gives the predicted
    bytes per device and names the cheaper `aux_mode="lora"`. Returns the breakdown it judged (None when the run has
    no aux model or its aux is an adapter).
    """
    from accelerate.utils import is_peft_model

    if not getattr(args, "selection_enabled", False) or not getattr(args, "needs_auxiliary", False):
        return None
    if is_peft_model(model) or getattr(args, "aux_mode", "full") == "lora":
        return None
    strategy, world_size, stage = _run_strategy(accelerator)
    shape = ModelShape.from_model(model)
    precision = _run_precision(args, model, stage is not None)
    settings = {"strategy": strategy, "world_size": world_size, "precision": precision}
    full = memory_breakdown(shape, aux="full", **settings)
    if full.ratio - 1 <= fraction:
        return full
    lora_r = getattr(args, "aux_lora_r", None) or DEFAULT_AUX_LORA_R
    # The injected adapter takes the adapted weight's dtype; a half-precision one is stepped through fp32 masters
    half = precision.weight < 4
    lora = memory_breakdown(
        shape,
        aux="lora",
        aux_lora_r=lora_r,
        aux_lora_target_modules=getattr(args, "aux_lora_target_modules", None),
        aux_adapter_precision=BF16_ADAPTER if half else FP32_ADAPTER,
        **settings,
    )
    logger.warning(
        'The auxiliary model is a full copy of the policy (aux_mode="full", no PEFT): while it is aligned, at each '
        "refresh, it adds its own weights, gradients and AdamW state, %.2f GiB per device, and raises the peak of the "
        "model states (weights, gradients, optimizer, reference; activations not counted) from %.2f to %.2f GiB "
        '(+%.0f%%, over the %.0f%% this check allows). aux_mode="lora" aligns a rank-%d LoRA adapter on θ_t instead '
        "(%.3f GiB, +%.0f%%); or train the policy with PEFT, whose aux is a second adapter. (%s, %d device(s), %.1fM "
        "parameters.)",
        full.aux / GIB,
        full.plain / GIB,
        full.peak / GIB,
        100 * (full.ratio - 1),
        100 * fraction,
        lora_r,
        lora.aux / GIB,
        100 * (lora.ratio - 1),
        strategy,
        world_size,
        shape.num_parameters / 1e6,
    )
    return full
