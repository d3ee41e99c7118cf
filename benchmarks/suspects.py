"""How well does `trl-select suspects` find the flipped pairs? Precision@k and recall@k on the quality protocol.

    OMP_NUM_THREADS=1 python -m benchmarks.suspects                  # 10 seeds: train, score offline, report
    python -m benchmarks.suspects --report_only                       # recompute the tables from the kept score files
    OMP_NUM_THREADS=1 python -m benchmarks.suspects --hh_rlhf         # also: top pairs of the shipped HH-RLHF slice

Protocol (`benchmarks/quality.py`, imported, not copied): per seed a fresh reverse-digits task (2000-pair pool, exactly
30% label-flipped, known), the tiny Llama warm-started by SFT, then 3 epochs of DPO with the demo's rule
(`lossdiff_irm`, bands 10-90, warm-up 1 epoch): selection events at epochs 1 and 2. After training, one offline
scoring pass of the final policy against the SFT reference (`trl-select score --scores lossdiff,irm`, same β, aux
learning rate and length as the run). The run's score files and the offline file of each seed are kept under
`benchmarks/results/suspects/seed{s}/`, so `--report_only` recomputes every ranking without training.

Rankings compared (all by `trl_select.suspects`, higher = more likely flipped): every statistic of
`SUSPECT_STATISTICS` over the run's events; the last event's IRM alone (low = suspect) and LossDiff alone, in both
directions (the sign is measured, not assumed); the offline file alone, with the default statistic and with each score.
For k = 5, 10, 20, 30% of the pool: precision@k = flipped among the top k / k, recall@k = flipped among the top k /
all flipped; mean ± standard error over seeds.

The `--hh_rlhf` part trains the tiny character-level Llama on the shipped HH-RLHF slice (`tests/data/hh_rlhf`, rows
0-55 as the pool, 56-71 aligning θ_aux, as `tests/test_trainer.py` does, with `max_length` 1024 characters) and prints the top pairs: no ground truth,
so no accuracy claim, only what the report looks like on real conversational data.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_description, markdown_table, paired_delta
from benchmarks.quality import PROTOCOL, SFT_EPOCHS, SFT_LR, build_task, protocol_args, sft_model
from trl_select.suspects import DEFAULT_STATISTIC, SUSPECT_STATISTICS, load_score_files, rank_suspects


REPO = Path(__file__).resolve().parents[1]


logger = logging.getLogger("benchmarks.suspects")

RESULTS = REPO / "benchmarks" / "results" / "suspects"
HH_RLHF = REPO / "tests" / "data" / "hh_rlhf" / "harmless-base-test.first72.jsonl"
FRACTIONS = (0.05, 0.10, 0.20, 0.30)
RULE = "lossdiff_irm"  # the demo's rule
HH_MAX_LENGTH = 1024  # characters (the tiny model's tokenizer is character-level); TRL drops longer prompts


# ----- collecting score files -----


def collect_seed(seed: int, out_dir: Path, work_dir: Path) -> dict[str, Any]:
    """Train one seed with the demo's rule, score the final policy offline, keep the score files and the labels."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOTrainer
    from trl_select.cli import main as cli_main
    from trl_select.testing import build_char_tokenizer, build_tiny_llama, write_jsonl

    tokenizer = build_char_tokenizer()
    task = build_task(seed)
    sft_state, sft_exact, sft_seconds = sft_model(seed, task, tokenizer)
    model = build_tiny_llama(tokenizer, seed=seed)
    model.load_state_dict(sft_state)
    reference = copy.deepcopy(model)
    run_dir = work_dir / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = protocol_args(run_dir / "run", seed, selection_rule=RULE, **PROTOCOL)
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(task["train"]),
        validation_dataset=Dataset.from_list(task["validation"]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    # The offline pass: `trl-select score` on the final policy, exactly as a user would run it after training.
    policy_dir, sft_dir = run_dir / "final", run_dir / "sft"
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(policy_dir)
    reference.save_pretrained(sft_dir)
    tokenizer.save_pretrained(policy_dir)
    write_jsonl(task["train"], run_dir / "train.jsonl")
    write_jsonl(task["validation"], run_dir / "validation.jsonl")
    seed_dir = out_dir / f"seed{seed}"
    shutil.rmtree(seed_dir, ignore_errors=True)
    (seed_dir / "selection").mkdir(parents=True)
    start = time.perf_counter()
    status = cli_main(
        [
            "score", "--model", str(policy_dir), "--ref_model", str(sft_dir), "--dataset", str(run_dir / "train.jsonl"),
            "--validation", str(run_dir / "validation.jsonl"), "--scores", "lossdiff,irm",
            "--out", str(seed_dir / "offline.parquet"), "--beta", str(PROTOCOL["beta"]),
            "--max_length", str(PROTOCOL["max_length"]), "--batch_size", str(PROTOCOL["per_device_train_batch_size"]),
            "--aux_learning_rate", str(PROTOCOL["learning_rate"]), "--seed", str(seed), "--use_cpu",
        ]
    )  # fmt: skip
    offline_seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"trl-select score failed for seed {seed} (exit status {status})")
    for path in (run_dir / "run" / "selection").glob("epoch_*.parquet"):
        shutil.copy(path, seed_dir / "selection" / path.name)
    labels = {"flipped": {str(row["id"]): bool(row["flipped"]) for row in task["train"]}}
    (seed_dir / "labels.json").write_text(json.dumps(labels))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "seed": seed,
        "sft_exact_match": sft_exact,
        "sft_seconds": sft_seconds,
        "train_seconds": train_seconds,
        "offline_seconds": offline_seconds,
    }


