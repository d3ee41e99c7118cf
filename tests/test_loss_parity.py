"""`PreferenceLoss` against TRL's own loss: for every configuration, the batch mean of the per-pair loss equals what
`DPOTrainer._compute_loss` returns on the same batch (trl/trainer/dpo_trainer.py:1285-1516, TRL 1.16).

The policy is the tiny Llama with noise added to its weights, the reference the unperturbed copy, so that every log-ratio
is non-zero. The per-pair summed log-probs come from TRL's own `compute_ref_log_probs` run on each model, the lengths
from `completion_lengths` over the tokenized columns (not from the batch), so the test also checks that arithmetic
against the collator's `completion_mask`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trl_select import SelectiveDPOConfig
from trl_select.scores import (
    SUPPORTED_LOSS_TYPES,
    UNSUPPORTED_LOSS_TYPES,
    PairLogProbs,
    PreferenceLoss,
    completion_lengths,
)
from trl_select.testing import build_tiny_llama


# Each case: the DPOConfig loss fields. `exo_pair` needs label_smoothing > 0 (TRL refuses 0, dpo_trainer.py:829).
CASES = [
    *[{"loss_type": [t]} for t in SUPPORTED_LOSS_TYPES if t != "exo_pair"],
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "label_smoothing": 0.2},  # read at dpo_trainer.py:1429-1431
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.7, 0.3]},
    {"loss_type": ["ipo", "bco_pair", "apo_zero"], "loss_weights": [1.0, 0.5, 2.0]},
    {"loss_type": ["discopop"], "discopop_tau": 0.3},
    *[
        {"loss_type": [t], "f_divergence_type": f}
        for f in ("forward_kl", "js_divergence", "alpha_divergence")
        for t in ("sigmoid", "ipo", "sigmoid_norm", "hinge")
    ],
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.2},
    {"loss_type": ["robust", "sft"], "f_divergence_type": "js_divergence", "label_smoothing": 0.1},
]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.fixture(scope="module")
def equal_chosen_rows(reverse_rows) -> list[dict]:
    """24 pairs whose chosen completions all have 5 characters (TRL's `sft` term is a token mean over the batch)."""
    rows = [row for row in reverse_rows["train"] if len(row["chosen"]) == 5][:24]
    assert len(rows) == 24
    return rows


def _trl_loss_and_pairs(tokenizer, rows, tmp_path, **loss_fields):
    torch.manual_seed(0)
    reference = build_tiny_llama(tokenizer, seed=0)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        beta=0.5,
        max_length=9,  # truncates some prompt+rejected sequences (keep_start): lengths must follow the collator
        **loss_fields,
    )
    trainer = DPOTrainer(
        policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        policy_logps = PairLogProbs(*trainer.compute_ref_log_probs(trainer.model, batch))
        reference_logps = PairLogProbs(*trainer.compute_ref_log_probs(trainer.ref_model, batch))
    lengths = completion_lengths(
        [len(x) for x in dataset["prompt_ids"]],
        [len(x) for x in dataset["chosen_ids"]],
        [len(x) for x in dataset["rejected_ids"]],
        args.max_length,
        args.truncation_mode,
    )
    return args, batch, trl_loss, policy_logps, reference_logps, lengths


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mean_per_pair_loss_equals_trl_loss(case, tokenizer, equal_chosen_rows, tmp_path):
    args, batch, trl_loss, policy, reference, lengths = _trl_loss_and_pairs(
        tokenizer, equal_chosen_rows, tmp_path, **case
    )
    loss = PreferenceLoss.from_args(args)
    per_pair = loss(policy, reference, lengths)
    assert per_pair.shape == (len(equal_chosen_rows),)
    torch.testing.assert_close(per_pair.mean(), trl_loss.float(), rtol=1e-5, atol=1e-6)
    assert float(trl_loss) != 0.0


def test_lengths_match_the_collators_completion_mask(tokenizer, reverse_rows, tmp_path):
    rows = reverse_rows["train"][:40]  # mixed lengths, some truncated at max_length=9
    # keep_end at 6 cuts whole prompts off the longer pairs: their first token is a completion token with no log-prob
    for mode, max_length in (("keep_start", 9), ("keep_end", 6)):
        args = DPOConfig(
            output_dir=str(tmp_path),
            report_to="none",
            use_cpu=True,
            bf16=False,
            max_length=max_length,
            truncation_mode=mode,
        )
        model = build_tiny_llama(tokenizer, seed=0)
        trainer = DPOTrainer(
            model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )  # fmt: skip
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        mask = batch["completion_mask"]
        lengths = completion_lengths(
            [len(x) for x in dataset["prompt_ids"]],
            [len(x) for x in dataset["chosen_ids"]],
            [len(x) for x in dataset["rejected_ids"]],
            max_length,
            mode,
        )
        chosen_mask, rejected_mask = mask.chunk(2)
        assert torch.equal(lengths.chosen, chosen_mask.sum(1))  # dpo_trainer.py:1398, 1505
        assert torch.equal(lengths.rejected, rejected_mask.sum(1))
        assert torch.equal(lengths.chosen_scored, chosen_mask[:, 1:].sum(1))  # dpo_trainer.py:1496
        untruncated = [len(c) + len(r) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
        assert bool((lengths.chosen + lengths.rejected < torch.tensor(untruncated)).any())  # truncation exercised
        if mode == "keep_end":
            assert bool((lengths.chosen_scored < lengths.chosen).any())


def test_sft_is_each_pairs_own_token_mean():
    """TRL's `sft` is one token mean over the batch; per pair it is the pair's own: -log π(y_w|x) / n_w."""
    policy = PairLogProbs(torch.tensor([-6.0, -2.0]), torch.tensor([-1.0, -1.0]))
    reference = PairLogProbs(torch.zeros(2), torch.zeros(2))
    lengths = completion_lengths([3, 3], [3, 1], [2, 2], None)
    per_pair = PreferenceLoss(beta=0.1, loss_types=("sft",))(policy, reference, lengths)
    torch.testing.assert_close(per_pair, torch.tensor([2.0, 2.0]))
    # TRL's batch value would be (6 + 2) / (3 + 1) = 2.0 too here, but differs for unequal lengths in general:
    lengths = completion_lengths([3, 3], [3, 2], [2, 2], None)
    assert PreferenceLoss(beta=0.1, loss_types=("sft",))(policy, reference, lengths).mean() != pytest.approx(8 / 5)


@pytest.mark.parametrize("loss_type", sorted(UNSUPPORTED_LOSS_TYPES))
def test_batch_sorting_losses_are_refused_with_the_reason(loss_type):
    with pytest.raises(ValueError, match="sorts.*no per-pair loss"):
        PreferenceLoss(beta=0.1, loss_types=(loss_type,))
    with pytest.raises(ValueError, match=f"`loss_type='{loss_type}'` \\(`--loss_type`\\) cannot be scored per pair"):
        SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, loss_type=[loss_type])


@pytest.mark.parametrize("rule", ["irm_band", "reward_gap", "davir"])
@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "ipo", "sft"])
def test_rules_that_read_no_loss_accept_every_loss(rule, loss_type):
    config = SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, loss_type=[loss_type], selection_rule=rule)
    assert not config.evaluates_loss


