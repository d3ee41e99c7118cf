"""The aux adapters in a half-precision policy, as DeepSpeed fp16/bf16 runs them: fp32 master weights, loss scaling.

Under DeepSpeed the policy's module is cast to fp16 or bf16 and accelerate's autocast is off, so the LoRA aux
(injected, or PEFT's second adapter) computes in that dtype. These tests reproduce those numerics on the CPU: a policy
cast to fp16/bf16, no autocast, `loss_scaling=False` (what the engine passes under DeepSpeed).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_select import SelectiveDPOTrainer
from trl_select.auxiliary import AuxiliaryModel, average_in_buckets, bucket_ranges
from trl_select.testing import build_tiny_llama

from .testing_utils import fast_config


def _trainer(tmp_path, tokenizer, pool, validation, model, **overrides) -> SelectiveDPOTrainer:
    settings = {"num_train_epochs": 1, "aux_mode": "lora", "aux_max_steps": 4, **overrides}
    return SelectiveDPOTrainer(
        model,
        ref_model=None if hasattr(model, "peft_config") else copy.deepcopy(model),
        args=fast_config(tmp_path, **settings),
        train_dataset=pool,
        validation_dataset=validation,
        processing_class=tokenizer,
    )


def _half_policy(tokenizer, dtype: torch.dtype, peft: bool) -> torch.nn.Module:
    model = build_tiny_llama(tokenizer, seed=0).to(dtype)
    if peft:
        # DeepSpeed casts the whole module, adapters included, to the run's dtype
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    return model


@pytest.mark.parametrize("peft", [False, True], ids=["injected", "peft"])
def test_fp16_policy_aligns_a_finite_aux_without_autocast(tmp_path, tokenizer, pool, validation, peft):
    """DeepSpeed fp16 numerics: the adapter computes in fp16 and no loss scaling is asked for by the settings.

    An fp16 AdamW step divides by `sqrt(v) + eps` with `eps = 1e-8` rounded to 0 in fp16: the aux log-probs were NaN.
    """
    model = _half_policy(tokenizer, torch.float16, peft)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model, learning_rate=1e-6)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    assert not auxiliary.settings.loss_scaling  # as under DeepSpeed fp16
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert bool(
        torch.isfinite(result.pool_log_probs.chosen).all() and torch.isfinite(result.pool_log_probs.rejected).all()
    )
    assert result.num_steps - result.skipped_steps >= 1  # some steps were applied
    assert result.validation_loss_after == result.validation_loss_after  # not NaN
    # The policy (base and adapter; TRL's PEFT reference adapter "ref" is its own) is still fp16, the aux adapter gone
    assert {p.dtype for n, p in model.named_parameters() if ".ref." not in n} == {torch.float16}
    assert not any(".aux." in n or "trl_select_aux" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_lora_aux_equals_the_policy_before_any_step(tmp_path, tokenizer, pool, validation, dtype):
    """Masters do not break θ_aux = θ_t at B = 0: at learning rate 0 the aux scores are the policy's bit for bit."""
    model = _half_policy(tokenizer, dtype, peft=False)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0, max_steps=2)
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert torch.equal(result.pool_log_probs.chosen, engine.policy_log_probs().chosen)
    assert torch.equal(result.pool_log_probs.rejected, engine.policy_log_probs().rejected)


def test_bf16_lora_aux_a_moves_at_dpo_learning_rates(tmp_path, tokenizer, pool, validation, monkeypatch):
    """A pure-bf16 AdamW step of ~1e-6 rounds away on almost every entry of A (0.2% moved); the fp32 masters move.

    Reads the tensors the aux optimizer steps (recorded as it is built), whatever they are: on the old code the bf16
    adapter itself, now its fp32 masters.
    """
    optimizers: list[torch.optim.Optimizer] = []
    adamw = torch.optim.AdamW

    class RecordingAdamW(adamw):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    model = _half_policy(tokenizer, torch.bfloat16, peft=False)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model, learning_rate=1e-6, aux_max_steps=3)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    initial: dict[int, torch.Tensor] = {}
    align = AuxiliaryModel._align

    def recording_align(self, aux):
        (optimizer,) = [o for o in optimizers if o is not trainer.optimizer]
        for group in optimizer.param_groups:
            initial.update({id(p): p.detach().clone() for p in group["params"]})
        return align(self, aux)

    monkeypatch.setattr(AuxiliaryModel, "_align", recording_align)
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert result.skipped_steps == 0
    (optimizer,) = [o for o in optimizers if o is not trainer.optimizer]
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    # A is r × d_in, drawn non-zero; B is d_out × r and starts at 0 (every entry of B moves either way)
    a_tensors = [p for p in stepped if bool(initial[id(p)].ne(0).all())]
    assert a_tensors
    moved = sum(int(p.detach().ne(initial[id(p)]).sum()) for p in a_tensors)
    total = sum(p.numel() for p in a_tensors)
    assert moved / total >= 0.95, f"{moved}/{total} entries of A moved"
    assert bool(torch.isfinite(result.pool_log_probs.chosen).all())


