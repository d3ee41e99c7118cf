"""How rescoring scales: with the pool size (1k-16k pairs, it must be linear) and with the number of ranks (1 vs 2).

    python -m benchmarks.scaling            # pools 1k, 2k, 4k, 8k, 16k; 1 vs 2 ranks on 8k (~5-10 min on 2 busy cores)
    python -m benchmarks.scaling --quick    # pools 1k, 2k, 4k; 1 vs 2 ranks on 2k

Rescoring = what one selection event costs once the reference (and aux) log-probs are cached: the policy's no-grad
pass over the whole pool through the real `SelectionCallback.policy_log_probs` (TRL's collator and fused LM head,
length-sorted batches, sharded over ranks and gathered back into pool order), then the IRM score and the 10-90 band
rule on the gathered scores. Each measurement is the fastest of `--repeats` passes after one warm-up pass; linearity is judged on the process's
CPU time (robust to other jobs on shared cores), the rank comparison on wall time.

Model: a Llama built locally (hidden 128, 2 layers, MLP 256, 0.42M parameters) on reverse-digits pairs (3-6 digit prompts,
~10-16 tokens per sequence), scoring batch 64 per rank. Every process runs with `OMP_NUM_THREADS=1`, so the 1-rank
and 2-rank runs use 1 and 2 cores; 2 ranks are 2 real processes (`torch.distributed.run`, gloo on the CPU).
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

from benchmarks.common import fit_line, machine_description, markdown_table


REPO = Path(__file__).resolve().parents[1]


logger = logging.getLogger("benchmarks.scaling")

RESULTS = REPO / "benchmarks" / "results"
SCORING_BATCH = 64
MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}


def time_rescoring(pool_sizes: list[int], repeats: int, work_dir: Path) -> list[dict[str, float]]:
    """In this process (1 rank or one of N under torchrun): median rescoring seconds per pool size."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
    from trl_select.testing import build_char_tokenizer, build_tiny_llama, make_reverse_digits_pairs

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, **MODEL, seed=0)
    results = []
    for size in pool_sizes:
        pool = Dataset.from_list(make_reverse_digits_pairs(size, flip_fraction=0.3, seed=size))
        args = SelectiveDPOConfig(
            output_dir=str(work_dir / f"pool{size}"),
            report_to="none",
            bf16=False,
            use_cpu=True,
            selection_rule="irm_band",
            per_device_eval_batch_size=SCORING_BATCH,
            max_length=32,
            disable_tqdm=True,
            save_strategy="no",
            ddp_timeout=600,
        )
        trainer = SelectiveDPOTrainer(
            model,
            ref_model=build_tiny_llama(tokenizer, **MODEL, seed=0),
            args=args,
            train_dataset=pool,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        reference = trainer.selection_callback.reference_log_probs()  # cached, as on every event after the first
        accelerator = trainer.accelerator

        rescore(trainer, reference)  # warm-up: allocator, kernels
        # The fastest pass: the one least disturbed by other jobs on the machine
        walls, cpus = zip(*(rescore(trainer, reference) for _ in range(repeats)), strict=True)
        results.append(
            {"pool": size, "seconds": min(walls), "cpu_seconds": min(cpus), "world_size": accelerator.num_processes}
        )
        if accelerator.is_main_process:
            logger.info("pool %d, %d rank(s): %.3fs wall, %.3fs CPU", size, accelerator.num_processes, min(walls),
                        min(cpus))  # fmt: skip
        del trainer
    return results


def rescore(trainer, reference) -> tuple[float, float]:
    """One rescoring on every rank (policy pass over the pool, IRM, 10-90 band; reference cached).

    Returns `(wall seconds, CPU seconds of this process)`. On a machine shared with other jobs the CPU time of a
    1-thread process is what the work costs; the wall time also counts the time other jobs held the core.
    """
    from trl_select import implicit_reward_margin
    from trl_select.rules import band_intersection

    args, accelerator = trainer.args, trainer.accelerator
    accelerator.wait_for_everyone()
    start, cpu_start = time.perf_counter(), time.process_time()
    policy = trainer.selection_callback.policy_log_probs()
    irm = implicit_reward_margin(policy, reference, args.beta).double().numpy()
    band_intersection({"irm": irm}, args.percentile_bands())
    cpu = time.process_time() - cpu_start
    accelerator.wait_for_everyone()
    return time.perf_counter() - start, cpu


def launch(pool_sizes: list[int], repeats: int, num_processes: int, work_dir: Path) -> list[dict[str, float]]:
    out = work_dir / f"ranks{num_processes}.json"
    worker = ["-m", "benchmarks.scaling", "--worker", "--pools", *map(str, pool_sizes), "--repeats", str(repeats),
              "--work_dir", str(work_dir), "--json", str(out)]  # fmt: skip
    if num_processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{num_processes}-rank run failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def report(
    sizes: list[dict[str, float]], ranks: dict[int, dict[str, float]], rank_pool: int, repeats: int, command: str
) -> str:
    from trl_select.testing import build_char_tokenizer, build_tiny_llama

    num_parameters = sum(p.numel() for p in build_tiny_llama(build_char_tokenizer(), **MODEL).parameters())
    pools = [r["pool"] for r in sizes]
    seconds = [r["cpu_seconds"] for r in sizes]
    line = fit_line(pools, seconds)
    rows = [
        [f"{r['pool']:,}", f"{r['cpu_seconds']:.2f}", f"{1e3 * r['cpu_seconds'] / r['pool']:.3f}",
         f"{line.intercept + line.slope * r['pool']:.2f}", f"{r['seconds']:.2f}"]
        for r in sizes
    ]  # fmt: skip
    doubling = [b / a for a, b in zip(seconds, seconds[1:], strict=False)]
    return "\n".join(
        [
            "# Scaling of rescoring with the pool size and the number of ranks",
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine_description(threads=1)}.  ",
            f"Model: Llama built locally ({MODEL}, {num_parameters / 1e6:.2f}M parameters), reverse-digits pairs, scoring batch "
            f"{SCORING_BATCH}. Rescoring = policy pass over the pool + IRM + 10-90 band (reference cached); the "
            f"fastest of {repeats} passes after a warm-up. Linearity is judged on the CPU time of the 1-thread "
            "process, which other jobs on the shared cores do not inflate; wall times are given alongside.",
            "",
            "## Pool size (1 rank)",
            "",
            markdown_table(["pool pairs", "CPU s", "CPU ms / pair", "fitted line (CPU s)", "wall s"], rows),
            f"Least-squares line: {1e3 * line.slope:.3f} ms per pair + {line.intercept:.2f} s fixed, R² = "
            f"{line.r2:.4f}. Time ratio per doubling of the pool: {', '.join(f'{d:.2f}' for d in doubling)} "
            "(2.00 = linear).",
            "",
            f"## Ranks (pool {rank_pool:,} pairs)",
            "",
            markdown_table(
                ["ranks", "wall s", "wall speed-up vs 1 rank", "CPU s of rank 0", "rank-0 CPU / 1-rank CPU"],
                [
                    [
                        n,
                        f"{r['seconds']:.2f}",
                        f"{ranks[1]['seconds'] / r['seconds']:.2f}",
                        f"{r['cpu_seconds']:.2f}",
                        f"{r['cpu_seconds'] / ranks[1]['cpu_seconds']:.2f}",
                    ]
                    for n, r in sorted(ranks.items())
                ],
            ),  # fmt: skip
            f"2 ranks / 1 rank wall time = {ranks[2]['seconds'] / ranks[1]['seconds']:.2f} (0.50 = perfect "
            f"scaling); rank 0's CPU time = {ranks[2]['cpu_seconds'] / ranks[1]['cpu_seconds']:.2f} of the 1-rank "
            "run's (0.50 = the work splits evenly; the rest is the per-batch gather). The wall time needs 2 free "
            "cores.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pools 1k-4k, ranks on 2k")
    parser.add_argument("--pools", type=int, nargs="+", default=None, help="pool sizes (pairs)")
    parser.add_argument("--rank_pool", type=int, default=None, help="pool for the 1 vs 2 ranks comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (the fastest counts)")
    parser.add_argument("--output", type=Path, default=None, help="Markdown output (default results/scaling.md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    if options.worker:
        results = time_rescoring(options.pools, options.repeats, options.work_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            options.json.write_text(json.dumps(results))
        return

    pools = options.pools or ([1000, 2000, 4000] if options.quick else [1000, 2000, 4000, 8000, 16000])
    rank_pool = options.rank_pool or (2000 if options.quick else 8000)
    output = options.output or RESULTS / ("scaling_quick.md" if options.quick else "scaling.md")
    command = "python -m benchmarks.scaling " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        sizes = launch(pools, options.repeats, 1, Path(tmp))
        # 1, 2, 1 ranks right after each other, so the load from other jobs is as similar as it gets
        one = launch([rank_pool], options.repeats, 1, Path(tmp))[0]
        two = launch([rank_pool], options.repeats, 2, Path(tmp))[0]
        one_again = launch([rank_pool], options.repeats, 1, Path(tmp))[0]
    ranks = {1: min(one, one_again, key=lambda r: r["seconds"]), 2: two}
    text = report(sizes, ranks, rank_pool, options.repeats, command)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps({"pools": sizes, "ranks": ranks, "rank_pool": rank_pool}))
    plot(sizes, output.with_suffix(".png"))
    print(text)


def plot(sizes: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = [r["pool"] for r in sizes]
    seconds = [r["cpu_seconds"] for r in sizes]
    line = fit_line(pools, seconds)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(pools, seconds, "o", label="measured")
    ax.plot(pools, [line.intercept + line.slope * p for p in pools], "-", label=f"fit, R² {line.r2:.3f}")
    ax.set_xlabel("pool pairs")
    ax.set_ylabel("rescoring CPU seconds (1 rank)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