# ----- the rankings -----


def precision_recall_at(
    ranked_ids: list[Any], flipped: set[Any], pool_size: int, fraction: float
) -> tuple[float, float]:
    """`(precision@k, recall@k)` of a ranking, k = round(fraction * pool_size): flipped in the top k / k, and / all
    flipped."""
    k = max(1, round(fraction * pool_size))
    hits = sum(pair_id in flipped for pair_id in ranked_ids[:k])
    return hits / k, hits / max(len(flipped), 1)


def rankings_of_seed(seed_dir: Path) -> dict[str, list[Any]]:
    """Every ranking compared, as pair ids from most to least suspect."""
    run = load_score_files(seed_dir)
    offline = load_score_files(seed_dir / "offline.parquet")
    rankings: dict[str, list[Any]] = {}
    for statistic in SUSPECT_STATISTICS:
        rankings[f"run: {statistic}"] = [row.pair_id for row in rank_suspects(run, statistic=statistic)]
    last = run[-1:]
    for score in ("irm", "lossdiff"):
        for direction in ("low", "high"):
            ranked = rank_suspects(last, statistic="mean_percentile", scores=(score,), directions={score: direction})
            rankings[f"last event: {score} alone, {direction} = suspect"] = [row.pair_id for row in ranked]
    rankings[f"offline pass: {DEFAULT_STATISTIC}"] = [row.pair_id for row in rank_suspects(offline)]
    rankings[f"run + offline pass: {DEFAULT_STATISTIC}"] = [row.pair_id for row in rank_suspects([*run, *offline])]
    for score in ("irm", "lossdiff"):
        ranked = rank_suspects(offline, statistic="mean_percentile", scores=(score,))
        rankings[f"offline pass: {score} alone"] = [row.pair_id for row in ranked]
    return rankings


def evaluate(out_dir: Path, seeds: list[int]) -> dict[str, Any]:
    """Precision@k and recall@k of every ranking on every seed, and their mean ± SE over seeds."""
    per_seed: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        labels = json.loads((seed_dir / "labels.json").read_text())["flipped"]
        flipped = {int(pair_id) for pair_id, value in labels.items() if value}
        for name, ranked in rankings_of_seed(seed_dir).items():
            cells = per_seed.setdefault(name, {})
            for fraction in FRACTIONS:
                precision, recall = precision_recall_at(ranked, flipped, len(labels), fraction)
                cells.setdefault(f"precision@{fraction:.0%}", []).append(precision)
                cells.setdefault(f"recall@{fraction:.0%}", []).append(recall)
    summary = {
        name: {metric: {"mean": float(np.mean(v)), "se": _se(v), "values": v} for metric, v in cells.items()}
        for name, cells in per_seed.items()
    }
    return {"seeds": seeds, "rankings": summary}


