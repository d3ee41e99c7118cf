"""SelectiveDPOTrainer / SelectiveSLiCTrainer end to end on a tiny local model, one process, CPU."""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
import transformers
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from trl_select import SelectiveDPOTrainer, SelectiveSLiCConfig, SelectiveSLiCTrainer, read_history
from trl_select.auxiliary import AUX_ADAPTER
from trl_select.scores import implicit_reward_margin
from trl_select.testing import build_tiny_llama

from .recording import RecordingTrainer
from .testing_utils import HH_RLHF_SLICE, fast_config


@pytest.mark.parametrize(
    "accumulation, rule_settings",
    [
        (1, {}),  # LossDiff-IRM, default bands
        # 41 of 100 pairs -> 3 batches of 16: an odd count, so the last accumulation of an epoch is partial
        (2, {"selection_rule": "irm_band", "irm_lo_percentile": 30.0, "irm_hi_percentile": 70.0}),
    ],
)
def test_each_epoch_trains_exactly_its_selection(
    tmp_path, tokenizer, tiny_model, pool, validation, accumulation, rule_settings
):
    args = fast_config(tmp_path, gradient_accumulation_steps=accumulation, lr_scheduler_type="linear", **rule_settings)
    trainer = RecordingTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train()

    history = read_history(tmp_path)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[0]["event"] == "warmup" and history[0]["selected_ids"] == list(range(100))
    id_of_prompt = dict(zip(pool["prompt"], pool["id"], strict=True))
    for record in history:
        epoch = record["epoch"]
        received_ids = sorted(id_of_prompt[p] for p in trainer.received[epoch])
        assert received_ids == sorted(record["selected_ids"])  # each selected pair exactly once, nothing else
        num_batches = math.ceil(record["num_selected"] / 16)
        assert trainer.steps_per_epoch[epoch] == math.ceil(num_batches / accumulation)
        assert trainer.leftover_grad[epoch] == 0.0  # no gradient crosses an epoch boundary
        assert trainer.epoch_at_end[epoch] == pytest.approx(epoch + 1)
    for record in history[1:]:
        assert record["event"] == "selection" and set(record["thresholds"]) == set(args.required_scores)
        if not rule_settings:
            assert 0.5 <= record["num_selected"] / record["pool_size"] <= 0.8
    # The LR schedule ends on the last real step, however short the epochs became
    assert trainer.lr_scheduler.last_epoch == trainer.state.global_step
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # max_steps follows the selection, so the last step is the last (final save/eval), and no step is lost
    assert trainer.state.max_steps == trainer.state.global_step == sum(trainer.steps_per_epoch.values())


@pytest.fixture(scope="module")
def warm_trainers(tmp_path_factory, tokenizer, reverse_rows):
    """One full-model and one LoRA trainer after a warm-up epoch (no selection yet): an optimizer with state."""
    pool = Dataset.from_list(reverse_rows["train"][:100])
    validation = Dataset.from_list(reverse_rows["validation"][:32])
    trainers = {}
    for kind in ("full", "peft"):
        model = build_tiny_llama(tokenizer, seed=0)
        extra = (
            {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
            if kind == "peft"
            else {"ref_model": copy.deepcopy(model)}
        )
        args = fast_config(tmp_path_factory.mktemp(kind), num_train_epochs=1, lr_scheduler_type="linear")
        trainer = SelectiveDPOTrainer(
            model, args=args, train_dataset=pool, eval_dataset=validation, processing_class=tokenizer, **extra
        )
        trainer.train()
        trainers[kind] = trainer
    return trainers


def _snapshot(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()),
        "lr": [g["lr"] for g in trainer.optimizer.param_groups],
    }


def _assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["trainable"] == b["trainable"]
    assert a["grads"].keys() == b["grads"].keys()
    for name, grad in a["grads"].items():
        assert (grad is None and b["grads"][name] is None) or torch.equal(grad, b["grads"][name]), name
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=0, atol=0)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["lr_lambdas"] == b["scheduler"]["lr_lambdas"]  # the retiming anchors
    assert a["lr"] == b["lr"]