def test_every_trl_loss_type_is_either_scored_or_refused_with_a_reason():
    """TRL's list of loss types (its error message, dpo_trainer.py:1513-1515) is covered, nothing more, nothing less."""
    import inspect
    import re

    source = inspect.getsource(DPOTrainer._compute_loss)
    listed = set(re.findall(r"'(\w+)'", source[source.index("Unknown loss type") :].split(")")[0]))
    branches = set(re.findall(r'loss_type == "(\w+)"', source))
    assert listed == branches
    assert listed == set(SUPPORTED_LOSS_TYPES) | set(UNSUPPORTED_LOSS_TYPES)


def test_log_prob_slopes_match_the_closed_form_for_dpo_and_slic():
    torch.manual_seed(0)
    policy = PairLogProbs(torch.randn(16, dtype=torch.float64) * 3, torch.randn(16, dtype=torch.float64) * 3)
    reference = PairLogProbs(torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64))
    margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    for loss_type, slope in (
        ("sigmoid", -0.3 * torch.sigmoid(-0.3 * margin)),
        ("hinge", -0.3 * (0.3 * margin < 1).double()),
    ):
        d_chosen, d_rejected = PreferenceLoss(beta=0.3, loss_types=(loss_type,)).log_prob_slopes(policy, reference)
        torch.testing.assert_close(d_chosen, slope)
        torch.testing.assert_close(d_rejected, -slope)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_influence_partials_give_the_gradient_inner_product(case):
    """`IF(z) = ⟨g, ∇θ L(z)⟩` from the per-pair partials and directional derivatives (docs/design.md §3.5) equals
    autograd's inner product, for log-probs that depend on parameters θ: `log π(y|x) = u_y·θ` (float64)."""
    from trl_select.scores import CompletionLengths, influence_from_directional_derivatives

    torch.manual_seed(0)
    n, d = 12, 5
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
    u_chosen, u_rejected = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    reference = PairLogProbs(torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64))
    lengths = CompletionLengths(*(torch.randint(1, 9, (n,)) for _ in range(3)))
    g = torch.randn(d, dtype=torch.float64)
    fields = {"loss_weights": None, "label_smoothing": 0.0, **case}
    loss = PreferenceLoss(
        beta=0.5,
        loss_types=tuple(fields["loss_type"]),
        loss_weights=fields["loss_weights"],
        label_smoothing=fields["label_smoothing"],
        f_divergence_type=fields.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=fields.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=fields.get("discopop_tau", 0.05),
    )
    expected = []
    for i in range(n):
        pair = PairLogProbs((u_chosen[i] @ theta).reshape(1), (u_rejected[i] @ theta).reshape(1))
        one_reference = PairLogProbs(reference.chosen[i : i + 1], reference.rejected[i : i + 1])
        (grad,) = torch.autograd.grad(loss(pair, one_reference, lengths.select([i])).sum(), theta)
        expected.append(grad @ g)
    policy = PairLogProbs((u_chosen @ theta).detach(), (u_rejected @ theta).detach())
    scores = influence_from_directional_derivatives(
        policy, reference, u_chosen @ g, u_rejected @ g, loss, lengths=lengths
    )
    torch.testing.assert_close(scores, torch.stack(expected))


def test_a_resume_with_another_loss_option_is_refused():
    """The loss options change every LossDiff: they are selection settings a resume must keep (older checkpoints,
    which did not record them, are not compared on them)."""
    from types import SimpleNamespace

    from trl_select.checkpoint import check_resumable, config_fingerprint

    def fingerprint(**fields):
        config = SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, loss_type=["robust"], **fields)
        return config_fingerprint(config, world_size=1)

    pool = {"num_pairs": 1, "sha256": "0" * 64}
    saved = SimpleNamespace(pool=pool, config=fingerprint(label_smoothing=0.1))
    check_resumable(saved, pool, fingerprint(label_smoothing=0.1), "ckpt")
    with pytest.raises(ValueError, match="label_smoothing"):
        check_resumable(saved, pool, fingerprint(label_smoothing=0.2), "ckpt")
    older = SimpleNamespace(pool=pool, config={k: v for k, v in saved.config.items() if k != "label_smoothing"})
    check_resumable(older, pool, fingerprint(label_smoothing=0.2), "ckpt")
