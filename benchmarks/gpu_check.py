"""GPU check: a ~0.5B-parameter model in bf16 on one GPU, plain DPO vs selection with each aux mode, in one run.

    python -m benchmarks.gpu_check                      # Qwen2-0.5B's shape, 2,000 pairs of 512 tokens (one GPU)
    python -m benchmarks.gpu_check --pairs 1000         # a smaller pool, if the time is short
    python -m benchmarks.gpu_check --cpu-smoke --out /tmp/gpu_check.json   # tiny sizes, fp32 on the CPU, < 1 min

Run from the repository root. No hub: the model is a randomly initialised `Qwen2ForCausalLM` of Qwen2-0.5B's shape
(hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings: 494M parameters) and the
tokenizer a local word-level one whose vocabulary is `t4 ... t151935` plus 4 special tokens, so a pair's text is a
string of random token ids and every id of the embedding can occur. Each pair: a `prompt_len`-token prompt and two
different random completions of `seq_len - prompt_len` tokens (EOS included). TRL's `DPOTrainer` tokenizes text
pairs itself (it has no path for pre-tokenized `prompt_ids`/`chosen_ids`/`rejected_ids` columns), hence the tokenizer.

Phases, side by side in one process (the model is saved once and each arm loads it from the same path; between arms
the trainer is deleted and the CUDA cache emptied; the peak is reset at every phase):

1. `plain`: `SelectiveDPOTrainer` with `selection_rule="none"` (exactly `trl.DPOTrainer`), one training epoch on the
   full pool. Measures the epoch (pairs/s over the epoch and, steady, from the median step), peak memory of training.
2. `lora` and `full` (one arm per `aux_mode`): `SelectiveDPOTrainer` with LossDiff-IRM trains `warmup_steps` steps
   (so the policy's AdamW state exists, as at a real epoch boundary), then runs the scores of one selection event
   through the scoring engine's `compute_scores` (the code an event runs, with its own timers): the reference pass
   (cached after the first event of a run), the policy scoring pass over the pool, and the aux refresh (build the aux
   model, align it on the validation pairs, score the pool with it). Peak memory of the warm-up steps and of the
   event separately; the arm's peak is the larger. LossDiff must come out finite.

Peak memory: `torch.cuda.max_memory_allocated` (reset before each phase) on a GPU; on the CPU (`--cpu-smoke`) the
process's peak RSS, which cannot be reset, so CPU peaks only grow from phase to phase and compare nothing.
`--cpu-smoke` runs the same functions with tiny sizes (hidden 64, 2 layers, vocabulary 256, 32 pairs of 32 tokens),
fp32, on the CPU; it exists to test the pipeline. Results: `benchmarks/results/gpu_check.json` and `.md` (or `--out`).

Sizing for one H200 (bf16 matrix rate ~790 TFLOP/s measured on random data): a forward costs ~2 x 494M = 1 GFLOP per
token (attention at 512 tokens adds ~4%), a DPO training step 4 GFLOP per token (policy forward + backward 3, TRL's
reference forward 1), a pair 1,024 tokens. The epoch of 2,000 pairs is 8.2 PFLOP: ~26 s at 40% of the matrix rate,
~52 s at 20%; the reference and policy passes and the aux pool pass are 2 PFLOP each (~7-13 s), the aux alignment 8
steps of 8 validation pairs (~1 s). With the model build, three loads and TRL's tokenization (~8 s per arm) the run
should take 3-4 minutes, and stays under 8 at 10% of the matrix rate. If it must be shorter, `--pairs 1000`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_description, markdown_table, peak_rss_mib


logger = logging.getLogger("benchmarks.gpu_check")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
AUX_MODES = ("lora", "full")
NUM_SPECIAL = 4  # <pad> <s> </s> <unk>
_STATE = {"cuda": False}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke: sizes, dtype, device."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    pairs: int
    seq_len: int
    prompt_len: int
    validation_pairs: int
    train_batch: int
    scoring_batch: int
    warmup_steps: int
    aux_max_steps: int
    bf16: bool
    use_cpu: bool


def gpu_sizes(pairs: int, seq_len: int, train_batch: int, scoring_batch: int) -> Sizes:
    """Qwen2-0.5B's shape, bf16 mixed precision (fp32 master weights, bf16 autocast), on the GPU."""
    return Sizes(
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        vocab=151936,
        pairs=pairs,
        seq_len=seq_len,
        prompt_len=seq_len // 2,
        validation_pairs=64,
        train_batch=train_batch,
        scoring_batch=scoring_batch,
        warmup_steps=4,
        aux_max_steps=8,
        bf16=True,
        use_cpu=False,
    )