@pytest.mark.parametrize("kind", ["full", "peft"])
def test_aux_alignment_leaves_the_policy_untouched(warm_trainers, kind):
    trainer = warm_trainers[kind]
    engine = trainer.selection_engine
    before = _snapshot(trainer)
    policy = engine.policy_log_probs()
    result = engine.auxiliary().refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
    _assert_same(before, _snapshot(trainer))
    # ... while the aux model did move, toward the validation data
    assert result.validation_loss_after < result.validation_loss_before
    assert not torch.allclose(result.pool_log_probs.chosen, policy.chosen)
    if kind == "peft":
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert AUX_ADAPTER not in model.peft_config and model.active_adapter == "default"


@pytest.mark.parametrize("kind", ["full", "peft"])
def test_scorer_agrees_with_dpo_trainer_metrics(warm_trainers, kind):
    trainer = warm_trainers[kind]
    engine = trainer.selection_engine
    rows = list(range(16))
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    batch = trainer.data_collator([{c: trainer.train_dataset[r][c] for c in columns} for r in rows])
    trainer._metrics["eval"].clear()
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    trainer.model.train()
    logged = {key: values[-1] for key, values in trainer._metrics["eval"].items()}

    policy, reference = engine.policy_log_probs(), engine.reference_log_probs()
    irm = implicit_reward_margin(policy, reference, trainer.args.beta)[rows]
    assert abs(logged["rewards/margins"]) > 1e-4  # the policy has moved, so this comparison means something
    assert irm.mean().item() == pytest.approx(logged["rewards/margins"], rel=1e-4, abs=1e-6)
    assert policy.chosen[rows].mean().item() == pytest.approx(logged["logps/chosen"], rel=1e-5)
    assert policy.rejected[rows].mean().item() == pytest.approx(logged["logps/rejected"], rel=1e-5)