def _se(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def paired_rows(result: dict[str, Any]) -> list[list[str]]:
    """The default statistic minus every other ranking, paired per seed, at P@10% and P@20%."""
    rankings = result["rankings"]
    default = rankings[f"run: {DEFAULT_STATISTIC}"]
    rows = []
    for name, metrics in rankings.items():
        if name == f"run: {DEFAULT_STATISTIC}" or "high = suspect" in name:
            continue
        cells = [name]
        for key in ("precision@10%", "precision@20%"):
            d = paired_delta(default[key]["values"], metrics[key]["values"])
            cells += [f"{d.mean:+.3f} ± {d.se:.3f}", f"{d.wins}/{d.losses}"]
        rows.append(cells)
    return rows


def write_report(result: dict[str, Any], runs: list[dict[str, Any]], out_dir: Path, command: str, hh: str) -> str:
    header = ["ranking", *(f"P@{f:.0%}" for f in FRACTIONS), *(f"R@{f:.0%}" for f in FRACTIONS)]
    rows = []
    for name, metrics in result["rankings"].items():
        cells = [f"**{name}**" if name == f"run: {DEFAULT_STATISTIC}" else name]
        for kind in ("precision", "recall"):
            for fraction in FRACTIONS:
                m = metrics[f"{kind}@{fraction:.0%}"]
                cells.append(f"{m['mean']:.3f} ± {m['se']:.3f}")
        rows.append(cells)
    seconds = (
        f"Per seed: SFT {np.mean([r['sft_seconds'] for r in runs]):.0f} s, DPO run "
        f"{np.mean([r['train_seconds'] for r in runs]):.0f} s, offline pass {np.mean([r['offline_seconds'] for r in runs]):.0f} s."
        if runs
        else ""
    )
    text = [
        "# Suspects: ranking the label-flipped pairs from the selection scores (reverse digits, 30% flipped)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(threads=int(os.environ.get('OMP_NUM_THREADS', '0')) or None)}  ",
        f"Seeds: {result['seeds']}. Protocol: `benchmarks/quality.py` (pool 2000 pairs, 600 flipped; SFT {SFT_EPOCHS} "
        f"epochs at lr {SFT_LR}; DPO 3 epochs, rule `{RULE}` bands 10-90, warm-up 1 epoch, so two selection events). "
        + seconds,
        "",
        "P@k = flipped share of the k most suspect pairs (chance: 0.30); R@k = share of all 600 flipped pairs among "
        "them (it can reach 1 only at k = 30%, where P@k = R@k). Mean ± standard error over seeds. Bold: the default "
        f"statistic of `trl-select suspects` (`{DEFAULT_STATISTIC}`). `run:` rankings read the run's two events; "
        "`last event:` one score of the epoch-2 event; `offline pass:` the `trl-select score` file of the final policy "
        "(after epoch 3, so one epoch more trained than the last event). Score files of every seed: "
        "`benchmarks/results/suspects/seed*/`.",
        "",
        markdown_table(header, rows),
        f"Paired per seed: `run: {DEFAULT_STATISTIC}` minus each alternative (mean ± SE of the per-seed difference; "
        "wins/losses over seeds):",
        "",
        markdown_table(["alternative", "Δ P@10%", "wins/losses", "Δ P@20%", "wins/losses"], paired_rows(result)),
    ]
    text += [
        "Reading. Both scores flag a flipped pair by their *low* tail: IRM < 0 means the policy prefers the 'rejected' "
        "side; LossDiff = L(θ_t) - L(θ_aux) < 0 means the validation-aligned step raises the pair's loss. Ranking by "
        "high LossDiff is at or below chance (the rows `high = suspect`). Over a run's events the mean log-odds of "
        "the two percentiles beats each score alone and every other way of pooling the events measured here; "
        "averaging log-odds rather than percentiles lets one extreme reading (the very bottom of a score) count. The "
        "rankings ahead of it at P@10% (by about 0.01, 1-2 SE) both read the offline pass, which scores the final "
        "policy, one epoch more trained than the run's last event (scored at the start of epoch 2): IRM alone from "
        "that pass, and the default statistic over the run's events plus that pass (`trl-select suspects OUTPUT_DIR "
        "offline.parquet`, the `run + offline pass` row). At P@20% all three are level. The default was chosen on the first 8 seeds of this table (all statistics computed from the same "
        "score files); seeds 8-9 were added after.",
        "",
    ]
    if hh:
        text += ["## HH-RLHF slice: the top pairs (no ground truth: no accuracy claim)", "", hh]
    report = "\n".join(text)
    (out_dir.parent / "suspects.md").write_text(report)
    (out_dir.parent / "suspects.json").write_text(json.dumps({"command": command, "runs": runs, **result}, indent=1))
    return report


# ----- HH-RLHF -----


def run_hh_rlhf(out_dir: Path, work_dir: Path) -> str:
    """Train the tiny model on the shipped HH-RLHF slice and return the top of its suspects table (Markdown)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer
    from trl_select.suspects import find_suspects
    from trl_select.testing import build_char_tokenizer, build_tiny_llama

    rows = [json.loads(line) for line in HH_RLHF.read_text(encoding="utf-8").splitlines()]
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    run_dir = work_dir / "hh_rlhf"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = SelectiveDPOConfig(
        output_dir=str(run_dir),
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        num_train_epochs=3,
        max_length=HH_MAX_LENGTH,
        per_device_train_batch_size=8,
        aux_batch_size=4,
        learning_rate=1e-3,
        beta=0.1,
        selection_warmup_epochs=1,
    )
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(rows[:56]),
        validation_dataset=Dataset.from_list(rows[56:]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    hh_dir = out_dir.parent / "suspects_hh_rlhf"
    shutil.rmtree(hh_dir, ignore_errors=True)
    shutil.copytree(run_dir / "selection", hh_dir / "selection")
    suspects = find_suspects(hh_dir, dataset=str(HH_RLHF), top=5)
    lines = [
        f"`trl-select suspects {hh_dir.relative_to(REPO)} --dataset {HH_RLHF.relative_to(REPO)} --top 5` "
        f"(tiny character-level Llama, {len(trainer.train_dataset)} pairs left after TRL's length filter, 3 epochs):",
        "",
        markdown_table(
            [
                "rank",
                "pair_id",
                DEFAULT_STATISTIC,
                "percentiles (irm / lossdiff per event)",
                "chosen (start)",
                "rejected (start)",
            ],
            [
                [
                    row.rank,
                    row.pair_id,
                    f"{row.statistic:.1f}",
                    "; ".join(" / ".join(f"{p[s]:.0f}" for s in sorted(p)) for p in row.percentiles.values()),
                    _excerpt(row.chosen),
                    _excerpt(row.rejected),
                ]
                for row in suspects
            ],
        ),
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    return "\n".join(lines)


def _excerpt(text: str | None, width: int = 80) -> str:
    if not text:
        return ""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


# ----- main -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="benchmark seeds")
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "benchmark-suspects")
    parser.add_argument("--report_only", action="store_true", help="only recompute the tables from the score files")
    parser.add_argument("--hh_rlhf", action="store_true", help="also run the HH-RLHF slice and show its top pairs")
    options = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python -m benchmarks.suspects" + (" --hh_rlhf" if options.hh_rlhf else "")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    runs_path = options.out_dir / "runs.jsonl"
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    if not options.report_only:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import datasets

        datasets.disable_progress_bars()
        done = {run["seed"] for run in runs}
        for seed in options.seeds:
            if seed in done and (options.out_dir / f"seed{seed}" / "labels.json").exists():
                continue
            run = collect_seed(seed, options.out_dir, options.work_dir)
            logger.info("seed %d collected: %s", seed, run)
            runs.append(run)
            with runs_path.open("a") as f:
                f.write(json.dumps(run) + "\n")
    hh_path = options.out_dir.parent / "suspects_hh_rlhf" / "top.md"
    if options.hh_rlhf and not options.report_only:
        hh_path.parent.mkdir(parents=True, exist_ok=True)
        hh_path.write_text(run_hh_rlhf(options.out_dir, options.work_dir))
    hh = hh_path.read_text() if hh_path.exists() else ""
    seeds = sorted(run["seed"] for run in runs if run["seed"] in options.seeds)
    print(write_report(evaluate(options.out_dir, seeds), runs, options.out_dir, command, hh))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
