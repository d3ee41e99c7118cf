"""Every score formula of docs/design.md §2-3 against an independent scalar computation."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer

from trl_select.scores import (
    PairLogProbs,
    PreferenceLoss,
    completion_sums,
    implicit_reward_margin,
    loss_difference,
    preference_loss,
    reference_normalised_margin,
    wpo_log_weights,
)


def _random_log_probs(generator: torch.Generator, n: int = 64) -> PairLogProbs:
    return PairLogProbs(
        chosen=-torch.rand(n, generator=generator, dtype=torch.float64) * 40,
        rejected=-torch.rand(n, generator=generator, dtype=torch.float64) * 40,
    )


def _margin(p, r, i):
    return (p.chosen[i].item() - r.chosen[i].item()) - (p.rejected[i].item() - r.rejected[i].item())


def _dpo(h, beta):
    return math.log1p(math.exp(-beta * h))  # -log σ(βh)


def _slic(h, beta):
    return max(0.0, 1.0 - beta * h)


@pytest.fixture
def triple():
    generator = torch.Generator().manual_seed(7)
    return _random_log_probs(generator), _random_log_probs(generator), _random_log_probs(generator)


def test_margin_and_irm_match_scalar_formula(triple):
    policy, reference, _ = triple
    beta = 0.3
    h = reference_normalised_margin(policy, reference)
    irm = implicit_reward_margin(policy, reference, beta)
    for i in range(len(policy)):
        assert h[i].item() == pytest.approx(_margin(policy, reference, i), rel=1e-12, abs=1e-12)
        assert irm[i].item() == pytest.approx(beta * _margin(policy, reference, i), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("loss_type, scalar", [("sigmoid", _dpo), ("hinge", _slic)])
def test_lossdiff_matches_scalar_formula(triple, loss_type, scalar):
    policy, reference, auxiliary = triple
    beta = 0.1
    lossdiff = loss_difference(policy, auxiliary, reference, beta, loss_type)
    for i in range(len(policy)):
        expected = scalar(_margin(policy, reference, i), beta) - scalar(_margin(auxiliary, reference, i), beta)
        assert lossdiff[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_lossdiff_sign_follows_the_aux_direction():
    reference = PairLogProbs(torch.zeros(2), torch.zeros(2))
    policy = PairLogProbs(torch.zeros(2), torch.zeros(2))
    # The aux prefers the chosen answer of pair 0 more than the policy does, and of pair 1 less.
    auxiliary = PairLogProbs(torch.tensor([1.0, -1.0]), torch.zeros(2))
    lossdiff = loss_difference(policy, auxiliary, reference, beta=1.0, loss_type="sigmoid")
    assert lossdiff[0] > 0 > lossdiff[1]


def test_preference_loss_equals_trl_expressions():
    margin = torch.linspace(-30, 30, 61, dtype=torch.float64)
    beta = 0.5
    torch.testing.assert_close(
        preference_loss(margin, beta, "sigmoid"), -torch.nn.functional.logsigmoid(beta * margin)
    )
    torch.testing.assert_close(preference_loss(margin, beta, "hinge"), torch.relu(1 - beta * margin))
    assert torch.isfinite(preference_loss(margin * 1e3, beta, "sigmoid")).all()  # stable for large |βh|


def test_unsupported_loss_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="Unsupported loss_type 'ipo'"):
        preference_loss(torch.zeros(2), 0.1, "ipo")
    with pytest.raises(ValueError, match="same shape"):
        PairLogProbs(torch.zeros(2), torch.zeros(3))


# ----- LD-DPO and WPO: per-token values to per-pair ones, as TRL 1.16 forms them -----


def _unequal_batch(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A collated batch of 3 pairs, rows [chosen x3, rejected x3], prompts of 2-3 tokens, right-padded, with completions
    shorter, as long as, and longer than their pair's other completion (scored tokens: 4 vs 2, 3 vs 3, 1 vs 5), and
    per-token log-probs that are zero outside the completion as the fused head's are (labels -100)."""
    prompt = [3, 2, 2, 3, 2, 2]
    completion = [4, 3, 1, 2, 3, 5]
    width = 9
    completion_mask = torch.zeros(6, width, dtype=torch.long)
    attention_mask = torch.zeros(6, width, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt, completion, strict=True)):
        completion_mask[row, p : p + c] = 1
        attention_mask[row, : p + c] = 1
    per_token = -torch.rand(6, width - 1, generator=generator, dtype=torch.float64) * 3
    per_token = per_token * completion_mask[:, 1:]
    input_ids = torch.randint(0, 50, (6, width), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}, per_token


