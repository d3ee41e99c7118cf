"""Peak memory of selection against plain DPO, measured and predicted by the memory model (`trl_select.memory`).

    python -m benchmarks.memory            # 42.6M-parameter Llama, 32-token pairs (a few minutes on 2 cores)
    python -m benchmarks.memory --quick    # a 3M-parameter model, to check the pipeline

Run from the repository root. Arms, each in its own subprocess so that peaks do not mix, the same model loaded from
the same path, the same data, 2 epochs (1 warm-up epoch on the full pool, then one selection event with an aux
refresh, then 1 selected epoch):

- `plain`: `SelectiveDPOTrainer` with `selection_rule="none"` (exactly `DPOTrainer`), full fine-tuning;
- `full_copy`: LossDiff-IRM, the aux a full copy of the policy with its own AdamW (the default without PEFT);
- `lora_aux`: LossDiff-IRM with `aux_mode="lora"` (a LoRA adapter on θ_t), when this checkout's config has the field;
- `plain+lora_policy` and `selective+lora_policy`: the same two with a LoRA policy (r 16, all linear layers), whose
  aux is a second adapter on the same base.

Measured: the subprocess's peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`, which counts torch's C++
allocations; `tracemalloc` would not), and the same minus the RSS right after imports and data, before any model is
loaded (the process baseline: Python, torch, transformers). That difference is what the model states, activations
and buffers took; its ratio is the one to compare with the model, since the fixed baseline only dilutes ratios. glibc
is told to serve every allocation of 64 KiB or more by `mmap` (`MALLOC_MMAP_THRESHOLD_`), so freed tensors return to
the OS at once and RSS tracks live memory, not the allocator's free lists.

Predicted: `trl_select.memory.memory_breakdown` for the same shape, fp32 (4 + 4 + 8 bytes per trained parameter,
reference 4), one process. Then the same model on Llama-2-7B and -70B shapes under DDP and ZeRO-3 on 8 GPUs with bf16
mixed precision (`trl_select.memory`). Results: `benchmarks/results/memory.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_description, markdown_table, peak_rss_mib, save_tiny_llama
from trl_select.memory import (
    BF16_ADAPTER,
    FP32,
    GIB,
    MIB,
    ModelShape,
    memory_breakdown,
)


logger = logging.getLogger("benchmarks.memory")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DIGITS = 15  # prompt "d..d=" is 16 tokens, completion + EOS 16 tokens: 32-token sequences

# name -> (hidden, layers, heads, intermediate)
MODEL_SIZES = {"full": (768, 6, 12, 2048), "quick": (256, 4, 4, 704)}
# name -> (pool pairs, validation pairs, batch)
POOL_SIZES = {"full": (64, 16, 8), "quick": (32, 16, 8)}
LORA_R = 16
AUX_LORA_R = 16
ARMS = ("plain", "full_copy", "lora_aux", "plain+lora_policy", "selective+lora_policy")
LLAMA_SHAPES = {
    "Llama-2-7B": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "Llama-2-70B": {
        "vocab_size": 32000,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
}


def current_rss_mib() -> float:
    """Resident set size now (VmRSS of /proc/self/status), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def default_aux_mode() -> str:
    """`SelectiveDPOConfig.aux_mode`'s default, the mode a user gets without asking."""
    import dataclasses

    from trl_select import SelectiveDPOConfig

    return {f.name: f for f in dataclasses.fields(SelectiveDPOConfig)}["aux_mode"].default


def build_model(path: Path, size: str) -> int:
    """Build the Llama of `size` and the character tokenizer, save both to `path`; return the parameter count."""
    return save_tiny_llama(path, MODEL_SIZES[size], max_position_embeddings=64)


