"""Every score formula of docs/design.md §2-3 against an independent scalar computation."""

from __future__ import annotations

import math

import pytest
import torch

from trl_select.scores import (
    PairLogProbs,
    implicit_reward_margin,
    loss_difference,
    preference_loss,
    reference_normalised_margin,
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
