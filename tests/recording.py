"""A SelectiveDPOTrainer that records what the model really received, for tests (also run under torchrun)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from transformers import TrainerCallback

from trl_select import SelectiveDPOTrainer


def _prompts_in_batch(tokenizer, inputs) -> list[str]:
    """Decode the prompt of every pair in a collated batch (chosen half: prompt = attended, non-completion tokens)."""
    half = inputs["input_ids"].shape[0] // 2
    prompts = []
    for ids, attention, completion in zip(
        inputs["input_ids"][:half], inputs["attention_mask"][:half], inputs["completion_mask"][:half], strict=True
    ):
        prompts.append(tokenizer.decode(ids[(attention == 1) & (completion == 0)].tolist()))
    return prompts


class _Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.probe_epoch = math.floor(state.epoch + 1e-6)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.steps_per_epoch[self.trainer.probe_epoch] += 1

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.trainer.leftover_grad[self.trainer.probe_epoch] = sum(float(g.abs().sum()) for g in grads)
        self.trainer.epoch_at_end[self.trainer.probe_epoch] = state.epoch


class RecordingTrainer(SelectiveDPOTrainer):
    """Records the prompts the model really received in each epoch, the steps, and what is left in .grad."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: dict[int, list[str]] = defaultdict(list)
        self.steps_per_epoch: Counter = Counter()
        self.leftover_grad: dict[int, float] = {}
        self.epoch_at_end: dict[int, float] = {}
        self.probe_epoch = 0
        # Optimizer step (1-based global step) -> the prompts of its micro-batches and the LR it steps with.
        self.step_prompts: dict[int, list[str]] = defaultdict(list)
        self.step_lr: dict[int, float] = {}
        self.add_callback(_Probe(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            prompts = _prompts_in_batch(self.processing_class, inputs)
            self.received[self.probe_epoch].extend(prompts)
            step = self.state.global_step + 1
            self.step_prompts[step].extend(prompts)
            self.step_lr[step] = self.optimizer.param_groups[0]["lr"]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
