"""Independent reference computations for score tests: plain unbatched forwards, no collator, padding or fused head."""

from __future__ import annotations

import torch


def sequence_log_prob(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """`log π(y|x)`, summed over the completion tokens, from one unbatched forward of `prompt + completion`."""
    ids = torch.tensor([prompt_ids + completion_ids])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    token_log_probs = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_log_probs[len(prompt_ids) - 1 :].sum()


def pair_log_probs(model, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log π(y_w|x), log π(y_l|x))` of one tokenized pair (`prompt_ids`, `chosen_ids`, `rejected_ids`)."""
    return (
        sequence_log_prob(model, row["prompt_ids"], row["chosen_ids"]),
        sequence_log_prob(model, row["prompt_ids"], row["rejected_ids"]),
    )


def token_rows(dataset, num_rows: int | None = None) -> list[dict]:
    """The token columns of the first `num_rows` rows of a tokenized preference dataset."""
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{c: dataset[i][c] for c in columns} for i in range(num_rows or len(dataset))]
