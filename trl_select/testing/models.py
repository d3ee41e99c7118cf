"""Tiny locally built models and a character tokenizer for demos, tests and benchmarks (no hub). Not public API.

Everything here is built from scratch on the local machine: a character-level tokenizer made with the ``tokenizers``
library, a randomly initialised tiny Llama, and a plain-torch SFT loop to warm-start a policy.
"""

from __future__ import annotations

import logging
import string
import time
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

__all__ = ["build_char_tokenizer", "build_tiny_llama", "sft_warm_start"]


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
