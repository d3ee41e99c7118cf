"""Which band for which data? Fixed rules and `lossdiff_irm_auto` on three kinds of noisy pool, paired over seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.regimes                       # 3 regimes x 10 seeds x the default arms
    OMP_NUM_THREADS=1 python -m benchmarks.regimes --seeds 0 2 4 6 8     # one of two workers (runs are cached)
    python -m benchmarks.regimes --regimes b --seeds 0 1 --arms full oracle   # a slice
    python -m benchmarks.regimes --report_only                           # rewrite the tables from the cached runs

The task, model, SFT warm start and DPO settings are protocol 2 of `benchmarks/quality.py` (reverse digits, a 95k
tiny Llama, 3 epochs, bands from epoch 1). Only the 2000-pair pool changes, built from the same prompts:

- (a) `flipped`: protocol 2's pool, 30% of the pairs label-flipped (chosen and rejected swapped).
- (b) `uninformative`: no flipped label, but 60% of the pool teaches nothing useful. 30% are *easy*: the chosen
  answer is correct and the rejected one is letters of the same length, which the SFT model never writes (already
  learned). 30% are *near-ties*: two answers that are equally wrong, the copy rule and a near miss of the correct
  answer (one digit changed or two swapped), in random order, so the preference between them is arbitrary. 40% are
  the informative pairs of protocol 2 (correct over a near miss or the copy rule).
- (c) `mixed`: 10% flipped, 40% easy, 50% informative.

Arms: `full` (every pair), `default` (`lossdiff_irm`, both bands 10-90: the paper's rule), `low_cut` (both bands
10-100), `irm_band` (IRM 10-90 alone), `auto` (`lossdiff_irm_auto`), `auto_harm_only` (its first design: IRM tails
cut only with evidence of harm, none by default), and `oracle` (drops exactly the harmful kinds, flipped pairs and
near-ties, and keeps the easy pairs: the gate that the regime can be helped by dropping pairs). Each run is appended
to `results/regimes/runs.jsonl` and skipped on a rerun; the SFT model of a seed is cached in `--work_dir`. The runs
file also holds a 2-seed pilot arm, `oracle_strict` (only the informative pairs, dropping the easy ones too), that
the report leaves out.
"""

from __future__ import annotations

import argparse
import logging
import random
import string
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import quality
from benchmarks.common import machine_description, markdown_table, paired_delta
from benchmarks.quality import append_run, build_task, prepare_protocol_runs, run_arm, sft_model
from trl_select import SelectionContext, register_rule
from trl_select.testing.reverse_digits import _near_miss, reverse_answer


logger = logging.getLogger("benchmarks.regimes")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "regimes"
PROTOCOL_ID = 1  # bump whenever the regimes, the arms' settings or the evaluation change
REGIMES = {
    # pair-kind fractions of the 2000-pair pool
    "a": {"flipped": 0.3, "easy": 0.0, "tie": 0.0},
    "b": {"flipped": 0.0, "easy": 0.3, "tie": 0.3},
    "c": {"flipped": 0.1, "easy": 0.4, "tie": 0.0},
}
REGIME_NAMES = {"a": "30% flipped", "b": "30% easy + 30% near-ties", "c": "10% flipped + 40% easy"}
ARMS = ("full", "default", "low_cut", "irm_band", "auto", "auto_harm_only", "oracle")
ARM_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"selection_rule": "benchmark_keep_all"},
    "default": {"selection_rule": "lossdiff_irm"},
    "low_cut": {"selection_rule": "lossdiff_irm", "lossdiff_hi_percentile": 100.0, "irm_hi_percentile": 100.0},
    "irm_band": {"selection_rule": "irm_band"},
    "auto": {"selection_rule": "lossdiff_irm_auto"},
    "auto_harm_only": {"selection_rule": "benchmark_auto_harm_only"},
    "oracle": {"selection_rule": "benchmark_oracle"},
}
FIXED_ARMS = ("full", "default", "low_cut", "irm_band")


def auto_harm_only_rule(scores: dict[str, np.ndarray], context: SelectionContext):
    """The first design of `lossdiff_irm_auto`: IRM tails cut only with evidence of harm (no prior cut)."""
    from trl_select.registry_builtins import evidence_bands

    return evidence_bands(scores, context.args.lossdiff_lo_percentile, prior_cut_slices=0)


