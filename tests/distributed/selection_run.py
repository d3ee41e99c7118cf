"""One selective DPO run on the reverse-digits pool, for 1 process or under `torchrun --nproc_per_node N`.

Each rank writes `OUT/rank{r}.json`: the world size it saw, the pair ids it really trained on per epoch, the hash of
the aux model's weights after every alignment stage, what each full-copy DeepSpeed aux build handed to
`deepspeed.initialize` (`aux_builds`), and (rank 0) the selection history. Usage:

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
import trl_select.engine  # noqa: E402
from tests.recording import RecordingTrainer  # noqa: E402
from tests.testing_utils import DEMO_DATA, fast_config, with_unequal_rejected  # noqa: E402
from trl_select import read_history  # noqa: E402
from trl_select.scoring import is_activation_checkpointing  # noqa: E402
from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl  # noqa: E402


def _bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of `tensor` (numpy has no bf16, so they are read as uint8)."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _policy_fingerprint(trainer) -> str:
    digest = hashlib.sha256()
    for name, parameter in trainer.model.named_parameters():
        local = parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter  # ZeRO-3: this rank's shard
        digest.update(f"{name}:{parameter.requires_grad}".encode())
        digest.update(_bytes(local))
        if parameter.grad is not None:
            digest.update(_bytes(parameter.grad))
    for state in (trainer.optimizer.state_dict(), trainer.lr_scheduler.state_dict()):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        digest.update(buffer.getvalue())
    return digest.hexdigest()


def _same_weights(aux: torch.nn.Module, policy: torch.nn.Module) -> bool:
    """Whether the aux model, as handed to its engine, holds exactly the policy's weights (gathered under ZeRO-3).

    Gathers one parameter pair at a time with the unspied `GatheredParameters`, after the build's calls were counted.
    """
    import deepspeed

    gathered = deepspeed.runtime.zero.partition_parameters.GatheredParameters
    sources = dict(policy.named_parameters())
    same = True
    for name, target in aux.named_parameters():  # no early exit: every rank must join every gather
        source = sources[name]
        with gathered([source, target], modifier_rank=None):
            same &= source.dtype == target.dtype and torch.equal(source.detach().cpu(), target.detach().cpu())
    return same


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
    parser.add_argument("--epochs", type=float, default=3, help="`num_train_epochs` of the config.")
    parser.add_argument("--max_steps", type=int, default=-1, help="`max_steps` of the config.")
    parser.add_argument("--resume", default=None, help="A checkpoint to resume from.")
    parser.add_argument(
        "--gather_aux_copy",
        action="store_true",
        help="Treat the aux's ZeRO-3 partitions as unlike the policy's, so its build gathers each parameter pair.",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the DeepSpeed config must agree).")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="The trainer's activation checkpointing."
    )
    parser.add_argument("--aux_mode", default="full", choices=["full", "lora"], help="`aux_mode` of the config.")
    parser.add_argument(
        "--scoring_reuse",
        default="reference",
        choices=["none", "reference", "reference_and_policy"],
        help="`scoring_reuse` of the config.",
    )
    parser.add_argument(
        "--ld_wpo",
        action="store_true",
        help="LD-DPO (`ld_alpha=0.5`) and WPO (`use_weighting=True`), on a pool with rejected completions of other "
        "lengths than the chosen ones.",
    )
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
        aux_hashes.append(hashlib.sha256(_bytes(flat)).hexdigest())
        return steps

    trl_select.auxiliary.AuxiliaryModel._align = recording_align
    if options.gather_aux_copy:
        trl_select.auxiliary._same_partitioning = lambda source, target: False

    # What the aux build did, from inside it: every `GatheredParameters` call (elements gathered at once) and the
    # model handed to `deepspeed.initialize` (its dtypes, and this rank's vs the full number of elements).
    in_refresh = {"on": False}
    build_gathers: list[int] = []
    aux_builds: list[dict] = []
    if options.deepspeed:
        import deepspeed

        gathered_parameters = deepspeed.zero.GatheredParameters

        def spying_gathered_parameters(params, *args, **kwargs):
            params = list(params) if isinstance(params, (list, tuple)) else [params]
            if in_refresh["on"]:
                build_gathers.append(sum(getattr(p, "ds_numel", p.numel()) for p in params))
            return gathered_parameters(params, *args, **kwargs)

        deepspeed.zero.GatheredParameters = spying_gathered_parameters
        initialize = deepspeed.initialize

        def recording_initialize(*args, **kwargs):
            model = kwargs.get("model")
            if in_refresh["on"] and model is not None:
                parameters = list(model.parameters())
                policy = trainer.accelerator.unwrap_model(trainer.model)
                aux_builds.append(
                    {
                        "dtypes": sorted({str(p.dtype) for p in parameters}),
                        "policy_dtypes": sorted({str(p.dtype) for p in policy.parameters()}),
                        "devices": sorted({str(p.device) for p in parameters}),
                        "partitioned": [hasattr(p, "ds_id") for p in parameters],
                        "local_numel": sum(
                            p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in parameters
                        ),
                        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in parameters),
                        "policy_numel": sum(getattr(p, "ds_numel", p.numel()) for p in policy.parameters()),
                        "checkpointing": is_activation_checkpointing(model),
                        "policy_checkpointing": is_activation_checkpointing(policy),
                        "gathers": list(build_gathers),
                        "equals_policy": _same_weights(model, policy),
                    }
                )
            return initialize(*args, **kwargs)

        deepspeed.initialize = recording_initialize

    # The policy's own weights (this rank's shards), optimizer state and LR schedule, before and after each refresh
    untouched: list[bool] = []
    lora_left: list[bool] = []  # whether a LoRA layer was left in the policy after each refresh
    aux_losses: list[list[float]] = []  # aux validation loss before and after each alignment stage
    refresh = trl_select.auxiliary.AuxiliaryModel.refresh

    def checked_refresh(self, *args, **kwargs):
        before = _policy_fingerprint(trainer)
        build_gathers.clear()
        in_refresh["on"] = True
        try:
            result = refresh(self, *args, **kwargs)
        finally:
            in_refresh["on"] = False
        untouched.append(_policy_fingerprint(trainer) == before)
        from peft.tuners.lora import LoraLayer

        lora_left.append(
            any(isinstance(m, LoraLayer) for m in trainer.accelerator.unwrap_model(trainer.model).modules())
        )
        aux_losses.append([result.validation_loss_before, result.validation_loss_after])
        return result

    trl_select.auxiliary.AuxiliaryModel.refresh = checked_refresh

    if options.break_rank1_scoring and int(os.environ.get("RANK", "0")) == 1:
        build_pass_loader = trl_select.engine.build_pass_loader

        class OneBatchShort:
            def __init__(self, loader) -> None:
                self.loader = loader

            def __len__(self) -> int:
                return len(self.loader) - 1

            def __iter__(self):
                return itertools.islice(iter(self.loader), len(self))

        trl_select.engine.build_pass_loader = lambda *a, **k: OneBatchShort(build_pass_loader(*a, **k))

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
    if options.ld_wpo:
        pool, validation = with_unequal_rejected(pool), with_unequal_rejected(validation)
    args = fast_config(
        out / "run",
        per_device_train_batch_size=options.per_device_batch,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        ddp_timeout=int(timedelta(seconds=60).seconds),
        deepspeed=options.deepspeed,
        use_cpu=options.deepspeed is None or options.bf16,  # TrainingArguments refuses bf16 on the CPU otherwise
        selection_rule=options.rule,
        aux_mode=options.aux_mode,
        scoring_reuse=options.scoring_reuse,
        precompute_ref_log_probs=options.precompute_ref,
        accelerator_config={"use_configured_state": options.deepspeed is not None},
        bf16=options.bf16,
        gradient_checkpointing=options.gradient_checkpointing,
        **({"ld_alpha": 0.5, "use_weighting": True} if options.ld_wpo else {}),
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

        engine = trainer.selection_engine
        auxiliary = engine.auxiliary()
        auxiliary.settings = dataclasses.replace(auxiliary.settings, learning_rate=0.0)
        aux = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size).pool_log_probs
        policy = engine.policy_log_probs()
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
        "aux_builds": aux_builds,
        "lora_left": lora_left,
        "aux_identity_gap": aux_identity_gap,
        "history": read_history(out / "run") if state.is_main_process else None,
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))
    print(f"rank {state.process_index} of world size {state.num_processes} done", flush=True)


if __name__ == "__main__":
    main()
