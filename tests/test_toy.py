"""Tests for ``trl_select.testing``: tokenizer, tiny Llama, reverse-digits data, SFT warm start and greedy evaluation."""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from trl_select.testing import (
    build_char_tokenizer,
    build_tiny_llama,
    greedy_exact_match,
    make_reverse_digits_pairs,
    make_sft_texts,
    read_jsonl,
    reverse_answer,
    sample_digit_prompts,
    sft_warm_start,
    write_jsonl,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "recipes" / "data" / "reverse_digits"
SCRIPT = REPO_ROOT / "recipes" / "data" / "make_reverse_digits.py"
ALPHABET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _is_near_miss(wrong: str, right: str) -> bool:
    if len(wrong) != len(right) or wrong == right:
        return False
    diff = [i for i in range(len(right)) if wrong[i] != right[i]]
    if len(diff) == 1:
        return True
    i = diff[0]
    return len(diff) == 2 and diff[1] == i + 1 and wrong[i] == right[i + 1] and wrong[i + 1] == right[i]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_specials(tokenizer):
    assert len(tokenizer) == 4 + len(ALPHABET) == 100
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 4096


@pytest.mark.parametrize("text", [ALPHABET, "4821=1284", "  two  spaces \n\nnew lines ", "don't , . ? !", "", " "])
def test_tokenizer_round_trip(tokenizer, text, tmp_path):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no BOS/EOS added
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.decode(ids) == text
    assert reloaded.padding_side == "right"
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)


def test_tokenizer_unknown_character(tokenizer):
    assert tokenizer("a\tb")["input_ids"][1] == tokenizer.unk_token_id


# --------------------------------------------------------------------------------------------------------------------
# Tiny Llama
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_llama_size_and_config(tokenizer):
    model = build_tiny_llama(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == 95_040
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == 0 and model.config.bos_token_id == 1 and model.config.eos_token_id == 2
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tiny_llama_deterministic(tokenizer):
    a, b, c = build_tiny_llama(tokenizer), build_tiny_llama(tokenizer), build_tiny_llama(tokenizer, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------------------
# Reverse-digits pairs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, flip", [(500, 0.3), (101, 0.25), (64, 0.0), (50, 1.0)])
def test_pairs_structure(n, flip):
    rows = make_reverse_digits_pairs(n, flip_fraction=flip, seed=7)
    assert [r["id"] for r in rows] == list(range(n))
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == n
    assert sum(r["flipped"] for r in rows) == round(flip * n)
    for r in rows:
        assert set(r) == {"id", "prompt", "chosen", "rejected", "flipped", "rejected_kind"}
        digits = r["prompt"][:-1]
        assert r["prompt"].endswith("=") and digits.isdigit() and 3 <= len(digits) <= 6
        correct = digits[::-1]
        assert reverse_answer(r["prompt"]) == correct
        good, bad = (r["rejected"], r["chosen"]) if r["flipped"] else (r["chosen"], r["rejected"])
        assert good == correct
        assert bad != correct
        if r["rejected_kind"] == "copy":
            assert bad == digits
        else:
            assert r["rejected_kind"] == "near_miss"
            assert _is_near_miss(bad, correct)


def test_pairs_mix_of_kinds():
    rows = make_reverse_digits_pairs(2000, flip_fraction=0.3, seed=0)
    copies = sum(r["rejected_kind"] == "copy" for r in rows)
    assert 0.4 * len(rows) < copies < 0.6 * len(rows)


def test_pairs_deterministic_and_seeded():
    a = make_reverse_digits_pairs(200, flip_fraction=0.3, seed=3)
    assert a == make_reverse_digits_pairs(200, flip_fraction=0.3, seed=3)
    assert a != make_reverse_digits_pairs(200, flip_fraction=0.3, seed=4)


def test_pairs_exclude_prompts():
    first = make_reverse_digits_pairs(300, flip_fraction=0.0, seed=0, min_digits=3, max_digits=3)
    used = {r["prompt"] for r in first}
    second = make_reverse_digits_pairs(
        600, flip_fraction=0.0, seed=0, min_digits=3, max_digits=3, exclude_prompts=used
    )
    assert not used & {r["prompt"] for r in second}
    with pytest.raises(ValueError):
        sample_digit_prompts(101, seed=0, min_digits=2, max_digits=2)


def test_make_sft_texts():
    prompts = sample_digit_prompts(200, seed=0)
    rows = make_sft_texts(prompts, correct_fraction=0.5, seed=1)
    assert [r["prompt"] for r in rows] == prompts
    n_correct = sum(r["completion"] == reverse_answer(r["prompt"]) for r in rows)
    n_copy = sum(r["completion"] == r["prompt"][:-1] for r in rows)
    n_palindromes = sum(p[:-1] == p[:-1][::-1] for p in prompts)
    assert all(r["completion"] in (reverse_answer(r["prompt"]), r["prompt"][:-1]) for r in rows)
    assert n_correct - n_palindromes <= 100 <= n_correct
    assert n_correct + n_copy - n_palindromes == 200
    assert rows == make_sft_texts(prompts, correct_fraction=0.5, seed=1)


# --------------------------------------------------------------------------------------------------------------------
# JSONL and shipped data
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_jsonl_round_trip(tmp_path, name):
    rows = make_reverse_digits_pairs(20, flip_fraction=0.5, seed=0)
    write_jsonl(rows, tmp_path / name)
    assert read_jsonl(tmp_path / name) == rows
    first = (tmp_path / name).read_bytes()
    write_jsonl(rows, tmp_path / name)
    assert (tmp_path / name).read_bytes() == first


def test_shipped_files_match_regeneration(tmp_path):
    spec = importlib.util.spec_from_file_location("make_reverse_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out_dir", str(tmp_path)])
    for name in ["train", "validation", "test", "sft"]:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), name


