"""Scoring passes leave activation checkpointing exactly as the trainer set it, through transformers' current API.

The observable state is on the decoder layers: `gradient_checkpointing` (which layers recompute) and
`_gradient_checkpointing_func` (a `functools.partial` of `torch.utils.checkpoint.checkpoint` carrying the kwargs).
"""

from __future__ import annotations

import copy
import traceback
import warnings
from collections.abc import Callable

import torch

from trl_select import SelectiveDPOTrainer, read_history
from trl_select.scoring import inference_mode

from .testing_utils import fast_config


def _layer_state(model: torch.nn.Module) -> list[tuple[bool, dict]]:
    """(checkpointed?, checkpoint kwargs) of every decoder layer."""
    return [
        (layer.gradient_checkpointing, dict(getattr(layer._gradient_checkpointing_func, "keywords", {})))
        for layer in model.model.layers
    ]


def _deprecated_checkpointing_calls_from_trl_select(run: Callable[[], object]) -> list[str]:
    """Run `run` and return `file:line` of every trl_select frame that called a deprecated checkpointing API.

    transformers attributes these warnings to its own line, so TRL's calls (`trl.models.utils`, upstream, also made by
    plain `DPOTrainer`) and ours print the same text; the caller is told apart by the first frame outside transformers.
    """
    callers: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FutureWarning) and "checkpointing" in str(message):
            frames = [
                f
                for f in traceback.extract_stack()[:-1]
                if "/transformers/" not in f.filename and not f.filename.endswith("warnings.py")
            ]
            if "/trl_select/" in frames[-1].filename:
                callers.append(f"{frames[-1].filename}:{frames[-1].lineno}: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        run()
    return callers


def test_inference_mode_restores_every_n_layers_and_checkpoint_kwargs_without_deprecated_calls(tiny_model):
    """`every_n_layers`/`offload` are arguments of `activation_checkpointing_enable`, not `checkpoint` kwargs."""
    trainer_kwargs = {"use_reentrant": True, "every_n_layers": 2}
    tiny_model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=2
    )
    before = _layer_state(tiny_model)
    assert before == [(True, {"use_reentrant": True}), (False, {"use_reentrant": True})]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.23 deprecates the gradient_checkpointing_* API
        with inference_mode(tiny_model, trainer_kwargs):
            assert not tiny_model.is_activation_checkpointing
    assert _layer_state(tiny_model) == before


def test_influence_pass_restores_the_trainers_checkpoint_kwargs(tmp_path, tokenizer, tiny_model, pool, validation):
    """The `influence` scorer turns checkpointing off for its JVPs and back on with the trainer's kwargs."""
    args = fast_config(
        tmp_path,
        num_train_epochs=2,
        selection_rule="tif",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool.select(range(32)),
        eval_dataset=validation.select(range(16)),
        processing_class=tokenizer,
    )
    trainer.train()  # the Trainer enables checkpointing with the kwargs; a warm-up epoch and an influence selection
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = _layer_state(model)
    assert before == [(True, {"use_reentrant": True})] * 2
    scores = {}

    def score() -> None:
        scores.update(trainer.selection_engine.compute_scores(1, {}, ("influence",)))

    assert _deprecated_checkpointing_calls_from_trl_select(score) == []
    assert scores["influence"].shape == (32,)
    assert _layer_state(model) == before


def test_short_selective_train_with_checkpointing_calls_no_deprecated_api(
    tmp_path, tokenizer, tiny_model, pool, validation
):
    """Every pass of a selection event (reference, policy, auxiliary) toggles checkpointing through the current API."""
    args = fast_config(tmp_path, num_train_epochs=2, activation_checkpointing=True)
    trainer = SelectiveDPOTrainer(
        tiny_model,
        ref_model=copy.deepcopy(tiny_model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    assert _deprecated_checkpointing_calls_from_trl_select(trainer.train) == []
    assert [record["event"] for record in read_history(tmp_path)] == ["warmup", "selection"]  # the passes ran


def test_inference_mode_on_a_peft_model_uses_the_current_api_through_the_wrapper(tiny_model):
    """PEFT's wrappers forward attribute lookups to the transformers model, so the new names reach it through them."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base = model.get_base_model()
    before = _layer_state(base)
    assert before == [(True, {"use_reentrant": True})] * 2

    def score() -> None:
        with inference_mode(model, {"use_reentrant": True}):
            assert not base.is_activation_checkpointing

    assert _deprecated_checkpointing_calls_from_trl_select(score) == []
    assert _layer_state(base) == before