def regime_pool(rows: list[dict[str, Any]], regime: str, seed: int) -> list[dict[str, Any]]:
    """Rebuild protocol 2's pool `rows` (same prompts and ids) with the pair kinds of `regime`.

    Every row gets `kind` in {"informative", "flipped", "easy", "tie"} and `flipped` (for the run records). Regime
    (a) is the pool unchanged. Deterministic in (`regime`, `seed`).
    """
    if regime == "a":
        return [{**row, "kind": "flipped" if row["flipped"] else "informative"} for row in rows]
    fractions = REGIMES[regime]
    rng = random.Random(f"regime-{regime}-{seed}")
    order = rng.sample(range(len(rows)), len(rows))
    kinds = ["informative"] * len(rows)
    start = 0
    for kind in ("flipped", "easy", "tie"):
        count = round(fractions[kind] * len(rows))
        for i in order[start : start + count]:
            kinds[i] = kind
        start += count
    pool = []
    for row, kind in zip(rows, kinds, strict=True):
        correct = reverse_answer(row["prompt"])
        # protocol 2's wrong answer of this prompt (a near miss or the copy rule), wherever its flip put it
        wrong = row["chosen"] if row["flipped"] else row["rejected"]
        if kind == "informative":
            chosen, rejected = correct, wrong
        elif kind == "flipped":
            chosen, rejected = wrong, correct
        elif kind == "easy":
            chosen, rejected = correct, "".join(rng.choice(string.ascii_lowercase) for _ in correct)
        else:
            # two wrong answers, the copy rule and a near miss (two near misses for a palindrome), in random order
            copied = row["prompt"][:-1]
            first = copied if copied != correct else _near_miss(correct, rng)
            second = _near_miss(correct, rng)
            while second == first:
                second = _near_miss(correct, rng)
            chosen, rejected = (first, second) if rng.random() < 0.5 else (second, first)
        pool.append(
            {"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "kind": kind}
            | {"flipped": kind == "flipped"}
        )
    return pool


def oracle_rule(keep_by_id: dict[Any, bool]):
    """Keep exactly the pairs `keep_by_id` marks, by their kind (the ground truth no real rule can see)."""

    def rule(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
        return np.array([keep_by_id[pair_id] for pair_id in context.pair_ids])

    return rule


def cached_sft(seed: int, task: dict[str, list[dict]], tokenizer, work_dir: Path) -> tuple[dict, float]:
    """The SFT model of `seed` (shared by the three regimes: the SFT split does not depend on the pool)."""
    import torch

    path = work_dir / f"sft_seed{seed}.pt"
    if path.exists():
        record = torch.load(path, weights_only=True)
        return record["state"], float(record["exact_match"])
    state, exact, _ = sft_model(seed, task, tokenizer)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "exact_match": exact}, path)
    return state, exact


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The cached runs of this benchmark's protocol."""
    return quality.load_runs(path, PROTOCOL_ID)


def kept_composition(run: dict[str, Any]) -> str:
    """Mean share of each pair kind among the kept pairs of the selection epochs (1 and 2)."""
    shares = [e["kind_shares"] for e in run["epochs"] if e["epoch"] >= 1 and "kind_shares" in e]
    if not shares:
        return ""
    kinds = sorted({k for s in shares for k in s})
    return " ".join(f"{k[:4]} {np.mean([s.get(k, 0.0) for s in shares]):.2f}" for k in kinds)


def pooled_lines(runs: list[dict[str, Any]], other: list[dict[str, Any]], other_name: str) -> list[str]:
    """Δ vs full and vs the default over the seeds of both studies (this one and `other`), for the arms both ran."""
    rows = []
    for regime in REGIMES:
        table: dict[str, dict[int, float]] = {}
        for run in (*runs, *other):
            if run["regime"] == regime:
                table.setdefault(run["arm"], {})[run["seed"]] = run["exact_match"]
        arms = [arm for arm in ARMS if arm in table and arm not in ("full", "oracle") and "default" in table]
        if "full" not in table or not arms:
            continue
        for arm in arms:
            seeds = sorted(set(table["full"]) & set(table["default"]) & set(table[arm]))
            to_full = paired_delta([table[arm][s] for s in seeds], [table["full"][s] for s in seeds])
            cells = [
                f"({regime})",
                arm,
                len(seeds),
                f"{to_full.mean:+.3f} ± {to_full.se:.3f} ({to_full.wins}/{to_full.n})",
            ]
            if arm == "default":
                cells.append("")
            else:
                to_default = paired_delta([table[arm][s] for s in seeds], [table["default"][s] for s in seeds])
                cells.append(f"{to_default.mean:+.3f} ± {to_default.se:.3f} ({to_default.wins}/{to_default.n})")
            rows.append(cells)
    if not rows:
        return []
    return [
        f"## Pooled with {other_name}",
        "",
        "Each arm paired with full and the default over every seed where the three ran.",
        "",
        markdown_table(["regime", "arm", "seeds", "Δ vs full", "Δ vs default"], rows),
        "",
    ]


