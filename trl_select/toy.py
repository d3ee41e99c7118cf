"""Tiny locally built models, tokenizers and the reverse-digits preference task, for demos, tests and benchmarks (no hub).

Everything here is built from scratch on the local machine: a character-level tokenizer made with the ``tokenizers``
library, a randomly initialised tiny Llama, a synthetic preference data set and a few plain-torch helpers to warm-start
and evaluate a policy on it.

The reverse-digits task: the prompt is a string of digits followed by ``"="`` (e.g. ``"4821="``) and the correct
response is the digits reversed (``"1284"``). A tempting wrong rule is to copy the digits unchanged (``"4821"``).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
import string
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers


logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
DIGITS = "0123456789"

__all__ = [
    "build_char_tokenizer",
    "build_tiny_llama",
    "greedy_exact_match",
    "make_reverse_digits_pairs",
    "make_sft_texts",
    "read_jsonl",
    "reverse_answer",
    "sample_digit_prompts",
    "sft_warm_start",
    "write_jsonl",
]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------------


def build_char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Build a character-level tokenizer with the ``tokenizers`` library.

    The vocabulary is ``<pad>`` (id 0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3) followed by every printable ASCII
    character (``string.printable`` without ``"\\t\\r\\x0b\\x0c"``), 100 tokens in all. Every character, spaces and
    newlines included, is its own token and decoding fuses them back with nothing added, so
    ``decode(encode(s)) == s`` for any string over that alphabet. No BOS/EOS is added automatically.

    Returns:
        A fast tokenizer (padding side ``"right"``, ``model_max_length`` 4096) that round-trips through
        ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def build_tiny_llama(
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> transformers.LlamaForCausalLM:
    """Build a randomly initialised tiny ``LlamaForCausalLM`` (fp32) sized for ``tokenizer``.

    ``torch.manual_seed(seed)`` is called right before construction, so the same arguments give identical weights.
    Input and output embeddings are untied. At the defaults with :func:`build_char_tokenizer` the model has 95,040
    parameters.

    Args:
        tokenizer: Supplies the vocabulary size and the pad/bos/eos token ids.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Number of attention heads (and key/value heads).
        intermediate_size: Width of the MLP.
        max_position_embeddings: Longest sequence the rotary embeddings are configured for.
        seed: Seed for the random initialisation.
    """
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.to(torch.float32)
    # Keep `generate` quiet and consistent with the tokenizer.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The reverse-digits task
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Plain-torch training and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_warm_start(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fine-tune ``model`` in place on prompt/completion ``rows`` with a plain torch loop.

    AdamW at a constant learning rate, completion-only loss (prompt tokens are masked with -100; EOS is appended to
    each completion, no BOS is added, matching TRL's handling of non-conversational data). Batches are right-padded
    and reshuffled every epoch with a generator seeded by ``seed``, so runs are deterministic on CPU. The model is
    left in eval mode.

    Args:
        model: A causal LM, trained in place on whatever device it lives on.
        tokenizer: Tokenizer with ``eos_token_id`` and ``pad_token_id``.
        rows: Rows with ``"prompt"`` and ``"completion"`` strings.
        epochs: Passes over ``rows``.
        lr: AdamW learning rate.
        batch_size: Rows per optimisation step.
        seed: Seed for the shuffling.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    device = _model_device(model)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    examples: list[tuple[list[int], list[int]]] = []
    for row in rows:
        prompt_ids = _encode(tokenizer, row["prompt"])
        completion_ids = [*_encode(tokenizer, row["completion"]), eos_id]
        examples.append((prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids))

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total, count = 0.0, 0
        for b in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[b : b + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (ids, lab) in enumerate(batch):
                input_ids[j, : len(ids)] = torch.tensor(ids)
                labels[j, : len(lab)] = torch.tensor(lab)
                attention_mask[j, : len(ids)] = 1
            out = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            total += out.loss.item()
            count += 1
        loss_value = total / count
        logger.debug("sft epoch %d/%d: mean loss %.4f", epoch + 1, epochs, loss_value)
    model.eval()
    logger.info(
        "sft warm start: %d rows x %d epochs in %.1fs, final epoch loss %.4f",
        len(rows),
        epochs,
        time.perf_counter() - start,
        loss_value,
    )


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


# ---------------------------------------------------------------------------------------------------------------------
# JSONL helpers
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as JSON lines to ``path`` (gzip-compressed, reproducibly, if it ends with ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if path.name.endswith(".gz"):
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
            gz.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines from ``path`` (gunzipped if it ends with ``.gz``); blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
