"""Building the full-copy aux for ZeRO-1/2 without a host copy: on `meta`, then clones of the policy's tensors.

The 2-process DeepSpeed runs (`tests/test_distributed.py`) check the whole build under ZeRO-2 and ZeRO-3; these check
the ZeRO-1/2 construction itself in one process: dtype, device, values, ties, buffers, and what it refuses.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from trl_select.auxiliary import _check_same_parameters, _construct_on_meta, _materialise_from, _parameter_dtype


def _tiny(tie: bool, dtype: torch.dtype = torch.bfloat16) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        tie_word_embeddings=tie,
    )  # fmt: skip
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