def cpu_smoke_sizes() -> Sizes:
    """Tiny sizes, fp32, on the CPU: the same code paths as the GPU run, in well under a minute."""
    return Sizes(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab=256,
        pairs=32,
        seq_len=32,
        prompt_len=16,
        validation_pairs=16,
        train_batch=4,
        scoring_batch=8,
        warmup_steps=2,
        aux_max_steps=2,
        bf16=False,
        use_cpu=True,
    )


# ----- model, tokenizer, data -----


def build_tokenizer(vocab: int):
    """A word-level tokenizer over `t4 ... t{vocab-1}` and 4 special tokens (ids 0-3), split on whitespace.

    Pass it to the trainer as `processing_class`: loaded back from a Qwen2 checkpoint's folder, transformers 5 maps
    `model_type="qwen2"` to `Qwen2Tokenizer` and rebuilds it as a byte-level BPE that drops every word.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(NUM_SPECIAL, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1 << 20,
    )


def build_model(path: Path, sizes: Sizes) -> int:
    """Build the random Qwen2, save it (fp32) to `path`; return the parameter count."""
    import transformers

    tokenizer = build_tokenizer(sizes.vocab)
    config = transformers.Qwen2Config(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=max(2 * sizes.seq_len, 64),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    device = "cpu" if sizes.use_cpu else "cuda"
    with torch.device(device):  # initialising 0.5B parameters on the GPU takes a second, on a CPU much longer
        model = transformers.Qwen2ForCausalLM(config)
    model.to(torch.float32).save_pretrained(path)
    count = sum(p.numel() for p in model.parameters())
    del model
    release_memory()
    return count


def random_pairs(num_pairs: int, sizes: Sizes, seed: int):
    """Pairs of random token ids as text: prompt `prompt_len` tokens, chosen/rejected `seq_len - prompt_len` (EOS
    included, which TRL appends)."""
    from datasets import Dataset

    rng = random.Random(seed)
    completion = sizes.seq_len - sizes.prompt_len - 1

    def text(n: int) -> str:
        return " ".join(f"t{rng.randrange(NUM_SPECIAL, sizes.vocab)}" for _ in range(n))

    rows = [
        {"prompt": text(sizes.prompt_len), "chosen": " " + text(completion), "rejected": " " + text(completion)}
        for _ in range(num_pairs)
    ]
    return Dataset.from_list(rows)


def check_tokenized(trainer, sizes: Sizes) -> None:
    """Fail early unless TRL tokenized the pairs to `prompt_len` + `seq_len - prompt_len` tokens (EOS included)."""
    row = trainer.train_dataset[0]
    got = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
    want = (sizes.prompt_len, sizes.seq_len - sizes.prompt_len, sizes.seq_len - sizes.prompt_len)
    if got != want:
        raise RuntimeError(f"tokenized prompt/chosen/rejected lengths {got}, expected {want}: the tokenizer is wrong")


# ----- measuring -----


def on_cuda() -> bool:
    """Whether this run measures the GPU (set by `run`: a `--cpu-smoke` run never does, even where CUDA exists)."""
    return _STATE["cuda"]


def release_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    """Peak since the last `reset_peak`: CUDA's max allocated on a GPU; else the process's (unresettable) peak RSS."""
    if on_cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def allocated_mib() -> float | None:
    """CUDA memory allocated now (None on the CPU)."""
    return torch.cuda.memory_allocated() / 2**20 if on_cuda() else None


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def make_config(sizes: Sizes, output_dir: Path, selective: bool, aux_mode: str = "lora", **overrides: Any):
    from trl_select import SelectiveDPOConfig

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "bf16": sizes.bf16,
        "use_cpu": sizes.use_cpu,
        "model_init_kwargs": {"dtype": "float32"},
        "num_train_epochs": 1,
        "per_device_train_batch_size": sizes.train_batch,
        "per_device_eval_batch_size": sizes.scoring_batch,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "beta": 0.1,
        "max_length": sizes.seq_len + 8,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "selection_rule": "lossdiff_irm" if selective else "none",
        **overrides,
    }
    if selective:
        # 2 epochs so that an event is due at epoch 1 (the arm stops after `warmup_steps` and runs the event itself);
        # a larger aux learning rate so that the aux model moves visibly in a few steps (LossDiff not all zero).
        settings.update(
            num_train_epochs=2,
            aux_mode=aux_mode,
            aux_max_steps=sizes.aux_max_steps,
            aux_learning_rate=1e-3,
            scoring_batch_size=sizes.scoring_batch,
        )
    return SelectiveDPOConfig(**settings)


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of the epoch and of each step (synchronised with the GPU)."""

        def __init__(self) -> None:
            self.epoch_s: list[float] = []
            self.step_s: list[float] = []
            self._epoch_start = self._step_start = 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            sync()
            self._epoch_start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.step_s.append(time.perf_counter() - self._step_start)

        def on_epoch_end(self, args, state, control, **kwargs):
            sync()
            self.epoch_s.append(time.perf_counter() - self._epoch_start)

    return StepTimer()


