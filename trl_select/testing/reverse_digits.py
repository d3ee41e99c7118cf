"""The reverse-digits preference task used by the demo, the tests and the benchmarks. Not public API.

The prompt is a string of digits followed by ``"="`` (e.g. ``"4821="``) and the correct response is the digits
reversed (``"1284"``). A tempting wrong rule is to copy the digits unchanged (``"4821"``). :func:`build_splits` draws
the four splits shipped in ``recipes/data/reverse_digits/`` (``recipes/data/make_reverse_digits.py`` writes them).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
import transformers

from .models import _encode, _model_device


logger = logging.getLogger(__name__)

DIGITS = "0123456789"

# The shipped splits: sizes, label-flip fraction and seeds (see build_splits).
NUM_TRAIN, TRAIN_FLIP_FRACTION, TRAIN_SEED = 2000, 0.3, 0
NUM_VALIDATION, VALIDATION_SEED = 256, 1
NUM_TEST, TEST_SEED = 500, 2
NUM_SFT, SFT_PROMPT_SEED, SFT_SEED = 1000, 3, 4

__all__ = [
    "build_splits",
    "greedy_exact_match",
    "make_reverse_digits_pairs",
    "make_sft_texts",
    "reverse_answer",
    "sample_digit_prompts",
]


def reverse_answer(prompt: str) -> str:
    """Return the correct response to a reverse-digits prompt: ``"4821="`` -> ``"1284"``."""
    return prompt.removesuffix("=")[::-1]


def _copy_answer(prompt: str) -> str:
    return prompt.removesuffix("=")


def sample_digit_prompts(
    num_prompts: int,
    *,
    seed: int | random.Random,
    min_digits: int = 3,
    max_digits: int = 6,
    exclude_prompts: set[str] | None = None,
) -> list[str]:
    """Sample ``num_prompts`` unique reverse-digits prompts (``min_digits``..``max_digits`` digits followed by ``"="``).

    The number of digits is drawn uniformly and then the digits themselves; duplicates and prompts in
    ``exclude_prompts`` are rejected and redrawn (so very crowded short lengths end up slightly under-represented).

    Args:
        num_prompts: How many prompts to return.
        seed: Seed for ``random.Random``, or a ``random.Random`` instance to draw from.
        min_digits: Fewest digits in a prompt.
        max_digits: Most digits in a prompt.
        exclude_prompts: Prompts that must not be returned.

    Raises:
        ValueError: If the arguments are invalid or there are not enough distinct prompts available.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits=} {max_digits=}")
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    excluded = exclude_prompts or set()
    available = sum(10**k for k in range(min_digits, max_digits + 1)) - len(excluded)
    if num_prompts > available:
        raise ValueError(f"cannot draw {num_prompts} unique prompts: only about {available} are available")
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < num_prompts:
        length = rng.randint(min_digits, max_digits)
        prompt = "".join(rng.choice(DIGITS) for _ in range(length)) + "="
        if prompt in seen or prompt in excluded:
            continue
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def _near_miss(answer: str, rng: random.Random) -> str:
    """Corrupt ``answer`` slightly: swap two neighbouring (different) digits, or change one digit."""
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swappable and rng.random() < 0.5:
        i = rng.choice(swappable)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    i = rng.randrange(len(answer))
    digit = rng.choice([d for d in DIGITS if d != answer[i]])
    return answer[:i] + digit + answer[i + 1 :]


