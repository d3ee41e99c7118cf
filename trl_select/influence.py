"""Exact first-order influence of each pool pair on the validation loss (docs/design.md §3.5): the `influence` scorer.

    IF(z) = ⟨ ∇θ L(D_val; θ_t), ∇θ L(z; θ_t) ⟩,    L(D_val) = mean over validation pairs of L(v),

over the trainable parameters (all of them, or the LoRA parameters under PEFT), with the identity Hessian. High IF
means an SGD step on z lowers the validation loss: `L_val(θ - η ∇L(z)) ≈ L_val(θ) - η IF(z)`.

How it is computed, exactly and batched. `g = ∇L(D_val)` takes one backward pass over the validation pairs. Then,
since every per-pair loss of the trainer (`PreferenceLoss`) is a function of the pair's two summed log-probs,
`∇L(z) = ∂L/∂log π(y_w|x) ∇ log π(y_w|x) + ∂L/∂log π(y_l|x) ∇ log π(y_l|x)` (for DPO the partials are `±dL/dh`,
`dL/dh = -β σ(-β h)`; hinge: `-β 1[βh < 1]`), and

    IF(z) = ∂L/∂log π(y_w|x) · D_g log π(y_w|x) + ∂L/∂log π(y_l|x) · D_g log π(y_l|x),

where `D_g f = ⟨∇f, g⟩` is the directional derivative along `g`. One forward-mode pass (`torch.func.jvp`) gives
`D_g log π` for every sequence of a batch at once, so no per-pair gradient is ever materialised: the pool costs one
JVP per batch (about 2-3 forwards' time and memory) instead of one backward per pair, and a random projection of
per-pair gradients, the usual way to make their storage affordable, is not needed. Memory: the tangent `g` is one
extra copy of the trainable parameters.

Cost (one process): `ceil(|D_val| / B)` forward+backward passes, plus `ceil(|pool| / B)` JVP passes, with eager
attention (PyTorch has no forward-mode derivative for its fused SDPA kernels, so attention switches to the `eager`
implementation for the pass and back afterwards). It is the reference the cheap scores are checked against, not a
default: use it for verification and small runs.

Scope: one process, no DeepSpeed. With several processes the pool and validation shards would need a deduplicated
all-reduce of `g`; that is not implemented, and the scorer raises rather than return per-rank numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call, jvp
from tqdm.auto import tqdm

from .scores import (
    CompletionLengths,
    PairLogProbs,
    PreferenceLoss,
    completion_sums,
    influence_from_directional_derivatives,
    wpo_log_weights,
)
from .scoring import NON_MODEL_KEYS, ROW_KEY, activation_checkpointing_off, build_pass_loader, progress_disabled


if TYPE_CHECKING:
    from .registry import ScoringContext


def completion_log_probs(
    model: torch.nn.Module,
    batch: dict[str, Any],
    params: dict[str, torch.Tensor] | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed completion log-probs of every sequence of a collated batch (chosen rows first, then rejected), nats, and
    WPO's per-pair log-weight (`None` without `use_weighting`).

    The sums and the weight are TRL's (`scores.completion_sums`, LD-weighted with `ld_alpha`;
    `scores.wpo_log_weights`, without gradient), from `log_softmax` of plain logits rather than TRL's fused LM head,
    whose custom kernel has no forward-mode derivative: `log Σ_v π(v)²` is `logsumexp(2 log π)` over the vocabulary,
    one more vocabulary-wide op per token. With `params`, the model runs with those parameters substituted
    (`torch.func.functional_call`), which is what `jvp` differentiates.
    """
    model_kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    if params is None:
        outputs = model(**model_kwargs)
    else:
        outputs = functional_call(model, params, args=(), kwargs=model_kwargs, strict=False)
    targets = batch["input_ids"][:, 1:]
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
    logits = outputs.logits[:, -targets.size(1) - 1 : -1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    shift_completion_mask = batch["completion_mask"][:, 1:]
    mask = shift_completion_mask.to(log_probs.dtype)
    # Zero outside the completion, as the fused head's `log_probs` (labels -100) are
    per_token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    sums = completion_sums(per_token, shift_completion_mask, ld_alpha)
    if not use_weighting:
        return sums, None
    with torch.no_grad():
        log_sum_sq_probs = torch.logsumexp(2 * log_probs.detach(), dim=-1) * mask
    return sums, wpo_log_weights(per_token.detach(), log_sum_sq_probs, shift_completion_mask)


@contextlib.contextmanager
def _input_requires_grad_hooks_lifted(model: torch.nn.Module) -> Iterator[None]:
    """Detach the `make_inputs_require_grad(s)` forward hooks from every module for the pass, then put them back.

    Enabling activation checkpointing (transformers), and PEFT with it, hook the input embeddings to call
    `output.requires_grad_(True)`, and `jvp` refuses an in-place `requires_grad_` inside its transform. Neither the
    validation backward nor the JVPs need the hook once checkpointing is off. The very hooks are restored rather than
    re-created: transformers' `enable_input_require_grads` forgets earlier handles, so no API removes them all.
    """
    lifted: list[tuple[dict, int, Any]] = []
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                lifted.append((module._forward_hooks, key, hook))
                del module._forward_hooks[key]
    try:
        yield
    finally:
        for hooks, key, hook in lifted:
            hooks[key] = hook


@contextlib.contextmanager
def gradient_pass_mode(model: torch.nn.Module, checkpointing_kwargs: dict[str, Any] | None = None) -> Iterator[None]:
    """Eval mode (no dropout), activation checkpointing off, eager attention; the previous state is restored on exit.

    Checkpointing comes back through `scoring.activation_checkpointing_off`, with the trainer's `checkpointing_kwargs`,
    as after every other scoring pass (not with transformers' defaults).
    """
    was_training = model.training
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch_attention = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    with activation_checkpointing_off(model, checkpointing_kwargs), _input_requires_grad_hooks_lifted(model):
        if switch_attention:
            model.set_attn_implementation("eager")
        model.eval()
        try:
            yield
        finally:
            if switch_attention:
                model.set_attn_implementation(attention)
            model.train(was_training)


def _check_supported(context: ScoringContext, parameters: dict[str, torch.nn.Parameter]) -> None:
    if context.accelerator is not None and context.accelerator.num_processes > 1:
        raise NotImplementedError(
            f"The `influence` score (rules `tif`, ...) runs on one process only; this run has "
            f"{context.accelerator.num_processes}. Score offline with `trl-select score --scores influence` on one "
            "process, or use a forward-only score (`lossdiff`, `irm`) for multi-process runs."
        )
    if not parameters:
        raise ValueError("The `influence` score needs trainable parameters; the model has none with requires_grad.")
    if any(hasattr(p, "ds_id") for p in parameters.values()):
        raise NotImplementedError("The `influence` score does not support DeepSpeed-managed parameters.")


def validation_gradient(
    model: torch.nn.Module,
    parameters: dict[str, torch.nn.Parameter],
    loader,
    reference: PairLogProbs,
    num_rows: int,
    loss: PreferenceLoss | float,
    loss_type: str | None = None,
    lengths: CompletionLengths | None = None,
    ld_alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """`∇θ L(D_val)`, the gradient of the mean validation loss over `parameters`, one backward per batch.

    `loss` is the trainer's [`PreferenceLoss`] (or `beta`, with one `loss_type`); `lengths` the validation pairs'
    completion lengths, in row order, for the losses that read them; `ld_alpha` TRL's (LD-weighted sums). With WPO
    (`loss.use_weighting`) each validation pair's term is weighted by θ's own weight, a constant, as in TRL.
    """
    if not isinstance(loss, PreferenceLoss):
        loss = PreferenceLoss(beta=float(loss), loss_types=(loss_type,))
    names = list(parameters)
    total = {name: torch.zeros_like(p) for name, p in parameters.items()}
    seen = torch.zeros(num_rows, dtype=torch.bool)
    for batch in loader:
        rows = batch[ROW_KEY].cpu()
        # A padding duplicate (or a row seen before) contributes nothing: each validation pair counts once.
        fresh = ~seen[rows]
        seen[rows] = True
        if not bool(fresh.any()):
            continue
        sums, log_weight = completion_log_probs(model, batch, ld_alpha=ld_alpha, use_weighting=loss.use_weighting)
        chosen, rejected = sums.chunk(2)
        device = chosen.device
        batch_reference = PairLogProbs(
            chosen=reference.chosen[rows].to(device, chosen.dtype),
            rejected=reference.rejected[rows].to(device, rejected.dtype),
        )
        batch_lengths = None if lengths is None else lengths.select(rows).to(device)
        losses = loss(PairLogProbs(chosen, rejected, log_weight), batch_reference, batch_lengths)
        total_loss = (losses * fresh.to(device, losses.dtype)).sum() / num_rows
        for name, grad in zip(names, torch.autograd.grad(total_loss, [parameters[n] for n in names]), strict=True):
            total[name] += grad
    if not bool(seen.all()):
        raise RuntimeError(f"Validation gradient: {int((~seen).sum())} of {num_rows} rows were never seen.")
    return total


def _with_tensor_aux(result: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_log_probs`'s result with an empty tensor for a missing weight (`jvp`'s `aux` must be tensors)."""
    sums, log_weight = result
    return sums, sums.new_empty(0) if log_weight is None else log_weight


def influence_scores(context: ScoringContext) -> np.ndarray:
    """`IF(z)` for every pool row (float64, pool order); see the module docstring for the method and its cost."""
    model = context.model
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    _check_supported(context, parameters)
    loss = context.loss if context.loss is not None else PreferenceLoss(context.beta, (context.loss_type,))
    validation_loader = build_pass_loader(
        context.validation, context.collator, context.accelerator, context.batch_size
    )
    pool_loader = build_pass_loader(context.pool, context.collator, context.accelerator, context.batch_size)
    scores = torch.full((context.pool_size,), float("nan"), dtype=torch.float64)
    with gradient_pass_mode(model, context.checkpointing_kwargs):
        tangent = validation_gradient(
            model, parameters, validation_loader, context.validation_reference, len(context.validation), loss,
            lengths=context.validation_lengths, ld_alpha=context.ld_alpha,
        )  # fmt: skip
        primals = {name: p.detach() for name, p in parameters.items()}
        progress = tqdm(
            pool_loader,
            desc="Influence of each pair",
            disable=progress_disabled(context.accelerator),
            leave=False,
        )
        for batch in progress:
            with torch.no_grad():  # forward-mode only: no reverse graph is needed
                # WPO's weight rides along as `aux` (not differentiated: a constant in TRL's loss)
                values, derivatives, log_weight = jvp(
                    lambda params, batch=batch: _with_tensor_aux(
                        completion_log_probs(model, batch, params, context.ld_alpha, loss.use_weighting)
                    ),
                    (primals,),
                    (tangent,),
                    has_aux=True,
                )
            log_weight = log_weight if loss.use_weighting else None
            rows = batch[ROW_KEY].cpu()
            chosen, rejected = values.chunk(2)
            d_chosen, d_rejected = derivatives.chunk(2)
            scores[rows] = influence_from_directional_derivatives(
                PairLogProbs(chosen=chosen.double().cpu(), rejected=rejected.double().cpu(),
                             log_weight=None if log_weight is None else log_weight.double().cpu()),
                PairLogProbs(chosen=context.reference.chosen[rows].double(),
                             rejected=context.reference.rejected[rows].double()),
                d_chosen.double().cpu(), d_rejected.double().cpu(), loss,
                lengths=None if context.lengths is None else context.lengths.select(rows),
            )  # fmt: skip
    if bool(scores.isnan().any()):
        raise RuntimeError(f"Influence: {int(scores.isnan().sum())} of {context.pool_size} rows were never scored.")
    return scores.numpy()
