"""Test and demo utilities: tiny local models, a character tokenizer and the reverse-digits task.

Not part of the public API (like ``accelerate.test_utils``): the demo recipe, the tests and the benchmarks use it, and
it may change without notice. Nothing here downloads anything.
"""

from .jsonl import read_jsonl, write_jsonl
from .models import build_char_tokenizer, build_tiny_llama, sft_warm_start
from .reverse_digits import (
    build_splits,
    greedy_exact_match,
    make_reverse_digits_pairs,
    make_sft_texts,
    reverse_answer,
    sample_digit_prompts,
)


__all__ = [
    "build_char_tokenizer",
    "build_splits",
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
