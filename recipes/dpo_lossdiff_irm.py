# Copyright 2026 The trl-select authors. Licensed under the Apache License, Version 2.0.
"""
DPO with in-loop LossDiff-IRM selection: TRL's `trl/scripts/dpo.py`, with `SelectiveDPOTrainer`.

# The embedded demo (no arguments): a tiny Llama built locally, warm-started on the shipped reverse-digits task, then
# trained with DPO on 2,000 pairs of which 30% have their labels flipped. It prints what selection did.
```bash
accelerate launch recipes/dpo_lossdiff_irm.py
accelerate launch recipes/dpo_lossdiff_irm.py --selection_rule none   # the baseline: plain DPO on the full pool
```

# A real model on a real dataset, exactly like TRL's script (every DPOConfig flag works, plus the selection flags)
```bash
accelerate launch recipes/dpo_lossdiff_irm.py \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --learning_rate 5.0e-7 \
    --num_train_epochs 3 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --selection_rule lossdiff_irm \
    --output_dir Qwen2-0.5B-DPO-LossDiff-IRM
```
Add `--use_peft --lora_r 32 --lora_alpha 16` for LoRA (the aux model is then a second adapter on the same base).
The auxiliary model aligns on the `validation` split, or on the test split (`--dataset_test_split`, default `test`) when
there is none; `--dataset_validation_split NAME` picks another.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from datasets import Dataset, DatasetDict, load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer, read_history


logger = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "data" / "reverse_digits"

# The embedded demo's settings (the benchmark protocol of benchmarks/quality.py); any flag still overrides them.
DEMO_DEFAULTS = {
    "output_dir": "outputs/dpo-lossdiff-irm-demo",
    "num_train_epochs": 3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "beta": 0.5,
    "max_length": 64,
    # Off by leaving both names unset: a `False` under the deprecated name makes transformers 5.23 warn on every run.
    "gradient_checkpointing": None,
    "logging_steps": 10,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "report_to": ["wandb"],
    "run_name": "dpo-lossdiff-irm-demo",
    # The known label flips group the pairs: the PNGs and wandb show the kept fraction of flipped and clean pairs.
    "selection_category_column": "flipped",
}


@dataclass
class RecipeArguments(ScriptArguments):
    """`ScriptArguments` of TRL's scripts, plus the validation split the auxiliary model is aligned on."""

    dataset_validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split that aligns the auxiliary model (LossDiff) and is evaluated on. Default: `validation` if "
            "the dataset has one, else the test split (`--dataset_test_split`)."
        },
    )
    demo_sft_epochs: int = field(
        default=20,
        metadata={"help": "Embedded demo only: SFT epochs that warm-start the tiny model before DPO."},
    )
    demo_sft_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Embedded demo only: learning rate of the SFT warm start."},
    )


