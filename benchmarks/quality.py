"""Does selection train a better model than the full pool, and than a random subset of the same size? Paired over seeds.

    OMP_NUM_THREADS=1 python benchmarks/quality.py                 # 10 seeds, every arm (about 1 h on 2 busy cores)
    python benchmarks/quality.py --quick                            # 2 seeds, to check the pipeline
    python benchmarks/quality.py --seeds 0 1 2 --arms full lossdiff_irm
    python benchmarks/quality.py --report_only                      # rewrite the tables from the cached runs

Protocol (issue 7, reproducing a plain-torch feasibility study with the real `SelectiveDPOTrainer`):

- Task: the prompt is 3-6 digits and "="; the correct response is the digits reversed. A tiny random Llama
  (`trl_select.testing.build_tiny_llama`: hidden 64, 2 layers, 95k parameters with the 100-token character vocabulary).
- Per seed s a fresh task is drawn with `recipes/data/make_reverse_digits.py`'s `build_splits(1000 * s)` (seed 0 is the
  shipped data): SFT 1000 rows, half reversal and half copy rule; pool 2000 pairs, exactly 30% label-flipped, rejected
  = 50% near miss / 50% copy rule; clean validation 256; clean test 500, all prompts disjoint.
- SFT warm start (20 epochs, lr 1e-3, as the demo recipe), then DPO from the SFT model with the SFT model as the
  reference: beta 0.5, constant lr 1e-4, batch 32, 3 epochs, bands 10-90, warm-up 1 epoch, aux refresh every epoch.
- Arms (all share epoch 0 on the full pool: same seed, same SelectionSampler order, deterministic on CPU):
  full (every pair; run as `irm_band` with the band 0-100 so that it uses the same sampler as the other arms),
  lossdiff_irm, irm_band, lossdiff_band, one_sided (LossDiff-IRM bands 10-100: drops the lowest 10% of each score
  only), oracle (drops exactly the flipped pairs), random (a fresh uniform subset of the size LossDiff-IRM kept at that
  seed and epoch), and tif (band 10-90 of exact influence, when the influence scorer is available).
- Metrics: greedy exact-match on the 500 test prompts; preference accuracy on the clean test pairs (TRL's
  `rewards/accuracies`: share of pairs with beta*h(z) > 0 against the SFT reference); the flipped share in the kept and
  dropped sets at each selection epoch (from `selection_history.jsonl`); wall time of `trainer.train()`.
- Gate: unless oracle - full >= 0.10 exact-match, the configuration is too insensitive and the table says so.

Each (seed, arm) run is appended to `results/quality/runs.jsonl` as it finishes and skipped on a rerun (delete the file
or pass `--fresh` to start over), so a long run can be resumed and arms added later.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "recipes" / "data"))

from benchmarks.common import machine_description, markdown_table, paired_delta  # noqa: E402
from trl_select import SelectionContext, register_rule  # noqa: E402
from trl_select.registry import RuleFn  # noqa: E402


logger = logging.getLogger("benchmarks.quality")

RESULTS = REPO / "benchmarks" / "results" / "quality"
ALL_ARMS = ("full", "lossdiff_irm", "irm_band", "lossdiff_band", "one_sided", "oracle", "random", "tif")
GATE = 0.10
SFT_EPOCHS, SFT_LR = 20, 1e-3

# The DPO settings of the protocol; `protocol_id` below changes whenever they do, so stale cached runs are not mixed in.
PROTOCOL = {
    "beta": 0.5,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 3,
    "max_length": 64,
    "selection_warmup_epochs": 1,
    "aux_refresh_epochs": 1,
}


# ----- the arms' custom rules (plug-ins of trl_select's rule registry) -----


def oracle_rule(flipped_by_id: dict[Any, bool]) -> RuleFn:
    """Keep exactly the pairs whose labels are not flipped (the ground truth no real rule can see)."""

    def rule(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
        return np.array([not flipped_by_id[pair_id] for pair_id in context.pair_ids])

    return rule


def random_rule(sizes: dict[int, int]) -> RuleFn:
    """Keep a uniform random subset of `sizes[epoch]` pairs, drawn afresh each epoch from `default_rng([seed, epoch])`."""

    def rule(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
        keep = np.zeros(context.pool_size, dtype=bool)
        rng = np.random.default_rng([context.seed, context.epoch])
        keep[rng.choice(context.pool_size, size=sizes[context.epoch], replace=False)] = True
        return keep

    return rule


# ----- one run -----


def build_task(seed: int) -> dict[str, list[dict]]:
    from trl_select.testing import build_splits

    return build_splits(seed_offset=1000 * seed)


def sft_model(seed: int, task: dict[str, list[dict]], tokenizer) -> tuple[dict, float, float]:
    """Warm-start the tiny Llama of `seed` on the task's SFT mix; return its state dict, exact-match and seconds."""
    from trl_select.testing import build_tiny_llama, greedy_exact_match, sft_warm_start

    start = time.perf_counter()
    model = build_tiny_llama(tokenizer, seed=seed)
    sft_warm_start(model, tokenizer, task["sft"], epochs=SFT_EPOCHS, lr=SFT_LR, seed=seed)
    seconds = time.perf_counter() - start
    exact = greedy_exact_match(model, tokenizer, [row["prompt"] for row in task["test"]])
    return copy.deepcopy(model.state_dict()), exact, seconds


