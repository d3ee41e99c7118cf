"""Building the full-copy aux for ZeRO-1/2 without a host copy: on `meta`, then clones of the policy's tensors.

The 2-process DeepSpeed runs (`tests/test_distributed.py`) check the whole build under ZeRO-2 and ZeRO-3; these check
the ZeRO-1/2 construction itself in one process: dtype, device, values, ties, buffers, and what it refuses.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from trl_select.auxiliary import (
    _check_same_parameters,
    _construct_on_meta,
    _materialise_from,
    _parameter_dtype,
    _same_partitioning,
)


def _tiny(tie: bool, dtype: torch.dtype = torch.bfloat16) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_meta_built_aux_is_an_exact_clone_in_the_policy_dtype(tie):
    policy = _tiny(tie)
    aux = _construct_on_meta(policy)
    assert {p.device.type for p in aux.parameters()} == {"meta"}  # construction allocated nothing
    _materialise_from(aux, policy)
    policy_parameters = dict(policy.named_parameters())
    assert [name for name, _ in aux.named_parameters()] == list(policy_parameters)
    for name, parameter in aux.named_parameters():
        source = policy_parameters[name]
        assert parameter.dtype == source.dtype == torch.bfloat16 and parameter.device == source.device
        assert torch.equal(parameter, source)
        assert parameter.data_ptr() != source.data_ptr()  # a copy: training the aux leaves the policy alone
        assert parameter.requires_grad == source.requires_grad
    for (name, buffer), (_, source) in zip(aux.named_buffers(), policy.named_buffers(), strict=True):
        assert buffer.device.type != "meta" and buffer.dtype == source.dtype and torch.equal(buffer, source), name
    # Tied embeddings stay one parameter (one optimizer entry), as in the policy
    assert (aux.lm_head.weight is aux.model.embed_tokens.weight) == tie
    batch = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(aux(batch).logits, policy(batch).logits)


def test_an_aux_with_other_parameters_than_the_policy_is_refused():
    policy = _tiny(False)
    other = _construct_on_meta(_tiny(False))
    del other.lm_head.weight  # as if the config built another architecture
    with pytest.raises(RuntimeError, match=r"other parameters than the policy: missing \['lm_head.weight'\]"):
        _check_same_parameters(policy, other)


def test_parameter_dtype_is_the_dtype_of_most_elements():
    policy = _tiny(False)
    assert _parameter_dtype(policy) == torch.bfloat16
    policy.model.norm.float()  # a few fp32 elements (keep-in-fp32 modules) do not change the build dtype
    assert _parameter_dtype(policy) == torch.bfloat16
    assert _parameter_dtype(_tiny(False, torch.float32)) == torch.float32


def _zero3_param(
    shape: tuple[int, ...], partition: int, dtype: torch.dtype = torch.bfloat16, group: str = "world", **extra
) -> SimpleNamespace:
    """The ZeRO-3 attributes `_same_partitioning` reads: whole shape, this rank's partition (`ds_tensor`)."""
    ds_tensor = torch.empty(partition, dtype=dtype)
    ds_tensor.ds_numel = partition
    if "final_location" in extra:
        ds_tensor.final_location = extra.pop("final_location")
    return SimpleNamespace(ds_shape=torch.Size(shape), ds_tensor=ds_tensor, ds_process_group=group, **extra)


@pytest.mark.parametrize(
    "target",
    [
        _zero3_param((8, 4), 16, torch.float32),  # another dtype
        _zero3_param((4, 8), 16),  # another shape, same numel
        _zero3_param((8, 4), 8),  # partitioned over another number of ranks
        _zero3_param((8, 4), 16, ds_secondary_tensor=torch.empty(8)),  # hpZ keeps a second copy to fill
        _zero3_param((8, 4), 16, group="reversed"),  # the same ranks in another order
        _zero3_param((8, 4), 16, final_location="nvme"),  # swapped to NVMe (set on the partition itself, below)
    ],
    ids=["dtype", "shape", "world-size", "secondary", "group", "nvme"],
)
def test_partitions_that_may_not_correspond_are_not_copied_directly(target, monkeypatch):
    """Anything that could make this rank's policy partition cover other elements than its aux partition: gather."""
    ranks = {"world": [0, 1], "reversed": [1, 0]}
    monkeypatch.setattr(torch.distributed, "get_process_group_ranks", ranks.__getitem__)
    source = _zero3_param((8, 4), 16, final_location="not-nvme")  # as the policy's ZeRO-3 optimizer marks them
    assert _same_partitioning(source, _zero3_param((8, 4), 16))  # the control: same layout, copied directly
    assert not _same_partitioning(source, target)
