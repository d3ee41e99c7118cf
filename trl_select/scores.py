"""Per-pair scores (docs/design.md §2-3): pure functions, summed log-probabilities in, one number per pair out.

Every function here works on the CPU or any device, on float tensors of shape `(num_pairs,)`, and knows nothing about
models, ranks or trainers. Log-probabilities are in nats, summed over the completion tokens exactly as TRL's
`DPOTrainer` sums them (prompt tokens masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge")


@dataclass(frozen=True)
class PairLogProbs:
    """Summed completion log-probabilities of one model over a pool of pairs.

    Attributes:
        chosen: `log π(y_w|x)` per pair, shape `(num_pairs,)`, nats.
        rejected: `log π(y_l|x)` per pair, shape `(num_pairs,)`, nats.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape or self.chosen.dim() != 1:
            raise ValueError(
                f"`chosen` and `rejected` must be 1-D tensors of the same shape, got {tuple(self.chosen.shape)} and "
                f"{tuple(self.rejected.shape)}."
            )

    def __len__(self) -> int:
        return self.chosen.numel()


def reference_normalised_margin(policy: PairLogProbs, reference: PairLogProbs) -> torch.Tensor:
    """`h_θ(z) = [log π_θ(y_w|x) - log π_ref(y_w|x)] - [log π_θ(y_l|x) - log π_ref(y_l|x)]`, in nats."""
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def preference_loss(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair training loss from the reference-normalised margin `h` (docs/design.md §2), unreduced.

    - `"sigmoid"` (DPO): `-log σ(β·h)`
    - `"hinge"` (SLiC, reference-normalised as in RSO / TRL `loss_type="hinge"`): `max(0, 1 - β·h)`

    These are the exact expressions of TRL's `DPOTrainer` for the same `loss_type`.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    raise ValueError(f"Unsupported loss_type {loss_type!r}: selection supports {SUPPORTED_LOSS_TYPES}.")


def preference_loss_slope(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """`dL/dh`, the derivative of the per-pair loss with respect to the margin `h` (docs/design.md §2), unreduced.

    - `"sigmoid"` (DPO): `-β · σ(-β·h)`, so `∇θ L_DPO(z) = -β σ(-β h) [∇ log π(y_w|x) - ∇ log π(y_l|x)]`.
    - `"hinge"` (SLiC): `-β · 1[β·h < 1]` (0 at the kink `β·h = 1`, as autograd's `relu` gives).
    """
    if loss_type == "sigmoid":
        return -beta * torch.sigmoid(-beta * margin)
    if loss_type == "hinge":
        return -beta * (beta * margin < 1).to(margin.dtype)
    raise ValueError(f"Unsupported loss_type {loss_type!r}: selection supports {SUPPORTED_LOSS_TYPES}.")


def implicit_reward_margin(policy: PairLogProbs, reference: PairLogProbs, beta: float) -> torch.Tensor:
    """IRM, the implicit reward margin: `IRM(z) = β · h_θt(z)`, in units of β-scaled nats.

    Its batch mean is what `DPOTrainer` logs as `rewards/margins`.
    """
    return beta * reference_normalised_margin(policy, reference)


def loss_difference(
    policy: PairLogProbs, auxiliary: PairLogProbs, reference: PairLogProbs, beta: float, loss_type: str
) -> torch.Tensor:
    """LossDiff: `LD(z) = L(z; θ_t) - L(z; θ_aux)`, in loss units (nats for DPO).

    Larger means that moving from θ_t toward the validation-aligned θ_aux lowers this pair's loss: the pair agrees
    with the validation direction. Both losses use the same reference and the trainer's own `loss_type`.
    """
    policy_loss = preference_loss(reference_normalised_margin(policy, reference), beta, loss_type)
    auxiliary_loss = preference_loss(reference_normalised_margin(auxiliary, reference), beta, loss_type)
    return policy_loss - auxiliary_loss


def reward_gap(policy: PairLogProbs, reference: PairLogProbs, beta: float) -> torch.Tensor:
    """Implicit reward gap (arXiv 2508.04149): `r(x, y_w) - r(x, y_l)` with `r = β log(π_θt/π_ref)`, i.e. IRM.

    The difficulty paper keeps the pairs with the *smallest* gap (the hardest for the current policy); the same
    number as `implicit_reward_margin`, under its own name so score files say which rule read it.
    """
    return implicit_reward_margin(policy, reference, beta)


def davir(policy: PairLogProbs, reference: PairLogProbs) -> torch.Tensor:
    """DavIR normalised learnability of the chosen response: `(ℓ_ref(y_w) - ℓ_θt(y_w)) / ℓ_ref(y_w)`, unitless.

    `ℓ` is the mean per-token NLL of the chosen completion, `ℓ = -log π(y_w|x) / |y_w|`. Both models score the same
    tokens, so the token count cancels: the score is `1 - log π_θt(y_w|x) / log π_ref(y_w|x)` from summed log-probs,
    and it is length-normalised in that it is a relative loss reduction (a long answer with a large absolute drop in
    NLL scores no higher than a short one with the same relative drop). 1 means θ_t fits y_w perfectly, 0 no
    progress over π_ref, negative a regression. A chosen completion π_ref already fits perfectly (`log π_ref = 0`)
    gives a non-finite score, which no rule keeps.
    """
    with torch.no_grad():
        return 1.0 - policy.chosen.double() / reference.chosen.double()


def influence_from_directional_derivatives(
    policy: PairLogProbs,
    reference: PairLogProbs,
    chosen_derivative: torch.Tensor,
    rejected_derivative: torch.Tensor,
    beta: float,
    loss_type: str,
) -> torch.Tensor:
    """`IF(z) = ⟨g, ∇θ L(z)⟩ = (dL/dh)(z) · (D_g log π(y_w|x) - D_g log π(y_l|x))` (docs/design.md §3.5), loss units.

    `chosen_derivative`/`rejected_derivative` are the directional derivatives `D_g log π(y|x) = ⟨∇θ log π(y|x), g⟩` of
    the summed completion log-probs along `g` (the validation-loss gradient for the influence score).
    """
    slope = preference_loss_slope(reference_normalised_margin(policy, reference), beta, loss_type)
    return slope * (chosen_derivative - rejected_derivative)