def model_shape(size: str) -> ModelShape:
    """The shape of the benchmark's Llama, from its config (the model is not built)."""
    from trl_select.testing import build_char_tokenizer

    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    return ModelShape.from_config(
        {
            "vocab_size": len(build_char_tokenizer()),
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
        }
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear")


def run_arm(arm: str, model_path: Path, work_dir: Path, size: str) -> dict[str, Any]:
    """Run one arm in this process and return its RSS figures (call in a fresh process)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
    from trl_select.testing import make_reverse_digits_pairs

    num_pairs, num_validation, batch = POOL_SIZES[size]
    train = make_reverse_digits_pairs(num_pairs, flip_fraction=0.3, seed=0, min_digits=DIGITS, max_digits=DIGITS)
    validation = make_reverse_digits_pairs(
        num_validation, flip_fraction=0.0, seed=1, min_digits=DIGITS, max_digits=DIGITS
    )
    train, validation = Dataset.from_list(train), Dataset.from_list(validation)
    selective = arm != "plain" and not arm.startswith("plain+")
    settings: dict[str, Any] = {
        "output_dir": str(work_dir / arm),
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "num_train_epochs": 2,  # 1 warm-up epoch, then one selection event (with an aux refresh) and 1 epoch
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "beta": 0.5,
        "max_length": 2 * (DIGITS + 1) + 4,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "selection_rule": "lossdiff_irm" if selective else "none",
        "aux_max_steps": 2,
    }
    if arm == "lora_aux":
        settings.update(aux_mode="lora", aux_lora_r=AUX_LORA_R)
    args = SelectiveDPOConfig(**settings)
    kwargs: dict[str, Any] = {"peft_config": lora_config()} if arm.endswith("lora_policy") else {}
    if selective:
        kwargs["validation_dataset"] = validation
    baseline = current_rss_mib()  # imports and data, no model yet
    trainer = SelectiveDPOTrainer(str(model_path), args=args, train_dataset=train, **kwargs)
    trainer.remove_callback(PrinterCallback)
    before = current_rss_mib()
    start = time.perf_counter()
    trainer.train()
    events = [e for e in trainer.state.log_history if "selection/epoch" in e]
    return {
        "arm": arm,
        "baseline_rss_mib": baseline,
        "rss_before_train_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "train_s": time.perf_counter() - start,
        "selection_events": len(events),
        "aux_steps": sum(e.get("selection/aux/steps", 0) for e in events),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def run_arms(arms: list[str], model_path: Path, work_dir: Path, size: str, threads: int) -> list[dict[str, Any]]:
    results = []
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(threads),
        # every allocation >= 64 KiB by mmap: freed tensors leave RSS at once (no dynamic threshold, no free lists)
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    for arm in arms:
        out = work_dir / f"{arm}.json"
        command = [sys.executable, "-m", "benchmarks.memory", "--arm", arm, "--model_path", str(model_path),
                   "--work_dir", str(work_dir), "--size", size, "--json", str(out)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory arm {arm} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(out.read_text()))
        logger.info("%s (%.0f s): %s", arm, time.perf_counter() - start, results[-1])
    return results


# ----- predictions -----


def predictions(shape: ModelShape) -> dict[str, Any]:
    """The memory model for each arm on the benchmark's shape: fp32, one process."""
    lora_policy = {"policy": "lora", "lora_r": LORA_R, "precision": FP32}
    return {
        "plain": memory_breakdown(shape, precision=FP32),
        "full_copy": memory_breakdown(shape, aux="full", precision=FP32),
        "lora_aux": memory_breakdown(shape, aux="lora", aux_lora_r=AUX_LORA_R, precision=FP32),
        "plain+lora_policy": memory_breakdown(shape, **lora_policy),
        "selective+lora_policy": memory_breakdown(shape, aux="lora", **lora_policy),
    }


def extrapolation() -> tuple[str, list[dict[str, Any]]]:
    """Model-state GiB per GPU of Llama-2-7B/70B under DDP and ZeRO-3 on 8 GPUs, bf16 + fp32 Adam (`trl_select.memory`)."""
    rows, records = [], []
    for name, config in LLAMA_SHAPES.items():
        shape = ModelShape.from_config(config)
        for strategy in ("ddp", "zero3"):
            common = {"strategy": strategy, "world_size": 8}
            plain = memory_breakdown(shape, **common)
            full = memory_breakdown(shape, aux="full", **common)
            lora = memory_breakdown(
                shape, aux="lora", aux_lora_r=AUX_LORA_R, aux_adapter_precision=BF16_ADAPTER, **common
            )
            lora_policy = memory_breakdown(shape, policy="lora", aux="lora", lora_r=LORA_R, **common)
            rows.append(
                [
                    f"{name} ({shape.num_parameters / 1e9:.2f}B)",
                    "DDP" if strategy == "ddp" else "ZeRO-3",
                    f"{plain.plain / GIB:.1f}",
                    f"{full.peak / GIB:.1f} ({full.ratio:.2f}×)",
                    f"{lora.peak / GIB:.1f} ({lora.ratio:.3f}×)",
                    f"{lora_policy.plain / GIB:.1f}",
                    f"{lora_policy.peak / GIB:.1f} ({lora_policy.ratio:.3f}×)",
                ]
            )
            records.append(
                {
                    "model": name,
                    "strategy": strategy,
                    "world_size": 8,
                    "plain": plain.as_dict(),
                    "full_copy": full.as_dict(),
                    "lora_aux": lora.as_dict(),
                    "lora_policy": lora_policy.as_dict(),
                }
            )
    header = [
        "model",
        "8 GPUs",
        "plain DPO, full FT (GiB/GPU)",
        "+ full-copy aux",
        f"+ LoRA aux r{AUX_LORA_R}",
        f"plain DPO, LoRA policy r{LORA_R}",
        "+ aux adapter",
    ]
    return markdown_table(header, rows), records


# ----- report -----


def report(
    size: str,
    shape: ModelShape,
    measured: list[dict[str, Any]],
    command: str,
    threads: int,
    machine: str | None = None,
) -> tuple[str, dict]:
    machine = machine or machine_description(threads)
    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    num_pairs, num_validation, batch = POOL_SIZES[size]
    predicted = predictions(shape)
    by_arm = {m["arm"]: m for m in measured}

    def base_of(arm: str) -> str:
        return "plain+lora_policy" if arm.endswith("lora_policy") else "plain"

    rows = []
    for arm in ARMS:
        p = predicted[arm]
        p_base = predicted[base_of(arm)]
        predicted_cells = [
            f"{p.peak / MIB:.0f}",
            f"{p.peak / p_base.plain:.2f}",
            f"{(p.peak - p_base.plain) / MIB:+.0f}",
        ]
        if arm not in by_arm:
            rows.append([f"`{arm}`", "not run (no `aux_mode` in this checkout)", "", "", "", "", *predicted_cells, ""])
            continue
        m, base = by_arm[arm], by_arm[base_of(arm)]
        added = m["peak_rss_mib"] - m["baseline_rss_mib"]
        base_added = base["peak_rss_mib"] - base["baseline_rss_mib"]
        rows.append(
            [
                f"`{arm}`",
                f"{m['peak_rss_mib']:.0f}",
                f"**{m['peak_rss_mib'] / base['peak_rss_mib']:.2f}**",
                f"{added:.0f}",
                f"{added / base_added:.2f}",
                f"{m['peak_rss_mib'] - base['peak_rss_mib']:+.0f}",
                *predicted_cells,
                f"{m['train_s']:.0f}",
            ]
        )
    table = markdown_table(
        [
            "arm",
            "peak RSS (MiB)",
            "/ its plain",
            "peak − baseline (MiB)",
            "/ its plain",
            "Δ peak vs its plain (MiB)",
            "predicted model states (MiB)",
            "predicted / its plain",
            "predicted Δ (MiB)",
            "train s",
        ],
        rows,
    )
    extrapolated, records = extrapolation()
    lora = by_arm.get("lora_aux")
    plain_peak = by_arm["plain"]["peak_rss_mib"]
    default_mode = default_aux_mode()
    ratios = {arm: by_arm[arm]["peak_rss_mib"] / plain_peak for arm in ("full_copy", "lora_aux") if arm in by_arm}
    default_arm = "lora_aux" if default_mode == "lora" else "full_copy"
    verdict = [
        '**Target: peak selective / plain ≤ 1.10, full fine-tuning.** `aux_mode="lora"`: '
        + (f"{ratios['lora_aux']:.2f}, {'met' if ratios['lora_aux'] <= 1.10 else 'NOT met'}" if lora else "not run")
        + f'; the full copy (`aux_mode="full"`): {ratios["full_copy"]:.2f}. The default in this checkout is '
        f"`aux_mode={default_mode!r}`: {ratios[default_arm]:.2f}, "
        f"{'met' if ratios[default_arm] <= 1.10 else 'NOT met'}."
    ]
    text = "\n".join(
        [
            "# Memory: peak of selection against plain DPO, measured and predicted",
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine}  ",
            f"Model: Llama built locally, hidden {hidden}, {layers} layers, {heads} heads, MLP {intermediate}, "
            f"vocabulary 100, **{shape.num_parameters / 1e6:.1f}M parameters**, fp32 (weights and optimizer state "
            f"dominate: 32-token sequences, batch {batch}). Pool {num_pairs} pairs, validation {num_validation}; 2 "
            "epochs (1 warm-up, 1 selection event with an aux refresh of 2 alignment steps, 1 selected epoch); each "
            f"arm in its own subprocess. LoRA: r {LORA_R}, all linear layers (policy), r {AUX_LORA_R} (aux).",
            "",
            "## Measured (peak RSS) beside the memory model",
            "",
            table,
            "- *peak RSS*: `ru_maxrss` of the arm's process; *baseline*: its RSS after imports and data, before "
            "any model was loaded (the same in every arm, ~"
            f"{by_arm['plain']['baseline_rss_mib']:.0f} MiB); *peak − baseline* is what the models, their "
            "optimizer states and the activations took, and its ratio is the one the model predicts.",
            "- *predicted*: `trl_select.memory.memory_breakdown`, fp32 (4 + 4 + 8 bytes per trained parameter, "
            "reference 4), one process: the policy's gradients are freed after each step, so a refresh's aux "
            "replaces them (`gradients_persist=False`). Activations, buffers and the allocator's slack are not "
            "modelled: they are the gap between *peak − baseline* and the prediction, the same in an arm and its "
            "plain arm, so the increments (Δ) are where model and measurement meet.",
            "- *its plain*: `plain` for the full fine-tuning arms, `plain+lora_policy` for the LoRA-policy ones. "
            "*Δ peak*: the arm's peak RSS minus its plain arm's, against the model's predicted increment of the "
            "model-state peak: what the aux costs, with the process baseline and the activations the arms share "
            "cancelled out.",
            "",
            *verdict,
            "",
            "## The model extrapolated: model states per GPU, 8 GPUs, bf16 weights + fp32 master and Adam",
            "",
            extrapolated,
            "Plain DPO full FT = 2 + 2 + 4 + 8 = 16 bytes per parameter + 2 for the reference; a "
            'full-copy aux adds its own 16 (in its own engine, sharded like the policy); `aux_mode="lora"` adds '
            "r·(d_in + d_out) parameters per adapted matrix (all linear layers but the LM head) in the weights' bf16, "
            "stepped through fp32 masters (fp32 gradients on the masters, fp32 AdamW moments): 2 + 4 + 4 + 8 = 18 "
            "bytes each (whole on every rank); a LoRA policy "
            "(r 16, all linear layers, fp32 adapter: 16 bytes per adapter parameter) holds the bf16 base (2 bytes per "
            "parameter, no reference: the base with the adapter off) and its aux is a second adapter. DDP and "
            "DeepSpeed keep gradient buffers, so the aux adds to the full training state. "
            "ZeRO-3's transient gathered layers and activations are not counted.",
            "",
        ]
    )
    data = {
        "command": command,
        "machine": machine,
        "size": size,
        "num_parameters": shape.num_parameters,
        "measured": measured,
        "predicted": {arm: b.as_dict() for arm, b in predicted.items()},
        "extrapolation": records,
    }
    return text, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 3M-parameter model, to check the pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm (OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path, default=None, help="Markdown output (default results/memory.md)")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the Markdown from the JSON's measurements (no runs)"
    )
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--model_path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets

    datasets.disable_progress_bars()

    if options.arm:  # a child process: one arm
        result = run_arm(options.arm, options.model_path, options.work_dir, options.size)
        options.json.write_text(json.dumps(result))
        return

    size = "quick" if options.quick else "full"
    output = options.output or RESULTS / ("memory_quick.md" if options.quick else "memory.md")
    if options.report_only:
        data = json.loads(output.with_suffix(".json").read_text())
        text, data = report(
            size, model_shape(size), data["measured"], data["command"].strip(), options.threads, data["machine"]
        )
        output.write_text(text)
        output.with_suffix(".json").write_text(json.dumps(data, indent=1))
        print(text)
        return
    command = ("python -m benchmarks.memory " + " ".join(sys.argv[1:])).strip()
    arms = list(ARMS)
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        work_dir = Path(tmp)
        model_path = work_dir / "model"
        num_parameters = build_model(model_path, size)
        shape = model_shape(size)
        if shape.num_parameters != num_parameters:
            raise RuntimeError(
                f"memory model counts {shape.num_parameters} parameters, the model has {num_parameters}"
            )
        logger.info("model: %.1fM parameters", num_parameters / 1e6)
        measured = run_arms(arms, model_path, work_dir, size, options.threads)
    text, data = report(size, shape, measured, command, options.threads)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(text)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