def test_rule_none_is_exactly_dpo_trainer(tmp_path, tokenizer, pool):
    losses = []
    for name, trainer_class, config_class in [
        ("dpo", DPOTrainer, DPOConfig),
        ("selective", SelectiveDPOTrainer, None),
    ]:
        model = build_tiny_llama(tokenizer, seed=0)
        overrides = {"num_train_epochs": 2, "lr_scheduler_type": "linear"}
        args = fast_config(tmp_path / name, selection_rule="none", **overrides)
        if config_class is DPOConfig:
            fields = {k: v for k, v in args.to_dict().items() if k in DPOConfig.__dataclass_fields__}
            fields = {k: getattr(args, k) for k in fields}
            args = DPOConfig(**fields)
        trainer = trainer_class(
            model, ref_model=copy.deepcopy(model), args=args, train_dataset=pool, processing_class=tokenizer
        )
        trainer.train()
        losses.append([(h["step"], h["loss"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 14
    assert losses[0] == losses[1]
    assert not (tmp_path / "selective" / "selection_history.jsonl").exists()


def test_slic_scores_with_the_hinge_loss(tmp_path, tokenizer, tiny_model, pool, validation, monkeypatch):
    from trl_select.scores import PreferenceLoss

    seen = []  # every evaluation of the per-pair loss: the aux stage's steps and losses, and LossDiff's two terms
    original = PreferenceLoss.__call__

    def spy(self, *args, **kwargs):
        seen.append(self.loss_types)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceLoss, "__call__", spy)
    args = fast_config(tmp_path, config_class=SelectiveSLiCConfig, num_train_epochs=2)
    trainer = SelectiveSLiCTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    trainer.train()
    first_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert first_loss == pytest.approx(1.0, abs=0.02)  # hinge max(0, 1 - βh) at h ≈ 0; sigmoid would be 0.693
    assert seen and set(seen) == {("hinge",)}
    assert read_history(tmp_path)[1]["event"] == "selection"


def test_peft_selection_run(tmp_path, tokenizer, tiny_model, pool, validation):
    args = fast_config(tmp_path, num_train_epochs=2, learning_rate=5e-3)
    trainer = SelectiveDPOTrainer(
        tiny_model,
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    history = read_history(tmp_path)
    assert history[1]["event"] == "selection" and 50 <= history[1]["num_selected"] <= 80
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert set(model.peft_config) == {"default"}
    lora_b = [p for n, p in model.named_parameters() if "lora_B.default" in n]
    assert lora_b and all(p.requires_grad for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)


def test_real_hh_rlhf_pairs_train_with_their_original_row_ids(tmp_path, tokenizer):
    rows = [json.loads(line) for line in HH_RLHF_SLICE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 72
    train, validation = Dataset.from_list(rows[:56]), Dataset.from_list(rows[56:])
    model = build_tiny_llama(tokenizer, seed=0)
    # aux_batch_size=4: TRL keeps 7 of the 16 validation pairs (long prompts), fewer than one batch of 8
    args = fast_config(tmp_path, num_train_epochs=2, max_length=384, per_device_train_batch_size=8, aux_batch_size=4)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    pool_size = len(trainer.train_dataset)
    assert 10 < pool_size < 56  # TRL dropped the pairs whose prompt alone fills max_length
    trainer.train()
    warmup, selection = read_history(tmp_path)
    assert warmup["pool_size"] == pool_size == len(warmup["selected_ids"])
    assert warmup["selected_ids"] == trainer.train_dataset["trl_select_row"]
    assert warmup["selected_ids"] != list(range(pool_size))  # ids are rows before TRL's filtering
    assert set(selection["selected_ids"]) < set(warmup["selected_ids"])


def test_construction_errors_name_the_fix(tmp_path, tokenizer, tiny_model, pool, validation):
    ref = copy.deepcopy(tiny_model)
    base = {"ref_model": ref, "processing_class": tokenizer}
    with pytest.raises(ValueError, match="validation_dataset="):
        SelectiveDPOTrainer(tiny_model, args=fast_config(tmp_path), train_dataset=pool, **base)
    with pytest.raises(TypeError, match="map-style"):
        SelectiveDPOTrainer(
            tiny_model,
            args=fast_config(tmp_path),
            train_dataset=pool.to_iterable_dataset(),
            eval_dataset=validation,
            **base,
        )
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        SelectiveDPOTrainer(
            tiny_model, args=fast_config(tmp_path), train_dataset=pool.select([]), eval_dataset=validation, **base
        )
    with pytest.raises(TypeError, match="SelectiveDPOConfig"):
        SelectiveDPOTrainer(tiny_model, args=DPOConfig(str(tmp_path), bf16=False), train_dataset=pool, **base)
    with pytest.raises(TypeError, match="SelectiveSLiCConfig"):
        SelectiveSLiCTrainer(
            tiny_model, args=fast_config(tmp_path), train_dataset=pool, eval_dataset=validation, **base
        )
    duplicated = pool.map(lambda row: {"id": row["id"] % 50})
    with pytest.raises(ValueError, match="duplicate"):
        SelectiveDPOTrainer(
            tiny_model, args=fast_config(tmp_path), train_dataset=duplicated, eval_dataset=validation, **base
        )
    # IRM alone needs no validation data
    trainer = SelectiveDPOTrainer(
        tiny_model, args=fast_config(tmp_path, selection_rule="irm_band"), train_dataset=pool, **base
    )
    assert trainer.selection_callback is not None
    assert isinstance(pool.to_iterable_dataset(), IterableDataset)


def test_private_trainer_hooks_we_override_still_exist():
    """Pins the transformers internals this package relies on (see trainer.py); fails loudly on an upgrade."""
    run_epoch = inspect.signature(transformers.Trainer._run_epoch).parameters
    assert {"train_dataloader", "epoch", "steps_in_epoch", "num_update_steps_per_epoch"} <= set(run_epoch)
    loop = inspect.getsource(transformers.Trainer._inner_training_loop)
    # Our selection runs in on_epoch_begin and must precede the epoch's iterator, created inside _run_epoch.
    assert loop.index("on_epoch_begin") < loop.index("self._run_epoch(")
    assert "steps_in_epoch=steps_in_epoch" in loop and "num_update_steps_per_epoch=num_update_steps_per_epoch" in loop
    assert "iter(train_dataloader)" in inspect.getsource(transformers.Trainer._run_epoch)
    assert list(inspect.signature(transformers.Trainer.create_scheduler).parameters)[:3] == [
        "self",
        "num_training_steps",
        "optimizer",
    ]
    assert "fused_lm_head=True" in inspect.getsource(DPOTrainer.compute_ref_log_probs)
    assert transformers.__version__ == "5.23.0"