class _ScriptedHead(torch.nn.Module):
    """A model whose fused-head forward returns given per-token log-probs."""

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        assert kwargs["fused_lm_head"] is True
        return SimpleNamespace(log_probs=self.per_token)


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.3, 1.0])
def test_completion_sums_are_trls_own_ld_dpo_sums(ld_alpha):
    generator = torch.Generator().manual_seed(0)
    batch, per_token = _unequal_batch(generator)
    # TRL's own code: `DPOTrainer.compute_ref_log_probs` (trl/trainer/dpo_trainer.py:1243-1283, LD masks at 1269-1281),
    # run with a stand-in trainer and a model that returns `per_token`.
    model = _ScriptedHead(per_token)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
        model=model,
        ref_model=model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        ld_alpha=ld_alpha,
    )
    trl_chosen, trl_rejected = DPOTrainer.compute_ref_log_probs(trainer, model, batch)
    ours = completion_sums(per_token, batch["completion_mask"][:, 1:], ld_alpha)
    torch.testing.assert_close(ours, torch.cat([trl_chosen, trl_rejected]), rtol=0, atol=0)
    # The same masks as `_compute_loss`'s policy sums (dpo_trainer.py:1303-1315), written out per pair: the first
    # min(n_w, n_l) completion tokens of each completion in full, the rest times α.
    mask = batch["completion_mask"][:, 1:].bool()
    for pair in range(3):
        chosen, rejected = per_token[pair][mask[pair]], per_token[pair + 3][mask[pair + 3]]
        shared = min(len(chosen), len(rejected))
        for row, values in ((pair, chosen), (pair + 3, rejected)):
            alpha = 1.0 if ld_alpha is None else ld_alpha
            expected = values[:shared].sum() + alpha * values[shared:].sum()
            torch.testing.assert_close(ours[row], expected)
    if ld_alpha is not None and ld_alpha < 1.0:
        assert not torch.allclose(ours, per_token.sum(dim=1))  # the unequal pairs' tails are down-weighted


def test_wpo_log_weights_are_trls_weights():
    generator = torch.Generator().manual_seed(1)
    batch, per_token = _unequal_batch(generator)
    shift_mask = batch["completion_mask"][:, 1:]
    log_sum_sq = -torch.rand(per_token.shape, generator=generator, dtype=torch.float64) * shift_mask
    # TRL's expression, dpo_trainer.py:1518-1526 (`seq_len` slicing aside)
    completion_lengths = shift_mask.sum(dim=1).clamp_min(1)
    aligned_logps = (per_token - log_sum_sq) * shift_mask
    weights = torch.exp(aligned_logps.sum(dim=1) / completion_lengths)
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    expected = chosen_weights * rejected_weights
    log_weight = wpo_log_weights(per_token.requires_grad_(True), log_sum_sq, shift_mask)
    assert not log_weight.requires_grad  # a constant to autograd, as TRL computes it under no_grad
    torch.testing.assert_close(torch.exp(log_weight), expected)


def test_wpo_multiplies_every_term_by_the_scored_models_own_weight():
    generator = torch.Generator().manual_seed(2)
    policy, reference = _random_log_probs(generator, 8), _random_log_probs(generator, 8)
    log_weight = -torch.rand(8, generator=generator, dtype=torch.float64)
    weighted = PreferenceLoss(
        beta=0.3, loss_types=("sigmoid", "bco_pair"), loss_weights=(1.0, 0.5), use_weighting=True
    )
    plain = PreferenceLoss(beta=0.3, loss_types=("sigmoid", "bco_pair"), loss_weights=(1.0, 0.5))
    scored = PairLogProbs(policy.chosen, policy.rejected, log_weight)
    torch.testing.assert_close(weighted(scored, reference), torch.exp(log_weight) * plain(policy, reference))
    with pytest.raises(ValueError, match="log_weight"):
        weighted(policy, reference)  # log-probs scored without WPO
    # The weight is a constant: the slopes are the weight times the unweighted slopes (TRL's backward)
    slopes, plain_slopes = weighted.log_prob_slopes(scored, reference), plain.log_prob_slopes(policy, reference)
    for slope, plain_slope in zip(slopes, plain_slopes, strict=True):
        torch.testing.assert_close(slope, torch.exp(log_weight) * plain_slope)
    with pytest.raises(ValueError, match="sft"):
        PreferenceLoss(beta=0.3, loss_types=("sft",), use_weighting=True)  # TRL 1.16 cannot train it