def make_stopper(steps: int):
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        """Ends training after `steps` optimizer steps (`SelectiveDPOConfig` rejects `max_steps`)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_training_stop = True

    return StopAfter()


def run_plain(model_path: Path, sizes: Sizes, train, work_dir: Path) -> dict[str, Any]:
    """One training epoch of plain DPO on the full pool: time, pairs/s, peak memory."""
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOTrainer

    reset_peak()
    trainer = SelectiveDPOTrainer(
        str(model_path),
        args=make_config(sizes, work_dir / "plain", False),
        train_dataset=train,
        processing_class=build_tokenizer(sizes.vocab),
    )
    trainer.remove_callback(PrinterCallback)
    check_tokenized(trainer, sizes)
    timer = make_step_timer()
    trainer.add_callback(timer)
    loaded = allocated_mib()
    start = time.perf_counter()
    trainer.train()
    sync()
    train_s = time.perf_counter() - start
    peak = peak_mib()
    epoch_s = timer.epoch_s[0]
    steady_step = statistics.median(timer.step_s[1:] or timer.step_s)
    del trainer
    release_memory()
    return {
        "epoch_s": epoch_s,
        "train_s": train_s,
        "steps": len(timer.step_s),
        "first_step_s": timer.step_s[0],
        "median_step_s": steady_step,
        "train_pairs_per_s": sizes.pairs / epoch_s,
        "steady_train_pairs_per_s": sizes.train_batch / steady_step,
        "allocated_after_load_mib": loaded,
        "peak_mib": peak,
    }


def run_selective(model_path: Path, sizes: Sizes, train, validation, work_dir: Path, aux_mode: str) -> dict[str, Any]:
    """`warmup_steps` training steps, then one selection event's scores (reference, policy, aux refresh)."""
    import numpy as np
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOTrainer

    release_memory()
    reset_peak()
    args = make_config(sizes, work_dir / aux_mode, True, aux_mode=aux_mode)
    trainer = SelectiveDPOTrainer(
        str(model_path),
        args=args,
        train_dataset=train,
        validation_dataset=validation,
        processing_class=build_tokenizer(sizes.vocab),
    )
    trainer.remove_callback(PrinterCallback)
    check_tokenized(trainer, sizes)
    trainer.add_callback(make_stopper(sizes.warmup_steps))  # selection forbids `max_steps`; stop the epoch early
    start = time.perf_counter()
    trainer.train()
    sync()
    warmup_s = time.perf_counter() - start
    train_peak = peak_mib()
    before_event = allocated_mib()  # the policy's AdamW state is still held, as at a real epoch boundary
    optimizer_state_mib = (
        sum(
            t.numel() * t.element_size()
            for state in trainer.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        / 2**20
    )

    reset_peak()
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    scores = trainer.selection_engine.compute_scores(1, metrics)
    sync()
    event_s = time.perf_counter() - start
    event_peak = peak_mib()
    lossdiff = np.asarray(scores["lossdiff"], dtype=np.float64)
    irm = np.asarray(scores["irm"], dtype=np.float64)
    del trainer, scores
    release_memory()
    policy_s = metrics["selection/seconds_policy"]
    return {
        "aux_mode": aux_mode,
        "warmup_steps": sizes.warmup_steps,
        "warmup_s": warmup_s,
        "allocated_before_event_mib": before_event,
        "optimizer_state_mib": optimizer_state_mib,
        "train_peak_mib": train_peak,
        "event_peak_mib": event_peak,
        "peak_mib": max(train_peak, event_peak),
        "event_scores_s": event_s,
        "reference_pass_s": metrics["selection/seconds_reference"],
        "policy_pass_s": policy_s,
        "policy_pass_pairs_per_s": sizes.pairs / policy_s,
        "aux_refresh_s": metrics["selection/seconds_aux"],
        "aux_steps": metrics["selection/aux/steps"],
        "aux_val_loss_before": metrics["selection/aux/val_loss_before"],
        "aux_val_loss_after": metrics["selection/aux/val_loss_after"],
        "lossdiff_finite": bool(np.isfinite(lossdiff).all()),
        "lossdiff_mean": float(lossdiff.mean()),
        "lossdiff_std": float(lossdiff.std()),
        "irm_finite": bool(np.isfinite(irm).all()),
        "scored_pairs": int(lossdiff.size),
    }


def device_name(sizes: Sizes) -> str:
    if not sizes.use_cpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU: " + machine_description()


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def write_partial(record: dict[str, Any], out: Path | None) -> None:
    """Write what is measured so far (`"complete": false`), so a run stopped at its time limit still leaves phases."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))


def run(sizes: Sizes, cpu_smoke: bool, out: Path | None = None) -> dict[str, Any]:
    """Every phase, in order, in this process; returns the result record (and writes it to `out` after each phase)."""
    if not sizes.use_cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke on a machine without a GPU")
    _STATE["cuda"] = not sizes.use_cpu
    total_start = time.perf_counter()
    train = random_pairs(sizes.pairs, sizes, seed=0)
    validation = random_pairs(sizes.validation_pairs, sizes, seed=1)
    record: dict[str, Any] = {
        "device": device_name(sizes),
        "cpu_smoke": cpu_smoke,
        "precision": "bf16 mixed (fp32 weights, bf16 autocast)" if sizes.bf16 else "fp32",
        "memory_kind": "cuda_max_memory_allocated" if not sizes.use_cpu else "peak_rss_monotone",
        "sizes": dataclasses.asdict(sizes),
        "versions": versions(),
        "complete": False,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work_dir = Path(tmp)
        model_path = work_dir / "model"
        start = time.perf_counter()
        record["parameters"] = build_model(model_path, sizes)
        record["build_s"] = time.perf_counter() - start
        logger.info("model: %.1fM parameters (%.1f s)", record["parameters"] / 1e6, record["build_s"])
        record["plain"] = run_plain(model_path, sizes, train, work_dir)
        logger.info("plain: %s", record["plain"])
        write_partial(record, out)
        record["selective"] = {}
        for mode in AUX_MODES:
            try:
                record["selective"][mode] = run_selective(model_path, sizes, train, validation, work_dir, mode)
            except Exception as error:  # keep the other arm's result (device time is scarce); main() exits non-zero
                logger.exception("selective arm aux_mode=%r failed", mode)
                record["selective"][mode] = {"aux_mode": mode, "error": f"{type(error).__name__}: {error}"[:2000]}
                release_memory()
            logger.info("selective, aux %s: %s", mode, record["selective"][mode])
            write_partial(record, out)
    plain = record["plain"]
    for result in record["selective"].values():
        if "error" in result:
            continue
        result["peak_vs_plain"] = result["peak_mib"] / plain["peak_mib"]
        result["policy_pass_vs_epoch"] = result["policy_pass_s"] / plain["epoch_s"]
        result["aux_refresh_vs_epoch"] = result["aux_refresh_s"] / plain["epoch_s"]
    record["total_s"] = time.perf_counter() - total_start
    record["complete"] = not any("error" in result for result in record["selective"].values())
    return record


# ----- report -----


def report(record: dict[str, Any], command: str) -> str:
    s, plain = record["sizes"], record["plain"]
    failed = {mode: r["error"] for mode, r in record["selective"].items() if "error" in r}
    if failed:  # a short report: what ran, and why the rest did not
        return "\n".join(
            ["# GPU check (incomplete)", "", f"Device: {record['device']}  ", f"Command: `{command}`", "",
             f"Plain epoch: {record['plain']['epoch_s']:.1f} s, peak {record['plain']['peak_mib']:.0f} MiB.", ""]
            + [f"- `aux_mode={mode!r}` failed: {error}" for mode, error in failed.items()]
            + [f"- `aux_mode={m!r}`: {json.dumps(r)}" for m, r in record["selective"].items() if m not in failed]
            + [""]
        )  # fmt: skip
    lora, full = record["selective"]["lora"], record["selective"]["full"]
    epoch = plain["epoch_s"]
    time_rows = [
        [f"training epoch, full pool ({s['pairs']} pairs, plain DPO)", f"{epoch:.1f}",
         f"{plain['train_pairs_per_s']:.1f} (steady {plain['steady_train_pairs_per_s']:.1f})", "1.00"],
        ["reference pass (once per run)", f"{lora['reference_pass_s']:.1f}",
         f"{s['pairs'] / lora['reference_pass_s']:.1f}", f"{lora['reference_pass_s'] / epoch:.2f}"],
        ["policy scoring pass", f"{lora['policy_pass_s']:.1f}", f"{lora['policy_pass_pairs_per_s']:.1f}",
         f"{lora['policy_pass_vs_epoch']:.2f}"],
        [f"aux refresh, `aux_mode=\"lora\"` ({lora['aux_steps']:.0f} steps)", f"{lora['aux_refresh_s']:.1f}", "",
         f"{lora['aux_refresh_vs_epoch']:.2f}"],
        [f"aux refresh, `aux_mode=\"full\"` ({full['aux_steps']:.0f} steps)", f"{full['aux_refresh_s']:.1f}", "",
         f"{full['aux_refresh_vs_epoch']:.2f}"],
    ]  # fmt: skip
    unit = "peak CUDA allocated (MiB)" if record["memory_kind"] == "cuda_max_memory_allocated" else "peak RSS (MiB)"
    memory_rows = [["plain DPO (training epoch)", f"{plain['peak_mib']:.0f}", "", f"{plain['peak_mib']:.0f}", "1.00"]]
    for mode, result in (("lora", lora), ("full", full)):
        memory_rows.append(
            [f"selective, `aux_mode=\"{mode}\"`", f"{result['train_peak_mib']:.0f}", f"{result['event_peak_mib']:.0f}",
             f"{result['peak_mib']:.0f}", f"**{result['peak_vs_plain']:.2f}**"]
        )  # fmt: skip
    lines = [
        "# GPU check: ~0.5B parameters, plain DPO vs selection with each aux mode",
        "",
        f"Command: `{command}`  ",
        f"Device: {record['device']}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}  ",
        f"Model: random Qwen2, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), "
        f"MLP {s['intermediate']}, vocabulary {s['vocab']}, {record['parameters'] / 1e6:.1f}M parameters, "
        f"{record['precision']}. Pool {s['pairs']} pairs of {s['seq_len']} tokens (prompt {s['prompt_len']}), "
        f"validation {s['validation_pairs']}, train batch {s['train_batch']}, scoring batch {s['scoring_batch']}. "
        f"Whole run {record['total_s']:.0f} s.",
        "",
        "## Time",
        "",
        markdown_table(["what", "seconds", "pairs/s", "/ training epoch"], time_rows),
        "The training epoch includes TRL's per-step reference forward. Reference and policy pass from the "
        '`aux_mode="lora"` arm (the `"full"` arm: reference '
        f"{full['reference_pass_s']:.1f} s, policy {full['policy_pass_s']:.1f} s). Aux refresh = build the aux "
        "model, align it on the validation pairs, score the pool with it.",
        "",
        "## Peak memory",
        "",
        markdown_table(["arm", f"training {unit}", f"event {unit}", unit, "/ plain"], memory_rows),
        f"Selective arms: {s['warmup_steps']} training steps, then one event's scores with the policy's AdamW state "
        f"held ({lora['optimizer_state_mib']:.0f} MiB), as at a real epoch boundary. LossDiff finite: "
        f"lora {lora['lossdiff_finite']}, full {full['lossdiff_finite']}; std lora {lora['lossdiff_std']:.3g}, "
        f"full {full['lossdiff_std']:.3g}. Aux validation loss {lora['aux_val_loss_before']:.4f} → "
        f"{lora['aux_val_loss_after']:.4f} (lora), → {full['aux_val_loss_after']:.4f} (full).",
        "",
    ]
    if record["memory_kind"] != "cuda_max_memory_allocated":
        lines.append(
            "CPU smoke: peak RSS cannot be reset between phases, so these peaks only grow; compare nothing.\n"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, fp32, on the CPU (tests the pipeline)")
    parser.add_argument("--pairs", type=int, default=2000, help="pool pairs (GPU run)")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per sequence, prompt half (GPU run)")
    parser.add_argument("--train_batch", type=int, default=8, help="pairs per training step (GPU run)")
    parser.add_argument("--scoring_batch", type=int, default=16, help="pairs per scoring batch (GPU run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json", help="JSON output; .md beside it")
    options = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets

    datasets.disable_progress_bars()
    if options.cpu_smoke:
        sizes = cpu_smoke_sizes()
    else:
        if options.seq_len < 4 or options.pairs < 2 * options.train_batch:
            parser.error("--seq_len must be >= 4 and --pairs at least two training batches")
        sizes = gpu_sizes(options.pairs, options.seq_len, options.train_batch, options.scoring_batch)
    command = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    record = run(sizes, options.cpu_smoke, options.out)
    record["command"] = command
    bad = [k for k, v in flatten(record).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad and not options.cpu_smoke:
        logger.warning("non-finite values: %s", bad)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(record, indent=1))
    text = report(record, command)
    options.out.with_suffix(".md").write_text(text)
    print(text)
    if not record["complete"]:
        raise SystemExit(1)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