def build_demo_model(output_dir: str, sft_epochs: int, sft_learning_rate: float, seed: int) -> str:
    """Build the tiny Llama and its tokenizer locally, warm-start it with SFT, save it; return its path."""
    from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl, sft_warm_start

    path = Path(output_dir) / "sft-model"
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    rows = read_jsonl(DEMO_DATA / "sft.jsonl")
    sft_warm_start(model, tokenizer, rows, epochs=sft_epochs, lr=sft_learning_rate, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_demo_dataset() -> DatasetDict:
    return load_dataset(
        "json",
        data_files={split: str(DEMO_DATA / f"{split}.jsonl") for split in ("train", "validation", "test")},
    )


def report_demo(trainer: SelectiveDPOTrainer, train: Dataset, test: Dataset, sft_path: str) -> None:
    """Print what selection did to the known-flipped pairs, and greedy exact-match before and after.

    With `--selection_rule none` there is no selection history: the table says the whole pool was trained every
    epoch, and the exact-match line is the baseline a selective run is compared with.
    """
    from transformers import AutoModelForCausalLM

    from trl_select.testing import greedy_exact_match

    flipped = dict(zip(train["id"], train["flipped"], strict=True))
    selecting = trainer.args.selection_enabled
    print("\nSelection on the demo pool (30% of pairs have flipped labels):")
    if selecting:
        print(f"{'epoch':>5} {'event':>9} {'kept':>11} {'flipped in kept':>16} {'flipped in dropped':>19}")
        for record in read_history(trainer.args.output_dir):
            kept = set(record["selected_ids"])
            dropped = set(flipped) - kept
            kept_share = sum(flipped[i] for i in kept) / max(len(kept), 1)
            dropped_share = sum(flipped[i] for i in dropped) / len(dropped) if dropped else float("nan")
            print(
                f"{record['epoch']:>5} {record['event']:>9} {len(kept):>5}/{record['pool_size']:<5} "
                f"{kept_share:>16.3f} {dropped_share:>19.3f}"
            )
    else:
        print(
            f"  no selection (--selection_rule none): all {len(flipped)} pairs trained every epoch, "
            f"{sum(flipped.values()) / len(flipped):.3f} of them flipped"
        )
    tokenizer = trainer.processing_class
    prompts = test["prompt"]
    sft = AutoModelForCausalLM.from_pretrained(sft_path)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    method = f"{trainer._name} {'with' if selecting else 'without'} selection"
    print(
        f"Greedy exact-match on {len(prompts)} unseen test prompts: SFT {greedy_exact_match(sft, tokenizer, prompts):.3f}"
        f" -> after {method} {greedy_exact_match(policy, tokenizer, prompts):.3f}\n"
    )


def validation_split(dataset: DatasetDict, script_args: RecipeArguments, needs_validation: bool) -> str | None:
    """The split whose pairs align the auxiliary model and are evaluated on; `None` when there is none to use.

    `--dataset_validation_split` when given (it must exist). Otherwise `validation` if the dataset has one, else TRL's
    test split (`--dataset_test_split`, default `test`), logged: TRL's own scripts evaluate on the test split, and
    many preference datasets ship only `train`/`test`. Errors name the flags, since that is what a user of the
    recipe sets (the trainer's own error would name its Python argument).
    """
    splits = sorted(dataset)
    chosen = script_args.dataset_validation_split
    if chosen is not None:
        if chosen not in dataset:
            raise ValueError(
                f"`--dataset_validation_split {chosen}`: the dataset has no such split (it has {splits})."
            )
        return chosen
    if "validation" in dataset:
        return "validation"
    test = script_args.dataset_test_split
    if test in dataset:
        logger.info(
            "No `validation` split: aligning on the test split `%s` (%d pairs) (`--dataset_test_split`); "
            "`--dataset_validation_split` picks another.",
            test,
            len(dataset[test]),
        )
        return test
    if needs_validation:
        raise ValueError(
            f"The selection rule needs validation pairs, and the dataset has neither a `validation` split nor the "
            f"test split `{test}` (it has {splits}): name one with `--dataset_validation_split` (or "
            "`--dataset_test_split`), or use `--selection_rule irm_band`, which needs none."
        )
    return None


def main(
    script_args: RecipeArguments,
    training_args: SelectiveDPOConfig,
    model_args: ModelConfig,
    trainer_class: type[SelectiveDPOTrainer] = SelectiveDPOTrainer,
) -> SelectiveDPOTrainer:
    demo = model_args.model_name_or_path is None
    if demo:
        if "wandb" in training_args.report_to:
            _wandb_offline_unless_logged_in(training_args.output_dir)
        # Only the main process builds and saves the model; the others wait and load it.
        from accelerate import PartialState

        state = PartialState()
        with state.main_process_first():
            path = Path(training_args.output_dir) / "sft-model"
            if state.is_main_process:
                build_demo_model(
                    training_args.output_dir,
                    script_args.demo_sft_epochs,
                    script_args.demo_sft_learning_rate,
                    training_args.seed,
                )
            model_args.model_name_or_path = str(path)

    if script_args.dataset_name is None:
        if not demo:
            raise ValueError(
                "`--dataset_name` is required with `--model_name_or_path` (the demo data fits the demo model)."
            )
        dataset = load_demo_dataset()
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    split = validation_split(dataset, script_args, training_args.selection_enabled and training_args.needs_validation)
    validation = None if split is None else dataset[split]
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=validation if training_args.eval_strategy != "no" else None,
        validation_dataset=validation,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if demo and trainer.accelerator.is_main_process:
        if training_args.selection_enabled:
            from trl_select.pool_source import record_pool_source

            # The file the pool was read from: `trl-select suspects` shows each pair's text, `clean` rewrites it.
            record_pool_source(training_args.output_dir, dataset["train"], location=DEMO_DATA / "train.jsonl")
        report_demo(trainer, dataset["train"], dataset["test"], model_args.model_name_or_path)
        if training_args.selection_enabled:
            from trl_select.plots import plot_selection

            plots = plot_selection(training_args.output_dir)
            print(f"Selection plots (`trl-select plot OUTPUT_DIR` redraws them): {', '.join(map(str, plots))}")
    saved = "Model and selection_history.jsonl" if training_args.selection_enabled else "Model"
    trainer.accelerator.print(f"{saved} saved to {training_args.output_dir}.")
    trainer.end()
    return trainer


def _wandb_offline_unless_logged_in(output_dir: str) -> None:
    """Log to wandb offline (into `output_dir/wandb`) unless credentials are configured; sync later with `wandb sync`.

    Checks the environment and `~/.netrc` only: importing wandb's API here would freeze its settings before
    `WANDB_MODE` is set.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        logged_in = netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)


def configure_logging() -> None:
    """INFO from the recipe and trl_select (one line per selection event), WARNING and up from every other library.

    A root logger at INFO would print the libraries' informational chatter too, e.g. accelerate's "The used dataset
    had no length, returning gathered tensors" for each metric TRL gathers on the last step of every epoch: the
    selection sampler is a batch sampler, which accelerate cannot count the padding of (there is none to drop).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("__main__", __name__, "trl_select"):
        logging.getLogger(name).setLevel(logging.INFO)


def make_parser(
    config_class: type[SelectiveDPOConfig] = SelectiveDPOConfig, argv: list[str] | None = None
) -> TrlParser:
    parser = TrlParser((RecipeArguments, config_class, ModelConfig))
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        parser.set_defaults(bf16=False)  # DPOConfig defaults to bf16, which a CPU-only run cannot use
    if not any(arg.split("=")[0] == "--model_name_or_path" for arg in argv):
        defaults = dict(DEMO_DEFAULTS)
        if _flag_value(argv, "--selection_rule") == "none":
            # The baseline gets its own folder and wandb run, next to the selective demo's rather than over it.
            defaults.update(output_dir=f"{defaults['output_dir']}-none", run_name=f"{defaults['run_name']}-none")
        parser.set_defaults(**defaults)
    return parser


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` on the command line (`--flag value` or `--flag=value`), or `None`."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    configure_logging()
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
