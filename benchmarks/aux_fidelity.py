"""Does the low-rank aux model (`aux_mode="lora"`) score like the full copy (`aux_mode="full"`)? Paired over seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.aux_fidelity                   # 10 seeds: scores, then exact-match
    OMP_NUM_THREADS=1 python -m benchmarks.aux_fidelity --quick           # seeds 0 and 1
    OMP_NUM_THREADS=1 python -m benchmarks.aux_fidelity --no_training     # the score comparison only (cheaper)
    python -m benchmarks.aux_fidelity --report_only                       # rewrite the tables from the cached runs

Protocol: `benchmarks/quality.py`'s (reverse digits, tiny Llama, per-seed task, SFT warm start, DPO beta 0.5, lr 1e-4
constant, batch 32, bands 10-90, aux stage = one pass over the 256 validation pairs at the policy's lr).

1. Scores (per seed): the warm-up epoch on the full pool, then from that one θ_t the aux model is built and aligned
   with `aux_mode="full"` and with `aux_mode="lora"` (r 16, alpha 32, all linear layers, and the same stage at 10x the
   learning rate, since a LoRA update from B = 0 moves the function far less per step than a full AdamW step), each
   from the same validation shuffle, and the r-16 LoRA aux once more on a different shuffle. Reported: Spearman rank correlation of the per-pair LossDiff with the full copy's,
   the overlap coefficient `|A ∩ B| / min(|A|, |B|)` of the LossDiff-IRM selections (and of the LossDiff bands alone),
   and, as the noise floor, the same figures for a second full copy aligned on a different validation shuffle: a LoRA
   aux that agrees with the full copy about as well as the full copy agrees with itself is as good a LossDiff.
2. Exact-match (per seed, unless `--no_training`): the LossDiff-IRM protocol run (3 epochs) with each mode; greedy
   exact-match on the 500 test prompts, paired difference lora − full with its standard error.

Runs are cached in `results/aux_fidelity/runs.jsonl` (one line per seed and part) and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import quality
from benchmarks.common import machine_description, markdown_table, paired_delta


REPO = Path(__file__).resolve().parents[1]


logger = logging.getLogger("benchmarks.aux_fidelity")

RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "aux_fidelity" / "runs.jsonl"
# The LoRA aux variants scored against the full copy: name -> (aux_lora_r, aux_lora_alpha, learning-rate multiple)
LORA_VARIANTS = {"lora_r16": (16, 32.0, 1.0), "lora_r16_lr10x": (16, 32.0, 10.0)}
NOISE_FLOOR = "full_other_shuffle"
# The r-16 LoRA aux on the noise floor's shuffle: against the full copy, it differs by both the mode and the batches,
# exactly as the noise floor differs by the batches only, so the two rows compare like with like.
LORA_OTHER_SHUFFLE = "lora_r16_other_shuffle"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks (ties share their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def lossdiff_irm_selection(lossdiff: np.ndarray, irm: np.ndarray) -> tuple[set[int], set[int]]:
    """The LossDiff-IRM selection (both 10-90 bands) and the LossDiff band alone, as sets of pool rows."""
    from trl_select.rules import band_intersection, percentile_band

    keep, _ = band_intersection({"lossdiff": lossdiff, "irm": irm}, {"lossdiff": (10, 90), "irm": (10, 90)})
    band, _ = percentile_band(lossdiff, 10, 90)
    return set(np.flatnonzero(keep).tolist()), set(np.flatnonzero(band).tolist())


def score_seed(seed: int, task: dict, sft_state: dict, tokenizer, work_dir: Path) -> dict[str, Any]:
    """Warm up one epoch, then LossDiff from the same θ_t with the full copy, its noise floor and the LoRA variants."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
    from trl_select.rules import overlap_coefficient
    from trl_select.scores import implicit_reward_margin, loss_difference
    from trl_select.testing import build_tiny_llama

    model = build_tiny_llama(tokenizer, seed=seed)
    model.load_state_dict(sft_state)
    output_dir = work_dir / f"seed{seed}" / "scores"
    shutil.rmtree(output_dir, ignore_errors=True)
    protocol = {**quality.PROTOCOL, "num_train_epochs": quality.PROTOCOL["selection_warmup_epochs"]}
    args = SelectiveDPOConfig(
        output_dir=str(output_dir), seed=seed, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
        eval_strategy="no", logging_steps=10, disable_tqdm=True, selection_rule="lossdiff_irm", **protocol,
    )  # fmt: skip
    trainer = SelectiveDPOTrainer(
        model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(task["train"]),
        validation_dataset=Dataset.from_list(task["validation"]), processing_class=tokenizer,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()  # the warm-up epoch: θ_t
    engine = trainer.selection_engine
    policy, reference = engine.policy_log_probs(), engine.reference_log_probs()
    auxiliary = engine.auxiliary()
    base = auxiliary.settings
    beta, loss_type = args.beta, args.loss_type[0]

    variants: dict[str, tuple[dict, int]] = {"full": ({"mode": "full"}, 0), NOISE_FLOOR: ({"mode": "full"}, 1)}
    for name, (rank, alpha, lr_scale) in LORA_VARIANTS.items():
        settings = {
            "mode": "lora",
            "lora_r": rank,
            "lora_alpha": alpha,
            "learning_rate": base.learning_rate * lr_scale,
        }
        variants[name] = (settings, 0)
    rank, alpha, _ = LORA_VARIANTS["lora_r16"]
    variants[LORA_OTHER_SHUFFLE] = ({"mode": "lora", "lora_r": rank, "lora_alpha": alpha}, 1)
    lossdiff: dict[str, np.ndarray] = {}
    record: dict[str, Any] = {"part": "scores", "seed": seed, "variants": {}}
    for name, (settings, shuffle) in variants.items():
        auxiliary.settings = dataclasses.replace(base, **settings)
        auxiliary.num_refreshes = shuffle  # the validation shuffle (`seed + num_refreshes`) and, for LoRA, A's draw
        start = time.perf_counter()
        result = auxiliary.refresh(engine.pool_loader(), trainer.selection_sampler.pool_size)
        seconds = time.perf_counter() - start
        lossdiff[name] = loss_difference(policy, result.pool_log_probs, reference, beta, loss_type).numpy()
        record["variants"][name] = {
            "val_loss_before": result.validation_loss_before,
            "val_loss_after": result.validation_loss_after,
            "seconds": seconds,
            "lossdiff_sd": float(lossdiff[name].std()),
        }
    irm = implicit_reward_margin(policy, reference, beta).numpy()
    selections = {name: lossdiff_irm_selection(values, irm) for name, values in lossdiff.items()}
    for name in variants:
        if name == "full":
            continue
        record["variants"][name].update(
            spearman=spearman(lossdiff[name], lossdiff["full"]),
            overlap_lossdiff_irm=overlap_coefficient(selections[name][0], selections["full"][0]),
            overlap_lossdiff_band=overlap_coefficient(selections[name][1], selections["full"][1]),
        )
    shutil.rmtree(output_dir, ignore_errors=True)
    return record


def train_seed(seed: int, mode: str, task: dict, sft_state: dict, tokenizer, work_dir: Path) -> dict[str, Any]:
    """The LossDiff-IRM protocol run (quality.py's `lossdiff_irm` arm) with the aux model built by `mode`."""
    arm_config = quality.arm_config
    quality.arm_config = lambda arm: {**arm_config("lossdiff_irm"), "aux_mode": mode}
    try:
        result = quality.run_arm(f"lossdiff_irm_{mode}", seed, task, sft_state, tokenizer, work_dir)
    finally:
        quality.arm_config = arm_config
    return {"part": "train", "mode": mode, **result}


# ----- the report -----


def _mean_se(values: list[float]) -> str:
    array = np.asarray(values, dtype=float)
    se = array.std(ddof=1) / np.sqrt(len(array)) if len(array) > 1 else float("nan")
    return f"{array.mean():.3f} ± {se:.3f}"


def write_report(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    scores = {r["seed"]: r for r in runs if r["part"] == "scores"}
    seeds = sorted(scores)
    names = [NOISE_FLOOR, *LORA_VARIANTS, LORA_OTHER_SHUFFLE]
    rows = []
    for name in names:
        per_seed = [scores[s]["variants"][name] for s in seeds if name in scores[s]["variants"]]
        if not per_seed:
            continue
        rho = [v["spearman"] for v in per_seed]
        row = [name, len(per_seed), _mean_se(rho), f"{min(rho):.3f}"]
        row += [_mean_se([v[k] for v in per_seed]) for k in ("overlap_lossdiff_irm", "overlap_lossdiff_band")]
        if name != NOISE_FLOOR:
            floor = [scores[s]["variants"][NOISE_FLOOR]["spearman"] for s in seeds if name in scores[s]["variants"]]
            d = paired_delta(rho, floor)
            row.append(f"{d.mean:+.3f} ± {d.se:.3f}")
        else:
            row.append("")
        drop = [v["val_loss_before"] - v["val_loss_after"] for v in per_seed]
        row += [_mean_se(drop), f"{np.mean([v['seconds'] for v in per_seed]):.1f}"]
        rows.append(row)
    full_drop = [scores[s]["variants"]["full"]["val_loss_before"] - scores[s]["variants"]["full"]["val_loss_after"]
                 for s in seeds]  # fmt: skip
    header = [
        "aux vs the full copy", "seeds", "Spearman ρ of LossDiff (mean ± SE)", "min ρ", "overlap LossDiff-IRM",
        "overlap LossDiff band", "Δρ vs noise floor (± SE)", "val-loss drop of the stage", "aux s",
    ]  # fmt: skip

    trained: dict[str, dict[int, dict]] = {}
    for run in runs:
        if run["part"] == "train":
            trained.setdefault(run["mode"], {})[run["seed"]] = run
    train_rows = []
    common = sorted(set(trained.get("full", {})) & set(trained.get("lora", {})))
    if common:
        for key in ("exact_match", "preference_accuracy"):
            lora = [trained["lora"][s][key] for s in common]
            full = [trained["full"][s][key] for s in common]
            d = paired_delta(lora, full)
            train_rows.append(
                [
                    key,
                    len(common),
                    f"{np.mean(full):.3f}",
                    f"{np.mean(lora):.3f}",
                    f"{d.mean:+.3f} ± {d.se:.3f}",
                    f"{d.wins}/{d.losses}/{d.ties}",
                ]  # fmt: skip
            )
        wall = [
            "wall s (train)", len(common),
            f"{np.mean([trained['full'][s]['wall_seconds'] for s in common]):.1f}",
            f"{np.mean([trained['lora'][s]['wall_seconds'] for s in common]):.1f}", "", "",
        ]  # fmt: skip
        train_rows.append(wall)
    text = [
        '# Aux fidelity: the LoRA aux (`aux_mode="lora"`) against the full copy (`aux_mode="full"`)',
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(threads=int(os.environ.get('OMP_NUM_THREADS', '0')) or None)}  ",
        f"Seeds: {seeds}. Protocol: `benchmarks/quality.py` (reverse digits, tiny Llama, 2000-pair pool, 256 validation "
        "pairs, aux stage 8 steps at lr 1e-4 unless noted). LoRA: r 16, alpha 32, every linear layer but the head.",
        "",
        "## LossDiff from the same θ_t (after the warm-up epoch)",
        "",
        f"`{NOISE_FLOOR}` is a second full copy aligned on a different validation shuffle: the agreement of the full "
        "copy with itself, the noise floor. The other LoRA rows use the full copy's shuffle (and so share its "
        f"batches); `{LORA_OTHER_SHUFFLE}` uses the noise floor's, so it is the like-for-like comparison with the "
        "floor. Overlap = `|A ∩ B| / min(|A|, |B|)` of the selections. "
        f"Validation-loss drop of the full copy's stage: {_mean_se(full_drop)}.",
        "",
        markdown_table(header, rows),
    ]
    if train_rows:
        text += [
            "## After training (LossDiff-IRM protocol, 3 epochs) with each aux mode",
            "",
            "Greedy exact-match on 500 unseen test prompts; Δ = lora − full, paired over seeds (± SE); "
            "wins/losses/ties of lora.",
            "",
            markdown_table(["metric", "seeds", "full", "lora", "Δ lora − full", "w/l/t"], train_rows),
        ]
    else:
        text += ["Exact-match after training: not run (`--no_training`)."]
    report = "\n".join(text)
    (out / "aux_fidelity.md").write_text(report)
    summary = {"command": command, "seeds": seeds, "scores": [scores[s] for s in seeds],
               "train": [r for r in runs if r["part"] == "train"]}  # fmt: skip
    (out / "aux_fidelity.json").write_text(json.dumps(summary, indent=1))
    return report


# ----- main -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--quick", action="store_true", help="seeds 0 and 1 only")
    parser.add_argument("--no_training", action="store_true", help="the score comparison only")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "benchmark-aux-fidelity")
    options = parser.parse_args()
    seeds = [0, 1] if options.quick else options.seeds
    command = "OMP_NUM_THREADS=1 python -m benchmarks.aux_fidelity" + (" --quick" if options.quick else "")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    if not options.report_only:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import datasets

        datasets.disable_progress_bars()
        from trl_select.testing import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        # The cheap part first for every seed, so that the score table is complete before the training runs start
        parts = [("scores", None)] + ([] if options.no_training else [("train", "full"), ("train", "lora")])
        for part, mode in parts:
            for seed in seeds:
                done = {(r["part"], r.get("mode")) for r in quality.load_runs(CACHE) if r["seed"] == seed}
                if (part, mode) in done:
                    continue
                task = quality.build_task(seed)
                sft_state, _, _ = _sft(seed, task, tokenizer)
                if part == "scores":
                    record = score_seed(seed, task, sft_state, tokenizer, options.work_dir)
                    logger.info("seed %d: %s", seed, json.dumps(record["variants"]))
                else:
                    record = train_seed(seed, mode, task, sft_state, tokenizer, options.work_dir)
                    logger.info("seed %d %s: exact-match %.3f", seed, mode, record["exact_match"])
                quality.append_run(CACHE, record)
                write_report(quality.load_runs(CACHE), RESULTS, command)
    logger.info("\n%s", write_report(quality.load_runs(CACHE), RESULTS, command))


_SFT_CACHE: dict[int, tuple[dict, float, float]] = {}


def _sft(seed: int, task: dict, tokenizer) -> tuple[dict, float, float]:
    """The seed's SFT warm start (deterministic on the CPU), computed once per process."""
    if seed not in _SFT_CACHE:
        _SFT_CACHE[seed] = quality.sft_model(seed, task, tokenizer)
    return _SFT_CACHE[seed]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
