"""One selective DPO run on the reverse-digits pool, for 1 process or under `torchrun --nproc_per_node N`.

Each rank writes `OUT/rank{r}.json`: the world size it saw, the pair ids it really trained on per epoch, the hash of
the aux model's weights after every alignment stage, and (rank 0) the selection history. Usage:

    torchrun --nproc_per_node 2 tests/distributed/selection_run.py OUT [--per_device_batch 16] [--peft]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import itertools
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from accelerate import PartialState  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402

import trl_select.auxiliary  # noqa: E402
import trl_select.callback  # noqa: E402
from tests.conftest import DEMO_DATA, fast_config  # noqa: E402
from tests.recording import RecordingTrainer  # noqa: E402
from trl_select import read_history  # noqa: E402
from trl_select.toy import build_char_tokenizer, build_tiny_llama, read_jsonl  # noqa: E402


def _policy_fingerprint(trainer) -> str:
    digest = hashlib.sha256()
    for name, parameter in trainer.model.named_parameters():
        local = parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter  # ZeRO-3: this rank's shard
        digest.update(f"{name}:{parameter.requires_grad}".encode())
        digest.update(local.detach().cpu().numpy().tobytes())
        if parameter.grad is not None:
            digest.update(parameter.grad.detach().cpu().numpy().tobytes())
    for state in (trainer.optimizer.state_dict(), trainer.lr_scheduler.state_dict()):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        digest.update(buffer.getvalue())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per_device_batch", type=int, default=16)
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--deepspeed", default=None, help="A DeepSpeed JSON config.")
    parser.add_argument("--rule", default="lossdiff_irm")
    parser.add_argument("--precompute_ref", action="store_true", help="TRL's precompute_ref_log_probs=True.")
    parser.add_argument(
        "--validation_apart",
        action="store_true",
        help="Pass the validation pairs as `validation_dataset` (no eval set) and no `ref_model` (π_ref is precomputed).",
    )
    parser.add_argument(
        "--break_rank1_scoring", action="store_true", help="A deliberately broken variant: rank 1 skips a batch."
    )
    parser.add_argument("--save_steps", type=int, default=0, help="Checkpoint every this many steps (0: never).")
    parser.add_argument("--resume", default=None, help="A checkpoint to resume from.")
    parser.add_argument("--aux_mode", default="full", choices=["full", "lora"], help="`aux_mode` of the config.")
    parser.add_argument(
        "--check_aux_identity",
        action="store_true",
        help="After training, refresh θ_aux once more with learning rate 0 and record how far its pool log-probs are "
        "from the policy's (0 when θ_aux = θ_t before any step).",
    )
    options = parser.parse_args()
    out = Path(options.out)

    aux_hashes: list[str] = []
    aux_optimizers: list[str | None] = []  # the DeepSpeed aux engine's optimizer class (None: plain torch path)
    align = trl_select.auxiliary.AuxiliaryModel._align

    def recording_align(self, aux):
        steps = align(self, aux)
        basic_optimizer = getattr(aux.module, "basic_optimizer", None)
        aux_optimizers.append(None if basic_optimizer is None else type(basic_optimizer).__name__)
        parameters = [p for p in aux.module.parameters() if p.requires_grad]
        if hasattr(parameters[0], "ds_id"):  # ZeRO-3: hash the whole parameters, not this rank's partition
            import deepspeed

            with deepspeed.zero.GatheredParameters(parameters):
                flat = torch.cat([p.detach().reshape(-1).cpu() for p in parameters])
        else:
            flat = torch.cat([p.detach().reshape(-1).cpu() for p in parameters])
        aux_hashes.append(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
        return steps

    trl_select.auxiliary.AuxiliaryModel._align = recording_align

    # The policy's own weights (this rank's shards), optimizer state and LR schedule, before and after each refresh
    untouched: list[bool] = []
    lora_left: list[bool] = []  # whether a LoRA layer was left in the policy after each refresh
    aux_losses: list[list[float]] = []  # aux validation loss before and after each alignment stage
    refresh = trl_select.auxiliary.AuxiliaryModel.refresh

    def checked_refresh(self, *args, **kwargs):
        before = _policy_fingerprint(trainer)
        result = refresh(self, *args, **kwargs)
        untouched.append(_policy_fingerprint(trainer) == before)
        from peft.tuners.lora import LoraLayer

        lora_left.append(
            any(isinstance(m, LoraLayer) for m in trainer.accelerator.unwrap_model(trainer.model).modules())
        )
        aux_losses.append([result.validation_loss_before, result.validation_loss_after])
        return result

    trl_select.auxiliary.AuxiliaryModel.refresh = checked_refresh

    if options.break_rank1_scoring and int(os.environ.get("RANK", "0")) == 1:
        build_pass_loader = trl_select.callback.build_pass_loader

        class OneBatchShort:
            def __init__(self, loader) -> None:
                self.loader = loader

            def __len__(self) -> int:
                return len(self.loader) - 1

            def __iter__(self):
                return itertools.islice(iter(self.loader), len(self))

        trl_select.callback.build_pass_loader = lambda *a, **k: OneBatchShort(build_pass_loader(*a, **k))

    if options.deepspeed:
        # DeepSpeed on CPU (DS_ACCELERATOR=cpu): with no GPU and no backend named, accelerate counts a world of 1 under
        # DeepSpeed, and TrainingArguments does not pass `ddp_backend` on that path, so set the shared state up first.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo", timeout=timedelta(seconds=60))

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    if options.precompute_ref:  # TRL shares the precomputed log-probs through the dataset's cache files

        def load(name: str, rows: int) -> Dataset:
            return load_dataset(
                "json", data_files=str(DEMO_DATA / name), split=f"train[:{rows}]", cache_dir=str(out / "hf")
            )

        pool, validation = load("train.jsonl", options.pool), load("validation.jsonl", 40)
    else:
        pool = Dataset.from_list(read_jsonl(DEMO_DATA / "train.jsonl")[: options.pool])
        validation = Dataset.from_list(read_jsonl(DEMO_DATA / "validation.jsonl")[:40])
    args = fast_config(
        out / "run",
        per_device_train_batch_size=options.per_device_batch,
        ddp_timeout=int(timedelta(seconds=60).seconds),
        deepspeed=options.deepspeed,
        use_cpu=options.deepspeed is None,
        selection_rule=options.rule,
        aux_mode=options.aux_mode,
        precompute_ref_log_probs=options.precompute_ref,
        accelerator_config={"use_configured_state": options.deepspeed is not None},
        **({"save_strategy": "steps", "save_steps": options.save_steps} if options.save_steps else {}),
    )
    extra = {} if options.validation_apart else {"ref_model": copy.deepcopy(model)}
    if options.peft:
        from peft import LoraConfig

        extra = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    trainer = RecordingTrainer(
        model,
        args=args,
        train_dataset=pool,
        processing_class=tokenizer,
        **({"validation_dataset": validation} if options.validation_apart else {"eval_dataset": validation}),
        **extra,
    )
    trainer.train(resume_from_checkpoint=options.resume)
    aux_identity_gap = None
    if options.check_aux_identity:
        import dataclasses

        callback = trainer.selection_callback
        auxiliary = callback.auxiliary()
        auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0)
        aux = auxiliary.refresh(callback.pool_loader(), trainer.selection_sampler.pool_size).pool_log_probs
        policy = callback.policy_log_probs()
        aux_identity_gap = max(
            float((aux.chosen - policy.chosen).abs().max()), float((aux.rejected - policy.rejected).abs().max())
        )

    id_of_prompt = dict(zip(pool["prompt"], pool["id"], strict=True))
    state = trainer.accelerator.state
    result = {
        "world_size": state.num_processes,
        "rank": state.process_index,
        "distributed_type": str(state.distributed_type),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "trained_ids": {epoch: [id_of_prompt[p] for p in prompts] for epoch, prompts in trainer.received.items()},
        "step_ids": {step: [id_of_prompt[p] for p in prompts] for step, prompts in trainer.step_prompts.items()},
        "step_lr": trainer.step_lr,
        "aux_hashes": aux_hashes,
        "policy_untouched_by_aux": untouched,
        "aux_optimizers": aux_optimizers,
        "aux_losses": aux_losses,
        "lora_left": lora_left,
        "aux_identity_gap": aux_identity_gap,
        "history": read_history(out / "run") if state.is_main_process else None,
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))
    print(f"rank {state.process_index} of world size {state.num_processes} done", flush=True)


if __name__ == "__main__":
    main()