# ----- gradient averaging in buckets -----


def test_bucket_ranges_are_consecutive_bounded_and_cover_every_tensor():
    assert bucket_ranges([], 10) == []
    assert bucket_ranges([4, 4, 4], 8) == [(0, 2), (2, 3)]
    assert bucket_ranges([3, 20, 3, 3], 8) == [(0, 1), (1, 2), (2, 4)]  # one larger than a bucket goes alone
    assert bucket_ranges([5] * 7, 100) == [(0, 7)]
    numels = [int(n) for n in torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0))]
    ranges = bucket_ranges(numels, 64)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(len(numels)))
    assert all(sum(numels[start:stop]) <= 64 or stop - start == 1 for start, stop in ranges)


def test_average_in_buckets_is_the_per_tensor_average_in_few_collectives():
    """Two simulated ranks: the flat all-reduce sums rank 0's buffer with rank 1's, the result is split back by shape."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 64), (64, 16), (3,), (16, 64), (1, 1), (64, 16)] * 10
    rank0 = [torch.randn(s, generator=generator) for s in shapes] + [torch.randn(5, generator=generator).double()]
    rank1 = [torch.randn_like(t) for t in rank0]
    expected = [(a + b) / 2 for a, b in zip(rank0, rank1, strict=True)]
    other = iter([])
    sizes: list[int] = []

    def all_reduce(flat: torch.Tensor) -> None:
        # rank 1's flat buffer of the same bucket, built the same way
        flat.add_(next(other))
        sizes.append(flat.numel())

    from torch._utils import _flatten_dense_tensors

    buckets_of_rank1 = []
    for dtype in (torch.float32, torch.float64):
        group = [t for t in rank1 if t.dtype == dtype]
        for start, stop in bucket_ranges([t.numel() for t in group], 4096):
            buckets_of_rank1.append(_flatten_dense_tensors(group[start:stop]))
    other = iter(buckets_of_rank1)
    calls = average_in_buckets(rank0, 2, all_reduce, max_numel=4096)
    assert calls == len(buckets_of_rank1) == len(sizes)
    assert calls < len(rank0) / 4  # 61 tensors in 8 collectives
    assert max(sizes) <= 4096
    for averaged, wanted in zip(rank0, expected, strict=True):
        assert averaged.dtype == wanted.dtype and averaged.shape == wanted.shape
        torch.testing.assert_close(averaged, wanted, rtol=0, atol=0)


def test_aux_gradients_are_averaged_in_one_collective_per_bucket(monkeypatch):
    """The aux step's averaging (what 2 ranks run): one all-reduce for a few hundred adapter tensors, not one each."""
    from types import SimpleNamespace

    from trl_select.auxiliary import _average_gradients_across_ranks

    calls: list[int] = []

    def all_reduce(tensor, op=None):
        calls.append(tensor.numel())
        tensor.mul_(2)  # the other rank holds the same gradients

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    parameters = [torch.nn.Parameter(torch.zeros(16, 8)) for _ in range(300)]
    for index, parameter in enumerate(parameters[1:]):
        parameter.grad = torch.full_like(parameter, float(index))
    _average_gradients_across_ranks(parameters, SimpleNamespace(num_processes=2))
    assert calls == [300 * 16 * 8]
    assert torch.equal(parameters[0].grad, torch.zeros(16, 8))  # a missing gradient is sent as zeros
    assert all(torch.equal(p.grad, torch.full((16, 8), float(i))) for i, p in enumerate(parameters[1:]))


# ----- a full-copy aux rebuilt from the class must compute what the policy computes -----