def arm_config(arm: str) -> dict[str, Any]:
    """The `SelectiveDPOConfig` selection fields of an arm."""
    if arm == "full":
        return {"selection_rule": "irm_band", "irm_lo_percentile": 0.0, "irm_hi_percentile": 100.0}
    if arm in ("lossdiff_irm", "irm_band", "lossdiff_band"):
        return {"selection_rule": arm}
    if arm == "one_sided":
        return {"selection_rule": "lossdiff_irm", "lossdiff_hi_percentile": 100.0, "irm_hi_percentile": 100.0}
    if arm in ("oracle", "random"):
        return {"selection_rule": f"benchmark_{arm}"}  # registered per seed by `main`
    if arm == "tif":
        return {"selection_rule": "tif"}  # exact influence, band 10-90
    raise ValueError(f"unknown arm {arm!r}; choose from {ALL_ARMS}")


def run_arm(
    arm: str,
    seed: int,
    task: dict[str, list[dict]],
    sft_state: dict,
    tokenizer,
    work_dir: Path,
) -> dict[str, Any]:
    """Train one arm from the SFT model with `SelectiveDPOTrainer`; return its metrics and per-epoch kept sets."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer, read_history
    from trl_select.testing import build_tiny_llama, greedy_exact_match

    model = build_tiny_llama(tokenizer, seed=seed)
    model.load_state_dict(sft_state)
    reference = copy.deepcopy(model)
    output_dir = work_dir / f"seed{seed}" / arm
    shutil.rmtree(output_dir, ignore_errors=True)
    args = SelectiveDPOConfig(
        output_dir=str(output_dir),
        seed=seed,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        **PROTOCOL,
        **arm_config(arm),
    )
    train = Dataset.from_list(task["train"])
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=reference,
        args=args,
        train_dataset=train,
        eval_dataset={"test": Dataset.from_list(task["test"])},
        validation_dataset=Dataset.from_list(task["validation"]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # the benchmark logs one line per run instead
    if len(trainer.train_dataset) != len(train):
        raise RuntimeError("TRL dropped pool rows; the custom rules index pool rows and need every row kept")

    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    selection_seconds = sum(e.get("selection/seconds", 0.0) for e in trainer.state.log_history)
    metrics = trainer.evaluate()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    exact = greedy_exact_match(policy, tokenizer, [row["prompt"] for row in task["test"]])
    flipped = {row["id"]: row["flipped"] for row in task["train"]}
    epochs_record = []
    for record in read_history(output_dir):
        kept = set(record["selected_ids"])
        dropped = set(flipped) - kept
        epochs_record.append(
            {
                "epoch": record["epoch"],
                "num_kept": len(kept),
                "flipped_in_kept": sum(flipped[i] for i in kept) / max(len(kept), 1),
                "flipped_in_dropped": sum(flipped[i] for i in dropped) / len(dropped) if dropped else None,
            }
        )
    shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "arm": arm,
        "seed": seed,
        "exact_match": exact,
        # TRL logs the metrics of a named eval set without the set's name in the key
        "preference_accuracy": metrics.get("eval_test_rewards/accuracies", metrics.get("eval_rewards/accuracies")),
        "wall_seconds": wall,
        "selection_seconds": selection_seconds,
        "epochs": epochs_record,
    }


# ----- the report -----


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_arm(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run["seed"] in seeds:
            table.setdefault(run["arm"], {})[run["seed"]] = run
    return table


def write_report(runs: list[dict[str, Any]], out_dir: Path, command: str) -> str:
    seeds = sorted({run["seed"] for run in runs if run["arm"] == "full"})
    arms = by_arm(runs, seeds)
    ordered = [arm for arm in ALL_ARMS if arm in arms]
    sft = {run["seed"]: run for run in runs if run["arm"] == "sft"}

    def paired(arm: str, baseline: str, key: str):
        common = [s for s in seeds if s in arms.get(arm, {}) and s in arms.get(baseline, {})]
        if not common:
            return None
        return paired_delta([arms[arm][s][key] for s in common], [arms[baseline][s][key] for s in common])

    def fmt(delta) -> str:
        return "" if delta is None else f"{delta.mean:+.3f} ± {delta.se:.3f}"

    rows = []
    for arm in ordered:
        runs_arm = [arms[arm][s] for s in seeds if s in arms[arm]]
        em = np.array([r["exact_match"] for r in runs_arm])
        pa = np.array([r["preference_accuracy"] for r in runs_arm])
        d_full, d_random = paired(arm, "full", "exact_match"), paired(arm, "random", "exact_match")
        d_pa = paired(arm, "full", "preference_accuracy")
        kept = [np.mean([e["num_kept"] for r in runs_arm for e in r["epochs"] if e["epoch"] == k]) for k in (1, 2)]
        rows.append(
            [
                arm,
                len(runs_arm),
                f"{em.mean():.3f} ± {em.std(ddof=1) if len(em) > 1 else 0:.3f}",
                fmt(d_full) if arm != "full" else "",
                f"{d_full.wins}/{d_full.n}" if d_full and arm != "full" else "",
                fmt(d_random) if arm != "random" else "",
                f"{pa.mean():.3f}",
                fmt(d_pa) if arm != "full" else "",
                " / ".join(f"{k:.0f}" if np.isfinite(k) else "-" for k in kept),
                f"{np.mean([r['wall_seconds'] for r in runs_arm]):.1f}",
                f"{np.mean([r['selection_seconds'] for r in runs_arm]):.1f}",
            ]
        )
    header = [
        "arm",
        "seeds",
        "exact-match (mean ± sd)",
        "Δ vs full (± SE)",
        "seeds won",
        "Δ vs random (± SE)",
        "pref. acc.",
        "Δ pref. acc. vs full (± SE)",
        "kept pairs ep1 / ep2",
        "wall s",
        "of which selection s",
    ]
    flip_rows = []
    for arm in ordered:
        runs_arm = [arms[arm][s] for s in seeds if s in arms[arm]]
        cells = [arm]
        for k in (1, 2):
            kept = [e["flipped_in_kept"] for r in runs_arm for e in r["epochs"] if e["epoch"] == k]
            dropped = [
                e["flipped_in_dropped"]
                for r in runs_arm
                for e in r["epochs"]
                if e["epoch"] == k and e["flipped_in_dropped"] is not None
            ]
            cells += [f"{np.mean(kept):.3f}" if kept else "-", f"{np.mean(dropped):.3f}" if dropped else "-"]
        flip_rows.append(cells)

    # LossDiff-IRM against the rules it is made of and against the other cuts, seed by seed
    head_to_head = []
    for other in ("irm_band", "lossdiff_band", "one_sided", "tif", "random"):
        d = paired("lossdiff_irm", other, "exact_match")
        if d is not None:
            head_to_head.append([f"lossdiff_irm − {other}", fmt(d), f"{d.wins}/{d.n}"])

    gate = paired("oracle", "full", "exact_match")
    if gate is None:
        verdict = "**Gate not evaluated**: the oracle arm has not run, so the table's sensitivity is unknown."
    elif gate.mean >= GATE:
        verdict = (
            f"**Gate passed**: oracle − full = {gate.mean:+.3f} ± {gate.se:.3f} exact-match (≥ {GATE:.2f}), so the "
            "configuration can detect a useful selection."
        )
        if gate.mean - gate.se < GATE:
            verdict += " The margin is within one standard error of the threshold: a marginal pass."
    else:
        verdict = (
            f"**Gate FAILED**: oracle − full = {gate.mean:+.3f} ± {gate.se:.3f} exact-match (< {GATE:.2f}). This "
            "configuration is too insensitive; the deltas below mean nothing."
        )
    sft_em = [sft[s]["exact_match"] for s in seeds if s in sft]
    text = [
        "# Quality: selection vs the full pool (reverse digits, paired over seeds)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(threads=int(os.environ.get('OMP_NUM_THREADS', '0')) or None)}  ",
        f"Seeds: {seeds}. SFT greedy exact-match before DPO: "
        + (f"{np.mean(sft_em):.3f} (range {min(sft_em):.3f}-{max(sft_em):.3f})." if sft_em else "n/a."),
        "",
        verdict,
        "",
        "Δ = paired per-seed difference (mean ± standard error over seeds); seeds won = seeds with Δ > 0. "
        "Exact-match: greedy, 500 unseen test prompts. Preference accuracy: clean test pairs. Wall time: "
        "`trainer.train()` (selection events included; the full arm also pays an IRM pass per epoch because it runs "
        "as a 0-100 band to share the sampler).",
        "",
        markdown_table(header, rows),
        "LossDiff-IRM head to head (paired Δ exact-match ± SE, seeds won):",
        "",
        markdown_table(["comparison", "Δ exact-match", "seeds won"], head_to_head),
        "Flipped share (pool: 0.30) in the kept and dropped sets at each selection epoch, mean over seeds:",
        "",
        markdown_table(["arm", "kept ep1", "dropped ep1", "kept ep2", "dropped ep2"], flip_rows),
    ]
    report = "\n".join(text)
    (out_dir / "quality.md").write_text(report)
    with (out_dir / "quality.csv").open("w") as f:
        f.write("arm,seed,exact_match,preference_accuracy,wall_seconds,selection_seconds,"
                "kept_ep1,flipped_in_kept_ep1,kept_ep2,flipped_in_kept_ep2\n")  # fmt: skip
        for run in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
            epochs = {e["epoch"]: e for e in run.get("epochs", [])}
            cells = [run["arm"], run["seed"], run["exact_match"], run.get("preference_accuracy", ""),
                     run.get("wall_seconds", ""), run.get("selection_seconds", "")]  # fmt: skip
            for k in (1, 2):
                e = epochs.get(k)
                cells += [e["num_kept"], e["flipped_in_kept"]] if e else ["", ""]
            f.write(",".join(str(c) for c in cells) + "\n")
    plot(arms, ordered, seeds, out_dir / "quality.png")
    return report


def plot(arms: dict, ordered: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [arm for arm in ordered if arm != "full" and "full" in arms]
    if not others:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, arm in enumerate(others):
        common = [s for s in seeds if s in arms[arm] and s in arms["full"]]
        deltas = [arms[arm][s]["exact_match"] - arms["full"][s]["exact_match"] for s in common]
        d = paired_delta(
            [arms[arm][s]["exact_match"] for s in common], [arms["full"][s]["exact_match"] for s in common]
        )
        ax.bar(i, d.mean, yerr=d.se if np.isfinite(d.se) else 0, color="tab:blue", alpha=0.6, capsize=4)
        ax.scatter(np.full(len(deltas), i) + np.linspace(-0.2, 0.2, len(deltas)), deltas, s=8, color="black")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(GATE, color="tab:red", lw=0.8, ls="--", label=f"gate for the oracle (+{GATE:.2f})")
    ax.set_xticks(range(len(others)), others, rotation=20)
    ax.set_ylabel("Δ exact-match vs full")
    ax.set_title(f"Paired Δ vs full over {len(seeds)} seeds (bar: mean ± SE; dots: seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="benchmark seeds")
    parser.add_argument("--quick", action="store_true", help="seeds 0 and 1 only")
    parser.add_argument("--arms", nargs="+", default=list(ALL_ARMS), choices=ALL_ARMS)
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "benchmark-quality")
    parser.add_argument("--fresh", action="store_true", help="discard cached runs in OUT_DIR/runs.jsonl")
    parser.add_argument("--report_only", action="store_true", help="only rewrite the tables from cached runs")
    options = parser.parse_args()
    seeds = [0, 1] if options.quick else options.seeds
    # Runs are cached and can come from several invocations (e.g. an arm added later), so name the canonical command
    command = "OMP_NUM_THREADS=1 python benchmarks/quality.py" + (" --quick" if options.quick else "")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    runs_path = options.out_dir / "runs.jsonl"
    if options.fresh:
        runs_path.unlink(missing_ok=True)

    if not options.report_only:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import datasets

        datasets.disable_progress_bars()
        from trl_select.testing import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        arms = [arm for arm in ALL_ARMS if arm in options.arms]
        for seed in seeds:
            done = {run["arm"]: run for run in load_runs(runs_path) if run["seed"] == seed}
            todo = [arm for arm in arms if arm not in done]
            if not todo:
                continue
            task = build_task(seed)
            sft_state, sft_exact, sft_seconds = sft_model(seed, task, tokenizer)
            if "sft" not in done:
                _append(runs_path, {"arm": "sft", "seed": seed, "exact_match": sft_exact, "wall_seconds": sft_seconds})
            logger.info("seed %d: SFT exact-match %.3f (%.0fs)", seed, sft_exact, sft_seconds)
            # Both declare the IRM score so that their events cost what the irm_band arm's do; they ignore it.
            flipped_by_id = {row["id"]: row["flipped"] for row in task["train"]}
            register_rule("benchmark_oracle", scores=("irm",), overwrite=True)(oracle_rule(flipped_by_id))
            for arm in todo:
                if arm == "random":
                    reference = done.get("lossdiff_irm")
                    if reference is None:
                        logger.warning("seed %d: random needs the lossdiff_irm run's sizes; skipped", seed)
                        continue
                    sizes = {e["epoch"]: e["num_kept"] for e in reference["epochs"] if e["epoch"] >= 1}
                    register_rule("benchmark_random", scores=("irm",), overwrite=True)(random_rule(sizes))
                result = run_arm(arm, seed, task, sft_state, tokenizer, options.work_dir)
                done[arm] = result
                _append(runs_path, result)
                logger.info(
                    "seed %d %-13s exact-match %.3f pref-acc %.3f kept %s (%.0fs)",
                    seed,
                    arm,
                    result["exact_match"],
                    result["preference_accuracy"],
                    [e["num_kept"] for e in result["epochs"]],
                    result["wall_seconds"],
                )
            write_report(load_runs(runs_path), options.out_dir, command)
    print(write_report(load_runs(runs_path), options.out_dir, command))


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