def write_report(
    runs: list[dict[str, Any]], out_dir: Path, command: str, pooled: tuple[list[dict[str, Any]], str] | None = None
) -> str:
    lines = [
        "# Which band for which data: fixed rules and `lossdiff_irm_auto` on three kinds of noisy pool",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        "Protocol 2 of `benchmarks/quality.py` (reverse digits, tiny Llama, SFT warm start, 3 DPO epochs, selection "
        "from epoch 1), with the pool rebuilt per regime (`benchmarks/regimes.py`). Exact-match: greedy, 500 clean "
        "test prompts, after the last step. Δ = paired per-seed difference, mean ± standard error over seeds. "
        "Compute: the trainer's ledger (training + selection, forward-token equivalents) over a plain 3-epoch "
        "full-pool run's training compute (the full arm counts training only, as a plain run would).",
        "",
    ]
    for regime in REGIMES:
        regime_runs = [r for r in runs if r["regime"] == regime]
        table: dict[str, dict[int, dict[str, Any]]] = {}
        for run in regime_runs:
            table.setdefault(run["arm"], {})[run["seed"]] = run
        if "full" not in table:
            continue
        seeds = sorted(table["full"])
        lines += [f"## Regime ({regime}): {REGIME_NAMES[regime]}", ""]
        rows = []
        for arm in ARMS:
            if arm not in table:
                continue
            common = [s for s in seeds if s in table[arm]]
            em = np.array([table[arm][s]["exact_match"] for s in common])
            cells = [arm, len(common), f"{em.mean():.3f}"]
            for baseline in ("full", "default"):
                if arm == baseline:
                    cells.append("")
                    continue
                both = [s for s in common if s in table.get(baseline, {})]
                if not both:
                    cells.append("")
                    continue
                d = paired_delta(
                    [table[arm][s]["exact_match"] for s in both], [table[baseline][s]["exact_match"] for s in both]
                )
                cells.append(f"{d.mean:+.3f} ± {d.se:.3f} ({d.wins}/{d.n})")
            compute = np.mean([table[arm][s]["total_compute"] for s in common])
            kept = np.mean(
                [e["num_kept"] for s in common for e in table[arm][s]["epochs"] if e["epoch"] >= 1] or [np.nan]
            )
            cells += [f"{compute:.2f}", f"{kept:.0f}", kept_composition(table[arm][common[0]]) if common else ""]
            rows.append(cells)
        lines.append(
            markdown_table(
                [
                    "arm",
                    "seeds",
                    "exact-match",
                    "Δ vs full",
                    "Δ vs default",
                    "compute × plain",
                    "kept / epoch",
                    "kept kinds (seed 0)",
                ],
                rows,
            )
        )
        lines.append("")
    lines += acceptance_lines(runs)
    if pooled is not None:
        lines += pooled_lines(runs, *pooled)
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "regimes.md").write_text(text + "\n")
    return text


