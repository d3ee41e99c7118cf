"""Does in-epoch selection help a one-epoch run? Paired over seeds, at equal epochs and at equal compute.

    OMP_NUM_THREADS=1 python -m benchmarks.one_epoch                 # 10 seeds
    OMP_NUM_THREADS=1 python -m benchmarks.one_epoch --seeds 0 1     # a few (runs are cached per seed and arm)
    python -m benchmarks.one_epoch --report_only                     # rewrite the table from the cached runs

The task, data, SFT warm start and DPO settings are protocol 2 of `benchmarks/quality.py` (reverse digits, 2,000-pair
pool with 30% flipped labels, 100 clean validation pairs, beta 0.5, constant LR 1e-4, batch 32), trained for **one
epoch** (63 optimizer steps over the pool), the length of most real DPO recipes. Arms, all from the same SFT model:

- `plain`: one epoch over every pair (a keep-everything rule, so the ledger holds training compute only);
- `in_epoch`: the default config with `num_train_epochs=1`, which resolves to `selection_strategy="steps"`: the first
  20% of the steps on the pool as it comes, then an event every 20% of the steps, each scoring the next chunk of the
  epoch's untrained pairs (LossDiff-IRM, bands 10-90) and training what it keeps; the epoch ends when its pairs run
  out;
- `cm_full`: every pair, trained for as many steps as make its training compute equal `in_epoch`'s total (training +
  selection) at the same seed (into a second epoch when that is longer than one).

Reported: greedy exact-match on the 500 test prompts at the end, the paired differences with their SE, the compute of
each arm in units of `plain`'s, and the flipped share of the pairs trained after the first event (30% in the pool).
Runs are cached in `results/quality/one_epoch_runs.jsonl`, tagged with `PROTOCOL_ID`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from benchmarks.common import machine_description, markdown_table, paired_delta
from benchmarks.quality import (
    RESULTS,
    build_task,
    counted_compute,
    mean_se,
    prepare_protocol_runs,
    run_arm,
    sft_model,
)


logger = logging.getLogger("benchmarks.one_epoch")

PROTOCOL_ID = "one_epoch-1"
ARMS = ("plain", "in_epoch", "cm_full")
RUNS = RESULTS / "one_epoch_runs.jsonl"
REPORT = RESULTS / "one_epoch.md"
QUALITY_ARM = {"plain": "full", "in_epoch": "lossdiff_irm", "cm_full": "cm_full"}


def flipped_share_after_first_event(epochs: list[dict[str, Any]]) -> float:
    """The flipped share of the pairs the segments of the selection events trained (not the warm-up's)."""
    events = [record for record in epochs if record.get("event") == "selection"]
    kept = sum(record["num_kept"] for record in events)
    return sum(record["flipped_in_kept"] * record["num_kept"] for record in events) / kept if kept else float("nan")


def scored_chunk_and_rest(epochs: list[dict[str, Any]], pool_size: int) -> tuple[int, int]:
    """Pairs the run's events scored (chunks), and the pairs they would have scored rescoring the whole untrained rest
    of the pass at every event instead (the same events, the same consumption)."""
    consumed, chunk, rest = 0, 0, 0
    for record in epochs:
        if record.get("event") == "selection":
            chunk += record["num_scored"]
            rest += pool_size - consumed
            consumed += record["num_scored"] - record["num_surplus"]
        else:
            consumed += record["num_kept"]
    return chunk, rest


def total_fte(run: dict[str, Any], arm: str) -> float:
    return counted_compute(QUALITY_ARM[arm], run["evals"][-1])


def write_report(runs: list[dict[str, Any]], command: str) -> str:
    by_arm: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for run in runs:
        by_arm[run["arm"]][run["seed"]] = run
    seeds = sorted(set.intersection(*(set(by_arm[arm]) for arm in ARMS))) if all(by_arm.values()) else []
    lines = [
        "# One-epoch protocol: in-epoch selection vs plain DPO",
        "",
        f"Command: `{command}`. Machine: {machine_description(threads=1)}.",
        "",
    ]
    if not seeds:
        return "\n".join([*lines, "No seed has every arm yet."])
    rows = []
    plain_compute = [total_fte(by_arm["plain"][s], "plain") for s in seeds]
    for arm in ARMS:
        exact = [by_arm[arm][s]["exact_match"] for s in seeds]
        mean, se = mean_se(exact)
        compute = [total_fte(by_arm[arm][s], arm) / p for s, p in zip(seeds, plain_compute, strict=True)]
        steps = [by_arm[arm][s]["steps"] for s in seeds]
        flipped = (
            f"{sum(flipped_share_after_first_event(by_arm[arm][s]['epochs']) for s in seeds) / len(seeds):.3f}"
            if arm == "in_epoch"
            else "0.300"
        )
        rows.append(
            [
                arm,
                f"{mean:.3f} ± {se:.3f}",
                f"{sum(compute) / len(compute):.2f}×",
                f"{sum(steps) / len(steps):.0f}",
                flipped,
            ]
        )
    table = markdown_table(
        [
            "arm",
            "exact-match (mean ± SE)",
            "compute × plain",
            "optimizer steps",
            "flipped share trained after event 1",
        ],
        rows,
    )
    deltas = []
    for baseline, what in (("plain", "equal epochs"), ("cm_full", "equal compute")):
        delta = paired_delta(
            [by_arm["in_epoch"][s]["exact_match"] for s in seeds], [by_arm[baseline][s]["exact_match"] for s in seeds]
        )
        verdict = "beats" if delta.mean > 2 * delta.se else ("loses to" if delta.mean < -2 * delta.se else "ties")
        deltas.append(
            [
                f"in_epoch − {baseline}",
                what,
                f"{delta.mean:+.3f} ± {delta.se:.3f}",
                f"{delta.wins}/{delta.n}",
                f"in-epoch selection {verdict} {baseline} "
                + ("(more than 2 SE from 0)" if abs(delta.mean) > 2 * delta.se else "(within 2 SE of 0)"),
            ]
        )
    sft = [by_arm["plain"][s].get("sft_exact_match", float("nan")) for s in seeds]
    counts = [
        scored_chunk_and_rest(by_arm["in_epoch"][s]["epochs"], by_arm["in_epoch"][s]["pool_size"])
        for s in seeds
        if all(r.get("num_scored") is not None for r in by_arm["in_epoch"][s]["epochs"] if r["event"] == "selection")
    ]
    if counts:
        chunk = sum(c for c, _ in counts) / len(counts)
        rest = sum(r for _, r in counts) / len(counts)
        pool = by_arm["in_epoch"][seeds[0]]["pool_size"]
        choice = (
            f"Scoring chunks (the design) scored {chunk:.0f} pairs per run ({chunk / pool:.2f} passes over the "
            f"{pool}-pair pool); rescoring the whole untrained rest of the pass at the same events would have scored "
            f"{rest:.0f} ({rest / pool:.2f} passes), {rest / chunk:.1f}× as many policy, aux and reference forwards."
        )
    else:
        choice = ""
    lines += [
        f"{len(seeds)} paired seeds; SFT exact-match {sum(sft) / len(sft):.3f} before DPO.",
        "",
        table,
        markdown_table(["difference", "at", "Δ exact-match ± paired SE", "wins", "verdict"], deltas),
        choice,
    ]
    text = "\n".join(lines)
    REPORT.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--work_dir", type=Path, default=Path("outputs") / "benchmark-one-epoch")
    parser.add_argument("--report_only", action="store_true")
    options = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python -m benchmarks.one_epoch"
    runs = [json.loads(line) for line in RUNS.read_text().splitlines()] if RUNS.exists() else []
    runs = [run for run in runs if run.get("protocol_id") == PROTOCOL_ID]
    if not options.report_only:
        tokenizer = prepare_protocol_runs()
        for seed in options.seeds:
            done = {run["arm"]: run for run in runs if run["seed"] == seed}
            if all(arm in done for arm in ARMS):
                continue
            task = build_task(seed)
            sft_state, sft_exact, _ = sft_model(seed, task, tokenizer)
            for arm in ARMS:
                if arm in done:
                    continue
                overrides: dict[str, Any] = {"num_train_epochs": 1}
                stop_step = None
                if arm == "cm_full":
                    plain, selective = done["plain"], done["in_epoch"]
                    per_step = plain["evals"][-1]["train_fte"] / plain["steps"]
                    stop_step = max(1, round(total_fte(selective, "in_epoch") / per_step))
                    overrides["num_train_epochs"] = math.ceil(stop_step / plain["steps"])
                result = run_arm(
                    QUALITY_ARM[arm], seed, task, sft_state, tokenizer, options.work_dir, overrides, stop_step
                )
                result.update(arm=arm, protocol_id=PROTOCOL_ID, sft_exact_match=sft_exact)
                done[arm] = result
                runs.append(result)
                with RUNS.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                logger.info(
                    "seed %d %-8s exact-match %.3f steps %d compute %.0f",
                    seed,
                    arm,
                    result["exact_match"],
                    result["steps"],
                    total_fte(result, arm),
                )
    print(write_report(runs, command))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
