"""Per-pair scores (DESIGN.md §2-3): pure functions, summed log-probabilities in, one number per pair out.

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
    """Per-pair training loss from the reference-normalised margin `h` (DESIGN.md §2), unreduced.

    - `"sigmoid"` (DPO): `-log σ(β·h)`
    - `"hinge"` (SLiC, reference-normalised as in RSO / TRL `loss_type="hinge"`): `max(0, 1 - β·h)`

    These are the exact expressions of TRL's `DPOTrainer` for the same `loss_type`.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
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