def acceptance_lines(runs: list[dict[str, Any]]) -> list[str]:
    """`auto` against each regime's best fixed rule and against the default (issue 22's acceptance), paired by seed."""
    rows = []
    for regime in REGIMES:
        table: dict[str, dict[int, float]] = {}
        for run in runs:
            if run["regime"] == regime:
                table.setdefault(run["arm"], {})[run["seed"]] = run["exact_match"]
        if "auto" not in table or "default" not in table:
            continue
        fixed = [arm for arm in FIXED_ARMS if arm in table]
        seeds = sorted(set.intersection(*(set(table[arm]) for arm in (*fixed, "auto"))))
        if len(seeds) < 2:
            continue
        best = max(fixed, key=lambda arm: np.mean([table[arm][s] for s in seeds]))
        to_best = paired_delta([table["auto"][s] for s in seeds], [table[best][s] for s in seeds])
        to_default = paired_delta([table["auto"][s] for s in seeds], [table["default"][s] for s in seeds])
        t = to_default.mean / to_default.se if to_default.se > 0 else float("nan")
        rows.append(
            [
                f"({regime})",
                len(seeds),
                best,
                f"{to_best.mean:+.3f} ± {to_best.se:.3f}",
                "yes" if to_best.mean >= -to_best.se else "no",
                f"{to_default.mean:+.3f} ± {to_default.se:.3f}",
                "yes" if to_default.mean >= -to_default.se else "no",
                f"{t:+.1f}",
            ]
        )
    if not rows:
        return []
    return [
        "## `lossdiff_irm_auto` against the fixed rules",
        "",
        "Best fixed = the fixed rule (full, default, low_cut, irm_band) with the highest mean exact-match on that regime, "
        "chosen after the fact (which favours it). Paired over the seeds every arm ran.",
        "",
        markdown_table(
            [
                "regime",
                "seeds",
                "best fixed",
                "auto − best fixed",
                "within 1 SE",
                "auto − default",
                "no worse than 1 SE",
                "t vs default",
            ],
            rows,
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "benchmark-regimes")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--pooled_with", type=Path, help="another study's out_dir: add a section pooled over both")
    parser.add_argument("--keep_scores", action="store_true", help="copy each run's score files to work_dir/scores")
    options = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python -m benchmarks.regimes"
    if options.out_dir != RESULTS:  # a second study (e.g. held-out seeds): name what differs
        command += f" --seeds {' '.join(map(str, options.seeds))} --arms {' '.join(options.arms)} --out_dir "
        command += str(
            options.out_dir.resolve().relative_to(REPO)
            if options.out_dir.resolve().is_relative_to(REPO)
            else options.out_dir
        )
    runs_path = options.out_dir / "runs.jsonl"
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if not options.report_only:
        tokenizer = prepare_protocol_runs()
        register_rule("benchmark_auto_harm_only", scores=("lossdiff", "irm"), overwrite=True)(auto_harm_only_rule)
        for seed in options.seeds:
            base = build_task(seed)
            for regime in options.regimes:
                done = {r["arm"] for r in load_runs(runs_path) if r["seed"] == seed and r["regime"] == regime}
                todo = [arm for arm in options.arms if arm not in done]
                if not todo:
                    continue
                task = {**base, "train": regime_pool(base["train"], regime, seed)}
                sft_state, sft_exact = cached_sft(seed, base, tokenizer, options.work_dir)
                kind_by_id = {row["id"]: row["kind"] for row in task["train"]}
                register_rule("benchmark_oracle", scores=(), overwrite=True)(
                    oracle_rule({i: k in ("informative", "easy") for i, k in kind_by_id.items()})
                )
                for arm in todo:
                    start = time.perf_counter()
                    scores_copy = options.work_dir / "scores" / regime / f"seed{seed}" / arm
                    recorder = KindRecorder(kind_by_id, scores_copy if options.keep_scores else None)
                    result = run_arm(
                        "full" if arm == "full" else "lossdiff_irm",  # quality.py's base settings; ours on top
                        seed,
                        task,
                        sft_state,
                        tokenizer,
                        options.work_dir / regime / arm,  # one folder per arm: workers may share a seed
                        overrides=ARM_SETTINGS[arm],
                        before_cleanup=recorder,
                    )
                    result.update(regime=regime, protocol=PROTOCOL_ID, sft_exact_match=sft_exact)
                    result["arm"] = arm
                    result["total_compute"] = quality.total_compute(result)
                    result["epochs"] = recorder.epochs
                    append_run(runs_path, result)
                    logger.info(
                        "regime %s seed %d %-9s exact-match %s compute x%.2f kept %s (%.0fs)",
                        regime,
                        seed,
                        arm,
                        " ".join(f"{p['exact_match']:.3f}" for p in result["evals"]),
                        result["total_compute"],
                        [e["num_kept"] for e in result["epochs"]],
                        time.perf_counter() - start,
                    )
    pooled = None
    if options.pooled_with is not None:
        pooled = (load_runs(options.pooled_with / "runs.jsonl"), f"`{options.pooled_with}`")
        command += f" --pooled_with {options.pooled_with}"
    print(write_report(load_runs(runs_path), options.out_dir, command, pooled))


class KindRecorder:
    """A `run_arm` hook: after each run, `epochs` holds every event's kept count, the share of each pair kind among
    the kept pairs, and the rule's chosen percentiles and their evidence; with `keep_scores`, the run's score files
    are copied there."""

    def __init__(self, kind_by_id: dict[Any, str], keep_scores: Path | None = None) -> None:
        self.kind_by_id = kind_by_id
        self.keep_scores = keep_scores
        self.epochs: list[dict[str, Any]] = []

    def __call__(self, output_dir: Path) -> None:
        import shutil

        from trl_select import read_history

        if self.keep_scores:
            shutil.rmtree(self.keep_scores, ignore_errors=True)
            shutil.copytree(output_dir / "selection", self.keep_scores)
        self.epochs = []
        for record in read_history(output_dir):
            kept = record["selected_ids"]
            counts: dict[str, int] = {}
            for pair_id in kept:
                counts[self.kind_by_id[pair_id]] = counts.get(self.kind_by_id[pair_id], 0) + 1
            entry = {
                "epoch": record["epoch"],
                "event": record["event"],
                "num_kept": len(kept),
                "kind_shares": {k: v / max(len(kept), 1) for k, v in counts.items()},
            }
            for key in ("percentiles", "band_evidence"):  # the bands `lossdiff_irm_auto` chose, and why
                if key in record:
                    entry[key] = record[key]
            self.epochs.append(entry)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