def test_shipped_splits():
    splits = {name: read_jsonl(DATA_DIR / f"{name}.jsonl") for name in ["train", "validation", "test", "sft"]}
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "validation": 256, "test": 500, "sft": 1000}
    prompt_sets = {k: {r["prompt"] for r in v} for k, v in splits.items()}
    assert sum(len(s) for s in prompt_sets.values()) == len(set().union(*prompt_sets.values()))
    assert sum(r["flipped"] for r in splits["train"]) == 600
    assert not any(r["flipped"] for r in splits["validation"] + splits["test"])


# --------------------------------------------------------------------------------------------------------------------
# Greedy evaluation and SFT warm start
# --------------------------------------------------------------------------------------------------------------------


class OracleLM(torch.nn.Module):
    """A fake causal LM that reads the (left-padded) prompt and emits a rule's answer, then EOS."""

    def __init__(self, tokenizer, rule: str, emit_eos: bool = True):
        super().__init__()
        self.tokenizer, self.rule, self.emit_eos = tokenizer, rule, emit_eos
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, len(self.tokenizer))
        for j in range(batch):
            ids = input_ids[j][attention_mask[j].bool()].tolist()
            # left padding: positions must start at 0 on the first real token
            assert position_ids[j][attention_mask[j].bool()].tolist()[0] == 0
            text = self.tokenizer.decode(ids)
            prompt, _, generated = text.partition("=")
            answer = prompt[::-1] if self.rule == "reverse" else prompt
            if len(generated) < len(answer):
                logits[j, -1, self.tokenizer.convert_tokens_to_ids(answer[len(generated)])] = 1.0
            else:
                logits[j, -1, self.tokenizer.eos_token_id if self.emit_eos else self.tokenizer.pad_token_id] = 1.0
        return SimpleNamespace(logits=logits)


def test_greedy_exact_match_oracles(tokenizer):
    prompts = ["12=", "123=", "4821=", "99999=", "121=", "123456=", "7="]
    assert greedy_exact_match(OracleLM(tokenizer, "reverse"), tokenizer, prompts, batch_size=3) == 1.0
    palindromes = sum(p[:-1] == p[:-1][::-1] for p in prompts)
    assert greedy_exact_match(OracleLM(tokenizer, "copy"), tokenizer, prompts) == palindromes / len(prompts)
    # no EOS -> never a match; too few new tokens -> long answers cannot finish
    assert greedy_exact_match(OracleLM(tokenizer, "reverse", emit_eos=False), tokenizer, prompts) == 0.0
    assert greedy_exact_match(OracleLM(tokenizer, "reverse"), tokenizer, prompts, max_new_tokens=4) == 4 / 7


def test_sft_warm_start_learns_reversal(tokenizer):
    sft_rows = read_jsonl(DATA_DIR / "sft.jsonl")
    test_prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / "test.jsonl")]
    model = build_tiny_llama(tokenizer)
    assert greedy_exact_match(model, tokenizer, test_prompts) == 0.0
    sft_warm_start(model, tokenizer, sft_rows, epochs=20)
    exact = greedy_exact_match(model, tokenizer, test_prompts)
    # measured 0.186 (seed 0); 0.12-0.19 across model/shuffle seeds 0-3
    assert exact > 0.10
    # batching and left padding must not change the answer ...
    assert greedy_exact_match(model, tokenizer, test_prompts, batch_size=7) == exact
    # ... and it must agree with `generate` on left-padded inputs
    tokenizer_left = build_char_tokenizer()
    tokenizer_left.padding_side = "left"
    enc = tokenizer_left(test_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    texts = tokenizer_left.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = sum(t == reverse_answer(p) for t, p in zip(texts, test_prompts, strict=True))
    assert hits / len(test_prompts) == exact
