"""How well do the cheap selectors track the exact-TIF selection? The LossDiff-IRM paper's Tables 1-2, in kind.

    python -m benchmarks.tif_overlap [--seeds 0 1 2] [--pool 2000] [--output-dir benchmarks/results]

Per seed: the tiny reverse-digits Llama (95k parameters) is SFT-warm-started (20 epochs on the SFT rows, lr 1e-3),
then trained one DPO epoch on the pool (the paper's warm-up stage; demo settings: β 0.5, lr 1e-4, batch 32). At that
checkpoint θ_t every score is computed as the trainer computes it at its first selection event: IRM, LossDiff (θ_aux
aligned from θ_t on the 256 validation pairs for one epoch) and the exact influence `⟨∇L(D_val), ∇L(z)⟩`. Selections,
all with the paper's 10-90 percentile bands: LossDiff band, IRM band, LossDiff-IRM (both bands), TIF (influence band).

Reported per selector: size, overlap coefficient `|S ∩ TIF| / min(|S|, |TIF|)` with the TIF selection, the overlap a
random subset of the same size would have in expectation (`max(|S|, |TIF|) / N`: with 10-90 bands chance is already
about 0.8), Spearman correlation of the score with influence, the share of known-flipped pairs kept, and the scoring
time per pair (CPU time, one thread, of the passes that score needs, reference included, after a warm-up run). Writes
`tif_overlap.csv` (one row per seed and selector) and `tif_overlap.md` (means over seeds).
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from scipy.stats import spearmanr

from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
from trl_select.rules import band_intersection, overlap_coefficient
from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl, sft_warm_start


REPO = Path(__file__).resolve().parents[1]


DATA = REPO / "recipes" / "data" / "reverse_digits"
BANDS = (10.0, 90.0)
SELECTORS = {"LossDiff": ("lossdiff",), "IRM": ("irm",), "LossDiff-IRM": ("lossdiff", "irm"), "TIF": ("influence",)}
# The passes each selector's scores need: the time per pair counts all of them, the cached reference included.
TIMED = {"IRM": ("irm",), "LossDiff": ("lossdiff",), "LossDiff-IRM": ("lossdiff", "irm"), "TIF": ("influence",)}


def checkpoint(seed: int, pool: Dataset, validation: Dataset, output_dir: str) -> SelectiveDPOTrainer:
    """SFT warm start, then one DPO epoch on the pool: the trainer holds θ_t, π_ref and the pool at its first event."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    sft_warm_start(model, tokenizer, read_jsonl(DATA / "sft.jsonl"), epochs=20, lr=1e-3, seed=seed)
    args = SelectiveDPOConfig(
        output_dir=output_dir,
        report_to="none",
        bf16=False,
        use_cpu=True,
        num_train_epochs=1,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        beta=0.5,
        max_length=64,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        selection_rule="lossdiff_irm",
    )
    trainer = SelectiveDPOTrainer(
        model, ref_model=copy.deepcopy(model), args=args, train_dataset=pool, eval_dataset=validation,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return trainer


def score_all(trainer: SelectiveDPOTrainer) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every score at the checkpoint, and each selector's scoring seconds (caches cleared before each timing)."""
    callback = trainer.selection_callback
    epoch = trainer.args.selection_warmup_epochs
    callback._compute_scores(epoch, {}, ("lossdiff", "irm", "influence"))  # warm-up: first-call costs out of timings
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for selector, names in TIMED.items():
        callback._reference = callback._validation_reference = callback._auxiliary_log_probs = None
        start = time.process_time()  # CPU time of this single-threaded process: robust to a shared, loaded machine
        scores.update(callback._compute_scores(epoch, {}, names))
        seconds[selector] = time.process_time() - start
    return scores, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=2000, help="Training pairs scored (first N of the demo pool).")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)  # timings are CPU seconds of one thread

    pool = Dataset.from_list(read_jsonl(DATA / "train.jsonl")[: options.pool])
    validation = Dataset.from_list(read_jsonl(DATA / "validation.jsonl"))
    flipped = np.array(pool["flipped"], dtype=bool)
    rows = []
    for seed in options.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = checkpoint(seed, pool, validation, scratch)
            scores, seconds = score_all(trainer)
        size = len(pool)
        masks = {
            name: band_intersection(scores, dict.fromkeys(needed, BANDS))[0] for name, needed in SELECTORS.items()
        }
        tif = set(np.flatnonzero(masks["TIF"]).tolist())
        for name, mask in masks.items():
            kept = set(np.flatnonzero(mask).tolist())
            correlation = {score: spearmanr(scores[score], scores["influence"]).statistic for score in SELECTORS[name]}
            rows.append(
                {
                    "seed": seed,
                    "selector": name,
                    "num_selected": len(kept),
                    "pool_size": size,
                    "overlap_with_tif": overlap_coefficient(kept, tif),
                    "chance_overlap": max(len(kept), len(tif)) / size,
                    "spearman_with_influence": "; ".join(f"{k}={v:.3f}" for k, v in correlation.items()),
                    "flipped_share_kept": float(flipped[mask].mean()),
                    "ms_per_pair": 1000 * seconds[name] / size,
                }
            )
        print(f"seed {seed}: " + ", ".join(f"{r['selector']} {r['overlap_with_tif']:.3f}" for r in rows[-4:]))

    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tif_overlap.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "tif_overlap.md").write_text(markdown(rows, options))
    print((out / "tif_overlap.md").read_text())


def markdown(rows: list[dict], options: argparse.Namespace) -> str:
    lines = [
        "# Overlap of cheap selections with the exact-TIF selection",
        "",
        f"`python -m benchmarks.tif_overlap --seeds {' '.join(map(str, options.seeds))} --pool {options.pool}` on "
        f"{platform.machine()} CPU, one thread (times are CPU time), torch {torch.__version__}. Tiny reverse-digits "
        "Llama (95k parameters), SFT warm start + one DPO epoch; bands 10-90 for every score. Means over seeds; "
        "per-seed values in `tif_overlap.csv`. *Above chance*: `(overlap − chance) / (1 − chance)`, 0 for a random "
        "subset of the same size, 1 for a subset of the TIF selection (or a superset of it).",
        "",
        "| selector | kept / pool | overlap with TIF | chance overlap | above chance | overlap per seed "
        "| flipped share kept | scoring CPU ms / pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SELECTORS:
        group = [row for row in rows if row["selector"] == name]
        per_seed = ", ".join(f"{row['overlap_with_tif']:.3f}" for row in group)
        overlap = float(np.mean([r["overlap_with_tif"] for r in group]))
        chance = float(np.mean([r["chance_overlap"] for r in group]))
        lines.append(
            f"| {name} | {np.mean([r['num_selected'] for r in group]):.0f} / {group[0]['pool_size']} "
            f"| {overlap:.3f} | {chance:.3f} | {(overlap - chance) / (1 - chance):.2f} | {per_seed} | {np.mean([r['flipped_share_kept'] for r in group]):.3f} "
            f"| {np.mean([r['ms_per_pair'] for r in group]):.3f} |"
        )
    lines += ["", "Spearman correlation of each score with the exact influence, per seed:", ""]
    for row in rows:
        if row["selector"] in ("LossDiff-IRM",):
            lines.append(f"- seed {row['seed']}: {row['spearman_with_influence']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