def _rebuilt(policy: torch.nn.Module) -> torch.nn.Module:
    """What `_build_engine` builds under ZeRO-1/2 before handing it to DeepSpeed."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_select.auxiliary import _construct_on_meta, _materialise_from

    aux = _construct_on_meta(policy)
    _materialise_from(aux, policy)
    add_fused_lm_head(aux)
    return aux


def _patch_norm_forward(module: torch.nn.Module) -> None:
    """A kernel bound to one instance, as Liger's `apply_liger_kernel_to_*(model=...)` binds its RMSNorm forward."""
    import types

    def liger_like_rms_norm(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (hidden_states.float() * torch.rsqrt(variance + 1e-5))).to(hidden_states.dtype)

    module.forward = types.MethodType(liger_like_rms_norm, module)


def test_rebuilt_aux_of_a_plain_policy_matches_it(tokenizer):
    from trl.trainer.utils import add_fused_lm_head

    from trl_select.auxiliary import rebuild_mismatches

    policy = build_tiny_llama(tokenizer, seed=0)
    add_fused_lm_head(policy)  # TRL's instance-level forward, re-applied to the aux: not a mismatch
    assert rebuild_mismatches(policy, _rebuilt(policy)) == []


def test_rebuilt_aux_of_a_patched_or_compiled_policy_is_named(tokenizer):
    from trl.trainer.utils import add_fused_lm_head

    from trl_select.auxiliary import rebuild_mismatches

    policy = build_tiny_llama(tokenizer, seed=0)
    add_fused_lm_head(policy)
    _patch_norm_forward(policy.model.norm)
    policy.model.layers[0].mlp.compile()  # compiled in place, as DeepSpeed's `engine.compile()` does
    mismatches = rebuild_mismatches(policy, _rebuilt(policy))
    assert any(m.startswith("model.norm.forward is patched") for m in mismatches), mismatches
    assert "model.layers.0.mlp is compiled (torch.compile)" in mismatches
    # A forward wrapped by TRL's fused head over a patched class forward differs from the rebuilt one's
    other = build_tiny_llama(tokenizer, seed=0)
    other.forward = lambda *args, **kwargs: None
    add_fused_lm_head(other)
    assert any("forward is patched" in m for m in rebuild_mismatches(other, _rebuilt(other)))


def test_full_copy_aux_under_deepspeed_refuses_an_instance_patched_policy(tmp_path, tokenizer, pool, validation):
    """The rebuilt aux would lack the policy's patched norm: θ_aux ≠ θ_t before alignment. Refused, naming the fix."""
    model = build_tiny_llama(tokenizer, seed=0)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model, aux_mode="full")
    _patch_norm_forward(model.model.norm)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    # The settings a ZeRO-2 run gives (the rebuild is checked before any DeepSpeed engine is made)
    auxiliary.settings = dataclasses.replace(
        auxiliary.settings, deepspeed_config={"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    )
    with pytest.raises(ValueError, match=r"aux_mode='full'.*model\.norm\.forward is patched.*aux_mode='lora'"):
        auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert "forward" in vars(model.model.norm)  # the policy is left as it was


def test_fp16_adapter_skips_an_overflowing_step_and_keeps_its_weights(
    tmp_path, tokenizer, pool, validation, monkeypatch
):
    """The scaler of an fp16 adapter (DeepSpeed fp16) finds an inf in the masters' gradients and skips that step."""
    model = _half_policy(tokenizer, torch.float16, peft=False)
    trainer = _trainer(tmp_path, tokenizer, pool, validation, model, learning_rate=1e-6)
    engine = trainer.selection_engine
    auxiliary = engine.auxiliary()
    calls = {"n": 0}
    batch_loss = AuxiliaryModel._batch_loss

    def overflowing_second_step(self, module, batch):
        loss = batch_loss(self, module, batch)
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2:
                return loss * float("inf")
        return loss

    monkeypatch.setattr(AuxiliaryModel, "_batch_loss", overflowing_second_step)
    result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    assert result.num_steps == 4 and result.skipped_steps == 1
    assert bool(
        torch.isfinite(result.pool_log_probs.chosen).all() and torch.isfinite(result.pool_log_probs.rejected).all()
    )
    assert auxiliary.grad_scaler_state["scale"] == 2.0**15  # lowered once, carried to the next refresh