def make_reverse_digits_pairs(
    num_pairs: int,
    *,
    flip_fraction: float,
    seed: int,
    min_digits: int = 3,
    max_digits: int = 6,
    exclude_prompts: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Build the reverse-digits preference data set.

    Each prompt is ``min_digits``..``max_digits`` random digits followed by ``"="``; prompts are unique within the call
    and never in ``exclude_prompts``. The correct response is the digits reversed. The rejected response is, with
    probability 1/2, a near miss of the correct answer (one digit changed or two neighbouring digits swapped) and
    otherwise the "copy rule" answer (the digits unchanged; a near miss instead when the prompt is a palindrome).
    Exactly ``round(flip_fraction * num_pairs)`` pairs, chosen at random, are label-flipped (chosen and rejected
    swapped). Deterministic for a given ``seed``.

    Returns:
        Rows ``{"id", "prompt", "chosen", "rejected", "flipped", "rejected_kind"}`` with ``id`` in ``0..num_pairs-1``
        and ``rejected_kind`` the kind of the wrong answer (``"near_miss"`` or ``"copy"``), wherever it ended up.
    """
    if not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    rng = random.Random(seed)
    prompts = sample_digit_prompts(
        num_pairs, seed=rng, min_digits=min_digits, max_digits=max_digits, exclude_prompts=exclude_prompts
    )
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        correct = reverse_answer(prompt)
        copy = _copy_answer(prompt)
        if rng.random() < 0.5 and copy != correct:
            wrong, kind = copy, "copy"
        else:
            wrong, kind = _near_miss(correct, rng), "near_miss"
        rows.append(
            {"id": i, "prompt": prompt, "chosen": correct, "rejected": wrong, "flipped": False, "rejected_kind": kind}
        )
    num_flipped = round(flip_fraction * num_pairs)
    for i in rng.sample(range(num_pairs), num_flipped):
        row = rows[i]
        row["chosen"], row["rejected"], row["flipped"] = row["rejected"], row["chosen"], True
    logger.debug("built %d reverse-digits pairs (%d flipped, seed %d)", num_pairs, num_flipped, seed)
    return rows


def make_sft_texts(prompts: list[str], *, correct_fraction: float = 0.5, seed: int) -> list[dict[str, str]]:
    """Build prompt/completion rows mixing the correct rule (reversal) and the wrong copy rule.

    Exactly ``round(correct_fraction * len(prompts))`` rows, chosen at random, get the reversal; the others get the
    digits copied unchanged. Fine-tuning on these gives a policy that has both behaviours.

    Returns:
        Rows ``{"prompt": prompt, "completion": answer}`` in the order of ``prompts``.
    """
    if not 0.0 <= correct_fraction <= 1.0:
        raise ValueError(f"correct_fraction must be in [0, 1], got {correct_fraction}")
    rng = random.Random(seed)
    correct = set(rng.sample(range(len(prompts)), round(correct_fraction * len(prompts))))
    return [
        {"prompt": p, "completion": reverse_answer(p) if i in correct else _copy_answer(p)}
        for i, p in enumerate(prompts)
    ]


def build_splits(seed_offset: int = 0) -> dict[str, list[dict]]:
    """Build the four splits (train, validation, test, sft) with mutually disjoint prompts.

    Every split's seed is its fixed seed plus ``seed_offset``; offset 0 gives the shipped files, and
    ``benchmarks/quality.py`` draws a fresh task per benchmark seed with offset ``1000 * seed``.
    """
    train = make_reverse_digits_pairs(NUM_TRAIN, flip_fraction=TRAIN_FLIP_FRACTION, seed=TRAIN_SEED + seed_offset)
    used = {row["prompt"] for row in train}
    validation = make_reverse_digits_pairs(
        NUM_VALIDATION, flip_fraction=0.0, seed=VALIDATION_SEED + seed_offset, exclude_prompts=used
    )
    used |= {row["prompt"] for row in validation}
    test = make_reverse_digits_pairs(NUM_TEST, flip_fraction=0.0, seed=TEST_SEED + seed_offset, exclude_prompts=used)
    used |= {row["prompt"] for row in test}
    sft_prompts = sample_digit_prompts(NUM_SFT, seed=SFT_PROMPT_SEED + seed_offset, exclude_prompts=used)
    sft = make_sft_texts(sft_prompts, correct_fraction=0.5, seed=SFT_SEED + seed_offset)
    return {"train": train, "validation": validation, "test": test, "sft": sft}


@torch.no_grad()
def greedy_exact_match(
    model: torch.nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> float:
    """Fraction of ``prompts`` for which greedy decoding produces exactly the reversed digits.

    A simple batched greedy loop over left-padded prompts (explicit ``position_ids`` from the attention mask, no KV
    cache), stopping each row at EOS. A row counts only if the text before its EOS equals :func:`reverse_answer`;
    running out of ``max_new_tokens`` before EOS counts as a miss. The model is called as
    ``model(input_ids=..., attention_mask=..., position_ids=...).logits``.
    """
    if not prompts:
        return 0.0
    device = _model_device(model)
    was_training = model.training
    model.eval()
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    hits = 0
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        encoded = [_encode(tokenizer, p) for p in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, ids in enumerate(encoded):
            input_ids[j, width - len(ids) :] = torch.tensor(ids)
            attention_mask[j, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        generated: list[list[int]] = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            next_tokens = logits[:, -1, :].argmax(-1)
            for j, token in enumerate(next_tokens.tolist()):
                if not done[j] and token != eos_id:
                    generated[j].append(token)
            done |= next_tokens == eos_id
            if bool(done.all()):
                break
            next_tokens = torch.where(done, torch.full_like(next_tokens, pad_id), next_tokens)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        for j, prompt in enumerate(chunk):
            if done[j] and tokenizer.decode(generated[j], skip_special_tokens=False) == reverse_answer(prompt):
                hits += 1
    model.train(was_training)
    return hits / len(prompts)
