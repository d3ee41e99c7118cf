"""The `influence` scorer against independent autograd, a finite-difference SGD step, and the DPO closed form."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.influence import influence_scores
from trl_select.registry import ScoringContext
from trl_select.scores import preference_loss, preference_loss_slope

from .independent import pair_log_probs, token_rows
from .testing_utils import fast_config


BETA = 0.5


def _pair_loss(model, reference, row: dict, loss_type: str) -> torch.Tensor:
    chosen, rejected = pair_log_probs(model, row)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_log_probs(reference, row)
    return preference_loss((chosen - ref_chosen) - (rejected - ref_rejected), BETA, loss_type)


def _validation_loss(model, reference, rows: list[dict], loss_type: str) -> torch.Tensor:
    return torch.stack([_pair_loss(model, reference, row, loss_type) for row in rows]).mean()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, reverse_rows):
    """A float64 tiny model moved off its reference, and the trainer's tokenized pool/validation and collator."""
    from datasets import Dataset

    from trl_select.testing import build_tiny_llama

    reference = build_tiny_llama(tokenizer, seed=0).double()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    pool = Dataset.from_list(reverse_rows["train"][:6])
    validation = Dataset.from_list(reverse_rows["validation"][:6])
    args = fast_config(
        tmp_path_factory.mktemp("influence"),
        selection_rule="tif",
        beta=BETA,
        max_length=64,
        per_device_train_batch_size=2,
    )
    trainer = SelectiveDPOTrainer(
        policy, ref_model=reference, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer
    )
    engine = trainer.selection_engine
    context = ScoringContext(
        pool_size=len(pool),
        beta=BETA,
        loss_type="sigmoid",
        reference=engine.reference_log_probs(),
        model=policy,
        pool=trainer.train_dataset,
        collator=trainer.data_collator,
        accelerator=trainer.accelerator,
        batch_size=4,  # 6 rows: a partial last batch
        validation=engine.validation_dataset,
        validation_reference=engine.validation_reference_log_probs(),
    )
    pool_rows, validation_rows = token_rows(trainer.train_dataset), token_rows(engine.validation_dataset)
    for row in pool_rows + validation_rows:  # nothing truncated, so the plain forwards see what the trainer sees
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 64
    return {"policy": policy, "reference": reference, "context": context, "pool": pool_rows, "val": validation_rows}


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_influence_matches_autograd_and_a_finite_difference_sgd_step(setup, loss_type):
    policy, reference = setup["policy"], setup["reference"]
    scores = influence_scores(replace(setup["context"], loss_type=loss_type))

    validation_loss = _validation_loss(policy, reference, setup["val"], loss_type)
    validation_grad = torch.autograd.grad(validation_loss, _params(policy))
    expected = []
    for row in setup["pool"]:
        grads = torch.autograd.grad(_pair_loss(policy, reference, row, loss_type), _params(policy))
        expected.append(sum((a * b).sum() for a, b in zip(validation_grad, grads, strict=True)).item())
    expected = np.array(expected)
    assert np.abs(expected).max() > 1e-3  # the check has something to compare
    # Not 1e-12: the cached reference log-probs are fp32 (as in training), and Llama's RMSNorm computes in fp32.
    np.testing.assert_allclose(scores, expected, rtol=2e-5, atol=1e-8)

    # An SGD step of size η on z changes the validation loss by -η IF(z) to first order.
    step = 1e-5
    for index in (int(np.argmax(scores)), int(np.argmin(scores))):
        # In place and back: a deepcopy of a trainer's model shares TRL's patched forward with the original.
        grads = torch.autograd.grad(_pair_loss(policy, reference, setup["pool"][index], loss_type), _params(policy))
        with torch.no_grad():
            for parameter, grad in zip(_params(policy), grads, strict=True):
                parameter.sub_(step * grad)
            change = (_validation_loss(policy, reference, setup["val"], loss_type) - validation_loss).item()
            for parameter, grad in zip(_params(policy), grads, strict=True):
                parameter.add_(step * grad)
        assert np.sign(change) == -np.sign(scores[index])
        assert -change / step == pytest.approx(scores[index], rel=1e-3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_closed_form_gradient_matches_autograd(setup, loss_type):
    policy, reference = setup["policy"], setup["reference"]
    for row in setup["pool"][:4]:
        chosen, rejected = pair_log_probs(policy, row)
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_log_probs(reference, row)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        autograd = torch.autograd.grad(preference_loss(margin, BETA, loss_type), _params(policy), retain_graph=True)
        grad_chosen = torch.autograd.grad(chosen, _params(policy), retain_graph=True)
        grad_rejected = torch.autograd.grad(rejected, _params(policy))
        slope = preference_loss_slope(margin.detach(), BETA, loss_type)
        if loss_type == "sigmoid":
            assert slope.item() == pytest.approx(-BETA * torch.sigmoid(-BETA * margin).item(), rel=1e-12)
        for auto, chosen_grad, rejected_grad in zip(autograd, grad_chosen, grad_rejected, strict=True):
            # Not 1e-12: Llama's RMSNorm computes in fp32 even in a float64 model.
            torch.testing.assert_close(auto, slope * (chosen_grad - rejected_grad), rtol=1e-5, atol=1e-7)


def test_slope_is_the_derivative_of_the_loss():
    margin = torch.linspace(-6, 6, 25, dtype=torch.float64, requires_grad=True)
    for loss_type in ("sigmoid", "hinge"):
        (derivative,) = torch.autograd.grad(preference_loss(margin, 0.3, loss_type).sum(), margin)
        torch.testing.assert_close(preference_loss_slope(margin.detach(), 0.3, loss_type), derivative)


def test_influence_leaves_the_model_as_it_was(setup):
    policy = setup["policy"]
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    attention, training = policy.config._attn_implementation, policy.training
    influence_scores(setup["context"])
    assert policy.config._attn_implementation == attention and policy.training == training
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert all(p.grad is None for p in policy.parameters())


def test_tif_rule_drives_a_training_run(tmp_path, tokenizer, tiny_model, pool, validation):
    args = fast_config(tmp_path, num_train_epochs=2, selection_rule="tif")
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train()
    record = read_history(tmp_path)[1]
    assert record["rule"] == "tif" and set(record["thresholds"]) == {"influence"}
    assert record["num_selected"] == 80  # 10-90 band of 100 distinct scores


def test_influence_under_peft_is_over_the_lora_parameters(tmp_path, tokenizer, tiny_model, pool, validation):
    from peft import LoraConfig

    args = fast_config(
        tmp_path, num_train_epochs=2, selection_rule="tif", beta=BETA, learning_rate=5e-3, max_length=64
    )
    trainer = SelectiveDPOTrainer(
        tiny_model,
        args=args,
        train_dataset=pool.select(range(32)),
        eval_dataset=validation.select(range(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()  # the warm-up epoch moves the LoRA weights off zero (a one-epoch run cannot select with tif)
    scores = trainer.selection_engine.compute_scores(1, {}, ("influence",))["influence"]

    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    def loss(row):
        chosen, rejected = pair_log_probs(model, row)
        with torch.no_grad(), model.disable_adapter():  # π_ref of a PEFT policy: the base model
            ref_chosen, ref_rejected = pair_log_probs(model, row)
        return preference_loss((chosen - ref_chosen) - (rejected - ref_rejected), BETA, "sigmoid")

    validation_rows = token_rows(trainer.selection_engine.validation_dataset)
    validation_grad = torch.autograd.grad(torch.stack([loss(r) for r in validation_rows]).mean(), lora)
    expected = [
        sum((a * b).sum() for a, b in zip(validation_grad, torch.autograd.grad(loss(row), lora), strict=True)).item()
        for row in token_rows(trainer.train_dataset, 8)
    ]
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(scores[:8], expected, rtol=2e-3, atol=1e-6)


def _completion_token_log_probs(model, prompt_ids: list[int], completion_ids: list[int]):
    """Per completion token: `log π(y_t)` and `log Σ_v π(v)²`, from one unbatched forward (plain logits)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    tokens = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1 :]
    return tokens, torch.logsumexp(2 * log_probs, dim=-1)[len(prompt_ids) - 1 :]


def _ld_wpo_pair_loss(model, reference, row: dict, alpha: float) -> torch.Tensor:
    """DPO with LD-DPO's sums and WPO's weight, written out for one pair: the first `min(n_w, n_l)` tokens in full, the
    rest times α; `w = exp(mean(log π - log Σπ²) over y_w) · exp(the same over y_l)`, a constant."""
    chosen, chosen_sq = _completion_token_log_probs(model, row["prompt_ids"], row["chosen_ids"])
    rejected, rejected_sq = _completion_token_log_probs(model, row["prompt_ids"], row["rejected_ids"])
    shared = min(len(chosen), len(rejected))

    def ld(tokens):
        return tokens[:shared].sum() + alpha * tokens[shared:].sum()

    with torch.no_grad():
        ref_chosen, _ = _completion_token_log_probs(reference, row["prompt_ids"], row["chosen_ids"])
        ref_rejected, _ = _completion_token_log_probs(reference, row["prompt_ids"], row["rejected_ids"])
        weight = torch.exp((chosen - chosen_sq).mean()) * torch.exp((rejected - rejected_sq).mean())
    margin = (ld(chosen) - ld(ref_chosen)) - (ld(rejected) - ld(ref_rejected))
    return weight * preference_loss(margin, BETA, "sigmoid")


def test_influence_with_ld_dpo_and_wpo_matches_autograd(tmp_path, tokenizer, reverse_rows):
    from datasets import Dataset

    from trl_select.testing import build_tiny_llama

    from .testing_utils import with_unequal_rejected

    alpha = 0.3
    reference = build_tiny_llama(tokenizer, seed=0).double()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    pool = with_unequal_rejected(Dataset.from_list(reverse_rows["train"][:6]))
    validation = with_unequal_rejected(Dataset.from_list(reverse_rows["validation"][:6]))
    args = fast_config(
        tmp_path,
        selection_rule="tif",
        beta=BETA,
        max_length=64,
        per_device_train_batch_size=2,
        ld_alpha=alpha,
        use_weighting=True,
    )
    trainer = SelectiveDPOTrainer(
        policy, ref_model=reference, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer
    )
    engine = trainer.selection_engine
    context = ScoringContext(
        pool_size=len(pool),
        beta=BETA,
        loss_type="sigmoid",
        reference=engine.reference_log_probs(),  # TRL's `compute_ref_log_probs`: LD-weighted
        model=policy,
        pool=trainer.train_dataset,
        collator=trainer.data_collator,
        accelerator=trainer.accelerator,
        batch_size=4,
        validation=engine.validation_dataset,
        validation_reference=engine.validation_reference_log_probs(),
        loss=args.preference_loss(),
        ld_alpha=alpha,
    )
    assert context.loss.use_weighting
    scores = influence_scores(context)

    pool_rows, validation_rows = token_rows(trainer.train_dataset), token_rows(engine.validation_dataset)
    assert any(len(row["chosen_ids"]) != len(row["rejected_ids"]) for row in pool_rows + validation_rows)
    validation_loss = torch.stack([_ld_wpo_pair_loss(policy, reference, row, alpha) for row in validation_rows]).mean()
    validation_grad = torch.autograd.grad(validation_loss, _params(policy))
    expected = []
    for row in pool_rows:
        grads = torch.autograd.grad(_ld_wpo_pair_loss(policy, reference, row, alpha), _params(policy))
        expected.append(sum((a * b).sum() for a, b in zip(validation_grad, grads, strict=True)).item())
    expected = np.array(expected)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(scores, expected, rtol=2e-5, atol=1e-8)
