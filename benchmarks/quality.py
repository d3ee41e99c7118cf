"""Does selection train a better model than the full pool, at equal compute too? Paired over seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.quality                  # 10 seeds, the default arms
    OMP_NUM_THREADS=1 python -m benchmarks.quality --seeds 0 2 4 6 8 # one of two workers (runs are cached per seed)
    python -m benchmarks.quality --quick                             # 2 seeds, to check the pipeline
    python -m benchmarks.quality --seeds 0 1 2 --arms full lossdiff_irm
    python -m benchmarks.quality --report_only                       # rewrite the tables from the cached runs

Protocol 2 (protocol 1 is kept in `results/quality/quality_v1.md`):

- Task: the prompt is 3-6 digits and "="; the correct response is the digits reversed. A tiny random Llama
  (`trl_select.testing.build_tiny_llama`: hidden 64, 2 layers, 95k parameters with the 100-token character vocabulary).
- Per seed s a fresh task is drawn with `recipes/data/make_reverse_digits.py`'s `build_splits(1000 * s)` (seed 0 is the
  shipped data): SFT 1000 rows, half reversal and half copy rule; pool 2000 pairs, exactly 30% label-flipped, rejected
  = 50% near miss / 50% copy rule; clean validation: the first 100 of the 256 clean validation pairs (5% of the pool,
  a realistic ratio; protocol 1 used all 256); clean test 500, all prompts disjoint.
- SFT warm start (20 epochs, lr 1e-3, as the demo recipe), then DPO from the SFT model with the SFT model as the
  reference: beta 0.5, constant lr 1e-4, batch 32, 3 epochs, bands 10-90, warm-up 1 epoch, aux refresh every epoch.
- Greedy exact-match on the 500 test prompts after every epoch, with the run's cumulative compute at that point from
  the trainer's ledger (`trl_select/compute.py`, forward-token equivalents: training + selection).
- Arms (all share epoch 0 on the full pool: same seed, same `SelectionSampler` order, deterministic on CPU):
  full (every pair, through the same sampler with a keep-everything rule that reads no score, so its ledger holds
  training compute only, as a plain run's would); the LossDiff-IRM modes lossdiff_irm (default config),
  lossdiff_irm_exact (`scoring_reuse="none"`), lossdiff_irm_stale (`"reference_and_policy"`), lossdiff_irm_aux2
  (`aux_refresh_epochs=2`), lossdiff_irm_cheapest (both); the compute-matched controls cm_full (the full pool for
  a fixed number of steps (a callback stops the run there), as many as make its training compute equal LossDiff-IRM's total, training + selection, at the
  same seed) and cm_random (at each selection epoch a uniform subset sized so that the epoch's training compute equals
  LossDiff-IRM's training compute of that epoch plus its selection compute at that event, capped at the pool); random
  (a uniform subset of the size LossDiff-IRM kept at that seed and epoch) and oracle (drops exactly the flipped pairs;
  the gate). Random, cm_random and oracle read no score either, so they pay no selection compute. Older arms
  (irm_band, lossdiff_band, one_sided, tif) stay selectable with `--arms`.
- Gate: unless oracle - full >= 0.10 exact-match, the configuration is too insensitive and the table says so.

Each (seed, arm) run is appended to `results/quality/runs.jsonl` with its protocol id as it finishes and skipped on a
rerun, so a long run can be resumed, split over worker processes (disjoint `--seeds`), and arms added later; runs of
another protocol in the file are ignored.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PairedDelta, machine_description, markdown_table, paired_delta
from trl_select import SelectionContext, register_rule
from trl_select.registry import RuleFn


logger = logging.getLogger("benchmarks.quality")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality"
PROTOCOL_ID = 2  # bump whenever PROTOCOL, the data or the evaluation change: cached runs of another id are ignored
MODE_ARMS = ("lossdiff_irm", "lossdiff_irm_exact", "lossdiff_irm_stale", "lossdiff_irm_aux2", "lossdiff_irm_cheapest")
DEFAULT_ARMS = ("full", *MODE_ARMS, "cm_full", "cm_random", "random", "oracle")
ALL_ARMS = (*DEFAULT_ARMS, "irm_band", "lossdiff_band", "one_sided", "tif")
TRAINING_ONLY_ARMS = ("full", "cm_full")  # counted without any selection compute (see `counted_compute`)
GATE = 0.10
SFT_EPOCHS, SFT_LR = 20, 1e-3
VALIDATION_PAIRS = 100  # 5% of the 2000-pair pool

# The DPO settings of the protocol; `PROTOCOL_ID` above changes whenever they do, so stale cached runs are not mixed in.
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


def keep_all_rule() -> RuleFn:
    """Keep every pair (the full arms: the same sampler as the selective arms, no score read, no selection compute)."""

    def rule(scores: dict[str, np.ndarray], context: SelectionContext) -> np.ndarray:
        return np.ones(context.pool_size, dtype=bool)

    return rule


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


# ----- compute matching and the report's arithmetic (pure; tested in tests/test_benchmark_helpers.py) -----


def counted_compute(arm: str, point: dict[str, float]) -> float:
    """Cumulative FTE of an evaluation point: training + selection, training only for the full-pool arms.

    The full arms run through the selection sampler only to share its order with the other arms; a plain run would
    pay no selection pass, so none is counted for them.
    """
    return point["train_fte"] + (0.0 if arm in TRAINING_ONLY_ARMS else point["selection_fte"])


def matched_steps(budget_fte: float, fte_per_step: float) -> int:
    """Optimizer steps of the full pool whose training compute is closest to `budget_fte` (at least 1)."""
    if budget_fte <= 0 or fte_per_step <= 0:
        raise ValueError(f"matched_steps needs a positive budget and step cost, got {budget_fte} and {fte_per_step}")
    return max(1, round(budget_fte / fte_per_step))


def matched_epoch_sizes(reference_evals: Sequence[dict[str, float]], fte_per_pair: float, pool_size: int) -> dict:
    """cm_random's subset size at each selection epoch k >= 1 from the reference (LossDiff-IRM) run's evaluation points.

    `reference_evals[k - 1]` holds the cumulative `train_fte` / `selection_fte` at the end of epoch k - 1 (epochs
    numbered from 0). The budget of epoch k is that run's training compute of epoch k plus the selection compute of
    its event at the start of epoch k; the size is the budget over the mean FTE of one trained pair, capped at the pool.
    """
    sizes = {}
    for k in range(1, len(reference_evals)):
        before, after = reference_evals[k - 1], reference_evals[k]
        budget = (after["train_fte"] - before["train_fte"]) + (after["selection_fte"] - before["selection_fte"])
        sizes[k] = int(min(pool_size, max(1, round(budget / fte_per_pair))))
    return sizes


def compute_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute at which a quality curve first reaches `target`, by linear interpolation; None if it never does.

    `points` are (cumulative compute, quality) in training order (the first one may be the start, compute 0).
    """
    previous = None
    for compute, quality in points:
        if quality >= target:
            if previous is None or previous[1] >= target:
                return compute
            (c0, q0) = previous
            return c0 + (target - q0) / (quality - q0) * (compute - c0)
        previous = (compute, quality)
    return None


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample sd / sqrt(n); NaN for n < 2)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def within_one_se(delta: PairedDelta) -> bool:
    """Whether a paired difference is within one standard error of zero."""
    return abs(delta.mean) <= delta.se


def equal_compute_verdict(delta: PairedDelta, arm: str, baseline: str) -> str:
    """A plain-words reading of `arm - baseline` at equal compute: beats only if the mean is more than 2 SE above 0."""
    text = f"{arm} − {baseline} = {delta.mean:+.3f} ± {delta.se:.3f} exact-match, {delta.wins}/{delta.n} seeds won"
    if delta.mean > 2 * delta.se:
        return f"{text}: {arm} **beats** full data at equal compute."
    if delta.mean < -2 * delta.se:
        return f"{text}: {arm} **is worse than** full data at equal compute."
    return f"{text}: {arm} **does not beat** full data at equal compute (within 2 SE of zero)."


# ----- one run -----


def prepare_protocol_runs():
    """Quiet progress bars, register the full arms' keep-everything rule, and return the protocol's tokenizer (the
    set-up of every protocol script: this one, `one_epoch.py`, `cleaning.py`)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets

    from trl_select.testing import build_char_tokenizer

    datasets.disable_progress_bars()
    register_rule("benchmark_keep_all", scores=(), overwrite=True)(keep_all_rule())
    return build_char_tokenizer()


def build_task(seed: int) -> dict[str, list[dict]]:
    """The task of `seed` (`trl_select.testing.build_splits`, as `recipes/data/make_reverse_digits.py` writes it),
    with the first `VALIDATION_PAIRS` clean validation pairs."""
    from trl_select.testing import build_splits

    task = build_splits(seed_offset=1000 * seed)
    task["validation"] = task["validation"][:VALIDATION_PAIRS]
    return task


def sft_model(seed: int, task: dict[str, list[dict]], tokenizer) -> tuple[dict, float, float]:
    """Warm-start the tiny Llama of `seed` on the task's SFT mix; return its state dict, exact-match and seconds."""
    from trl_select.testing import build_tiny_llama, greedy_exact_match, sft_warm_start

    start = time.perf_counter()
    model = build_tiny_llama(tokenizer, seed=seed)
    sft_warm_start(model, tokenizer, task["sft"], epochs=SFT_EPOCHS, lr=SFT_LR, seed=seed)
    seconds = time.perf_counter() - start
    exact = greedy_exact_match(model, tokenizer, [row["prompt"] for row in task["test"]])
    return copy.deepcopy(model.state_dict()), exact, seconds


def protocol_args(output_dir: Path | str, seed: int, **settings: Any):
    """The `SelectiveDPOConfig` of a protocol run (CPU, fp32, nothing saved or printed) with `settings` on top."""
    from trl_select import SelectiveDPOConfig

    return SelectiveDPOConfig(
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
        **settings,
    )


def arm_config(arm: str) -> dict[str, Any]:
    """The `SelectiveDPOConfig` selection fields of an arm."""
    if arm in ("full", "cm_full"):
        return {"selection_rule": "benchmark_keep_all"}  # cm_full's epochs and stop step are added by `main`
    modes = {
        "lossdiff_irm": {},
        "lossdiff_irm_exact": {"scoring_reuse": "none"},
        "lossdiff_irm_stale": {"scoring_reuse": "reference_and_policy"},
        "lossdiff_irm_aux2": {"aux_refresh_epochs": 2},
        "lossdiff_irm_cheapest": {"scoring_reuse": "reference_and_policy", "aux_refresh_epochs": 2},
    }
    if arm in modes:
        return {"selection_rule": "lossdiff_irm", **modes[arm]}
    if arm in ("irm_band", "lossdiff_band"):
        return {"selection_rule": arm}
    if arm == "one_sided":
        return {"selection_rule": "lossdiff_irm", "lossdiff_hi_percentile": 100.0, "irm_hi_percentile": 100.0}
    if arm in ("oracle", "random", "cm_random"):
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
    overrides: dict[str, Any] | None = None,
    stop_step: int | None = None,
    before_cleanup: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train one arm from the SFT model with `SelectiveDPOTrainer`; return its metrics, per-epoch evaluation points
    (exact-match and cumulative compute) and per-epoch kept sets.

    The run's `output_dir` is deleted at the end; `before_cleanup`, if given, is called with it just before (after
    training and the evaluation), e.g. to read its selection record with `trl_select.find_suspects`."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from trl_select import SelectiveDPOTrainer, read_history
    from trl_select.compute import FORWARD, TRAIN_STEP
    from trl_select.testing import build_tiny_llama, greedy_exact_match

    settings = {**PROTOCOL, **arm_config(arm), **(overrides or {})}
    model = build_tiny_llama(tokenizer, seed=seed)
    model.load_state_dict(sft_state)
    reference = copy.deepcopy(model)
    output_dir = work_dir / f"seed{seed}" / arm
    shutil.rmtree(output_dir, ignore_errors=True)
    args = protocol_args(output_dir, seed, **settings)
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
    prompts = [row["prompt"] for row in task["test"]]

    class EpochEval(TrainerCallback):
        """Greedy exact-match after every epoch, with the ledger's cumulative compute (added after the selection
        callback, so the epoch's training compute is already counted)."""

        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []
            self.seconds = 0.0

        def on_epoch_end(self, args, state, control, **kwargs):
            start = time.perf_counter()
            ledger = trainer.selection_engine.compute
            with torch.no_grad():
                exact = greedy_exact_match(trainer.accelerator.unwrap_model(trainer.model), tokenizer, prompts)
            self.points.append(
                {
                    "epoch": float(state.epoch),
                    "step": int(state.global_step),
                    "train_fte": ledger.training_total,
                    "selection_fte": ledger.selection_total,
                    "exact_match": exact,
                }
            )
            self.seconds += time.perf_counter() - start

    class StopAt(TrainerCallback):
        """Stop after `stop_step` optimizer steps (the trainer's `max_steps` is refused when a rule selects)."""

        def on_step_end(self, args, state, control, **kwargs):
            if stop_step is not None and state.global_step >= stop_step:
                control.should_training_stop = True

    evaluation = EpochEval()
    trainer.add_callback(evaluation)  # after the selection callback: the epoch's training compute is counted first
    trainer.add_callback(StopAt())

    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start - evaluation.seconds

    log = trainer.state.log_history
    selection_seconds = sum(e.get("selection/seconds", 0.0) for e in log)
    metrics = trainer.evaluate()
    ledger = trainer.selection_engine.compute
    pool_tokens = int(trainer.selection_engine.token_counts("pool").sum())
    flipped = {row["id"]: row["flipped"] for row in task["train"]}
    epochs_record = []
    for record in read_history(output_dir):
        kept = set(record["selected_ids"])
        dropped = set(flipped) - kept
        epochs_record.append(
            {
                "epoch": record["epoch"],
                "event": record["event"],
                "global_step": record["global_step"],
                "num_scored": record.get("num_scored"),  # in-epoch events score a chunk of the pass
                "num_surplus": len(record.get("surplus_ids", [])),
                "num_kept": len(kept),
                "flipped_in_kept": sum(flipped[i] for i in kept) / max(len(kept), 1),
                "flipped_in_dropped": sum(flipped[i] for i in dropped) / len(dropped) if dropped else None,
            }
        )
    if before_cleanup is not None:
        before_cleanup(output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "protocol": PROTOCOL_ID,
        "arm": arm,
        "seed": seed,
        "scoring_reuse": args.scoring_reuse,
        "aux_refresh_epochs": args.aux_refresh_epochs,
        "stop_step": stop_step,
        "steps": trainer.state.global_step,
        "exact_match": evaluation.points[-1]["exact_match"],  # the model after the last step
        # TRL logs the metrics of a named eval set without the set's name in the key
        "preference_accuracy": metrics.get("eval_test_rewards/accuracies", metrics.get("eval_rewards/accuracies")),
        "wall_seconds": wall,
        "eval_seconds": evaluation.seconds,
        "selection_seconds": selection_seconds,
        "selection_seconds_by_part": {
            part: sum(e.get(f"selection/seconds_{part}", 0.0) for e in log) for part in ("reference", "policy", "aux")
        },
        "compute": dict(ledger.fte),
        "pool_size": len(train),
        # One plain full-pool epoch: every pool token through a training step and the live reference forward
        "epoch_fte": pool_tokens * (TRAIN_STEP + FORWARD),
        "evals": evaluation.points,
        "epochs": epochs_record,
    }


# ----- the report -----


def load_runs(path: Path, protocol: int = PROTOCOL_ID) -> list[dict[str, Any]]:
    """The cached runs of `protocol` (default: this one; the SFT records of a seed carry the protocol id too)."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [run for run in runs if run.get("protocol") == protocol]


def by_arm(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run["seed"] in seeds:
            table.setdefault(run["arm"], {})[run["seed"]] = run
    return table


def curve(run: dict[str, Any], sft_exact: float | None) -> list[tuple[float, float]]:
    """(cumulative compute in plain full-pool epochs, exact-match) after each epoch, from the SFT start if known."""
    points = [(0.0, sft_exact)] if sft_exact is not None else []
    return points + [(counted_compute(run["arm"], p) / run["epoch_fte"], p["exact_match"]) for p in run["evals"]]


def total_compute(run: dict[str, Any]) -> float:
    """The run's counted compute over a plain 3-epoch full-pool run's training compute."""
    return counted_compute(run["arm"], run["evals"][-1]) / (PROTOCOL["num_train_epochs"] * run["epoch_fte"])


def write_report(runs: list[dict[str, Any]], out_dir: Path, command: str) -> str:
    seeds = sorted({run["seed"] for run in runs if run["arm"] == "full"})
    arms = by_arm(runs, seeds)
    ordered = [arm for arm in ALL_ARMS if arm in arms]
    sft = {s: run["exact_match"] for s, run in arms.get("sft", {}).items()}

    def paired(arm: str, baseline: str, key: str = "exact_match") -> PairedDelta | None:
        common = [s for s in seeds if s in arms.get(arm, {}) and s in arms.get(baseline, {})]
        if not common:
            return None
        return paired_delta([arms[arm][s][key] for s in common], [arms[baseline][s][key] for s in common])

    def fmt(delta: PairedDelta | None) -> str:
        return "" if delta is None else f"{delta.mean:+.3f} ± {delta.se:.3f}"

    def won(delta: PairedDelta | None) -> str:
        return "" if delta is None else f"{delta.wins}/{delta.n}"

    rows = []
    for arm in ordered:
        runs_arm = [arms[arm][s] for s in seeds if s in arms[arm]]
        em = np.array([r["exact_match"] for r in runs_arm])
        pa = np.array([r["preference_accuracy"] for r in runs_arm])
        d_full = paired(arm, "full") if arm != "full" else None
        d_pa = paired(arm, "full", "preference_accuracy") if arm != "full" else None
        kept = [
            np.mean([e["num_kept"] for r in runs_arm for e in r["epochs"] if e["epoch"] == k] or [np.nan])
            for k in (1, 2)
        ]
        compute, compute_se = mean_se([total_compute(r) for r in runs_arm])
        rows.append(
            [
                arm,
                len(runs_arm),
                f"{em.mean():.3f} ± {em.std(ddof=1) if len(em) > 1 else 0:.3f}",
                fmt(d_full),
                won(d_full),
                f"{pa.mean():.3f}",
                fmt(d_pa),
                " / ".join(f"{k:.0f}" if np.isfinite(k) else "-" for k in kept),
                f"{compute:.2f}",
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
        "pref. acc.",
        "Δ pref. acc. vs full (± SE)",
        "kept pairs ep1 / ep2",
        "compute × plain run",
        "wall s",
        "of which selection s",
    ]

    # At equal compute
    equal_compute = []
    verdict_cm = ""
    d_cm = paired("lossdiff_irm", "cm_full")
    if d_cm is not None:
        verdict_cm = equal_compute_verdict(d_cm, "LossDiff-IRM", "cm_full")
    for arm, baseline in (
        ("lossdiff_irm", "cm_full"),
        ("lossdiff_irm", "cm_random"),
        ("lossdiff_irm", "random"),
        ("cm_full", "full"),
        ("cm_random", "full"),
    ):
        d = paired(arm, baseline)
        if d is not None:
            equal_compute.append([f"{arm} − {baseline}", fmt(d), won(d)])

    # The scoring modes against the exact way
    mode_rows = []
    cheapest_within: tuple[float, str] | None = None
    for arm in MODE_ARMS:
        if arm not in arms:
            continue
        runs_arm = [arms[arm][s] for s in seeds if s in arms[arm]]
        compute = np.mean([total_compute(r) for r in runs_arm])
        selection = np.mean([r["evals"][-1]["selection_fte"] / r["evals"][-1]["train_fte"] for r in runs_arm])
        d = paired(arm, "lossdiff_irm_exact") if arm != "lossdiff_irm_exact" else None
        close = arm == "lossdiff_irm_exact" or (d is not None and d.n > 1 and within_one_se(d))
        if close and (cheapest_within is None or compute < cheapest_within[0]):
            cheapest_within = (compute, arm)
        reuse = str(runs_arm[0].get("scoring_reuse")).split(" ")[0]
        mode_rows.append(
            [
                arm,
                f"{reuse}, aux every {runs_arm[0]['aux_refresh_epochs']}",
                f"{selection:.2f}",
                f"{compute:.2f}",
                fmt(d) if d else "(exact)",
                won(d),
                "yes" if close and d else ("" if not d else "no"),
            ]
        )

    # Time to quality: compute at which each arm first reaches the full arm's final exact-match, per seed
    ttq_rows = []
    for arm in ordered:
        reached, missed = [], 0
        for s in seeds:
            if s not in arms[arm] or s not in arms["full"]:
                continue
            at = compute_to_reach(curve(arms[arm][s], sft.get(s)), arms["full"][s]["exact_match"])
            if at is None:
                missed += 1
            else:
                reached.append(at)
        n = len(reached) + missed
        mean, se = mean_se(reached)
        ttq_rows.append(
            [
                arm,
                f"{len(reached)}/{n}",
                f"{mean:.2f} ± {se:.2f}" if reached else "not reached",
                f"{mean / PROTOCOL['num_train_epochs']:.2f}" if reached else "",
            ]
        )

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

    gate = paired("oracle", "full")
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
    sft_em = [sft[s] for s in seeds if s in sft]
    before_field = sorted({r["arm"] for r in runs if "before the field" in str(r.get("scoring_reuse"))})
    before_field_note = (
        f"{', '.join(before_field)} ran on a checkout before `scoring_reuse` existed (the trainer then always scored "
        'the exact way); rerun after it with `scoring_reuse="none"` (seed 0), it reproduced bit for bit (exact-match '
        "after every epoch and every ledger category)."
        if before_field
        else ""
    )
    cheapest_line = (
        f"Cheapest mode within 1 SE of the exact way: **{cheapest_within[1]}**, total compute "
        f"{cheapest_within[0]:.2f} × a plain full run."
        if cheapest_within
        else ""
    )
    text = [
        "# Quality: selection vs the full pool, at equal compute too (reverse digits, paired over seeds)",
        "",
        f"Command: `{command}` (two worker processes on disjoint seeds, then `--report_only`)  ",
        f"Machine: {machine_description(threads=int(os.environ.get('OMP_NUM_THREADS', '0')) or None)}  ",
        f"Protocol {PROTOCOL_ID} (validation {VALIDATION_PAIRS} clean pairs = 5% of the 2000-pair pool; protocol 1's "
        "table, with 256 validation pairs, is `quality_v1.md`). "
        f"Seeds: {seeds}. SFT greedy exact-match before DPO: "
        + (f"{np.mean(sft_em):.3f} (range {min(sft_em):.3f}-{max(sft_em):.3f})." if sft_em else "n/a."),
        "",
        verdict,
        "",
        "Δ = paired per-seed difference (mean ± standard error over seeds); seeds won = seeds with Δ > 0. "
        "Exact-match: greedy, 500 unseen test prompts, after the last step. Preference accuracy: clean test pairs. "
        "Compute: the trainer's ledger (`trl_select/compute.py`, forward-token equivalents), training + selection, "
        "over a plain 3-epoch full-pool run's training compute. The full arms (full, cm_full) count training only: "
        "they run through the selection sampler with a keep-everything rule only to share its order with the other "
        "arms, and a plain run would pay no selection pass. random, cm_random and oracle read no score, so their "
        "selection is free. Wall time: `trainer.train()` without the per-epoch evaluations (selection events "
        "included); the arms ran in different phases under different load from other jobs on the 2 shared cores "
        "(full, oracle and lossdiff_irm_exact under load 5-6, the others under 2-4), so compare compute, not "
        "wall time, across arms.",
        "",
        markdown_table(header, rows),
        "## At equal compute",
        "",
        verdict_cm,
        "",
        markdown_table(["comparison", "Δ exact-match (± SE)", "seeds won"], equal_compute),
        "cm_full trains the full pool for as many steps as make its training compute equal LossDiff-IRM's total "
        "(training + selection) at the same seed (constant LR; a callback stops it after that many steps, past 3 epochs). cm_random "
        "trains, at each selection epoch, a uniform subset whose training compute equals LossDiff-IRM's training "
        "compute of that epoch plus its selection compute at that event (capped at the pool).",
        "",
        "## Scoring modes against the exact way",
        "",
        markdown_table(
            [
                "arm",
                "scoring_reuse, aux refresh",
                "selection / training compute",
                "compute × plain run",
                "Δ vs exact (± SE)",
                "seeds won",
                "within 1 SE",
            ],
            mode_rows,
        ),
        cheapest_line,
        "",
        "Within 1 SE = |Δ vs exact| ≤ its standard error. " + before_field_note,
        "",
        "## Time to quality",
        "",
        "Cumulative compute (× one plain full-pool epoch) at which each arm first reaches the full arm's final "
        "exact-match of the same seed, linearly interpolated between the per-epoch evaluations (from the SFT "
        "start, compute 0); mean ± SE over the seeds that reach it. The full arm needs less than its 3 epochs "
        "whenever an earlier epoch already scored as well as its last. cm_full and cm_random share full's first "
        "3 epochs (cm_random's matched size is capped at the pool at every epoch, so it is the full arm).",
        "",
        markdown_table(
            ["arm", "seeds reached", "compute to full's final exact-match (epochs)", "× plain run"], ttq_rows
        ),
        "Greedy exact-match against cumulative compute: `compute_curve.png`.",
        "",
        "## Flipped share (pool: 0.30) in the kept and dropped sets at each selection epoch, mean over seeds",
        "",
        markdown_table(["arm", "kept ep1", "dropped ep1", "kept ep2", "dropped ep2"], flip_rows),
    ]
    report = "\n".join(text)
    (out_dir / "quality.md").write_text(report)
    with (out_dir / "quality.csv").open("w") as f:
        f.write(
            "arm,seed,exact_match,preference_accuracy,compute_x_plain,wall_seconds,selection_seconds,"
            "kept_ep1,flipped_in_kept_ep1,kept_ep2,flipped_in_kept_ep2,exact_match_by_epoch\n"
        )
        for run in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
            if run["arm"] == "sft":
                continue
            epochs = {e["epoch"]: e for e in run.get("epochs", [])}
            cells = [
                run["arm"],
                run["seed"],
                run["exact_match"],
                run.get("preference_accuracy", ""),
                f"{total_compute(run):.4f}",
                run.get("wall_seconds", ""),
                run.get("selection_seconds", ""),
            ]
            for k in (1, 2):
                e = epochs.get(k)
                cells += [e["num_kept"], e["flipped_in_kept"]] if e else ["", ""]
            cells.append(";".join(f"{p['exact_match']:.3f}" for p in run["evals"]))
            f.write(",".join(str(c) for c in cells) + "\n")
    plot(arms, ordered, seeds, out_dir / "quality.png")
    plot_compute_curve(arms, ordered, seeds, sft, out_dir / "compute_curve.png")
    return report


def plot(arms: dict, ordered: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [arm for arm in ordered if arm != "full" and "full" in arms]
    if not others:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
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
    ax.set_xticks(range(len(others)), others, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("Δ exact-match vs full")
    ax.set_title(f"Paired Δ vs full over {len(seeds)} seeds (bar: mean ± SE; dots: seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compute_curve(arms: dict, ordered: list[str], seeds: list[int], sft: dict, path: Path) -> None:
    """Greedy exact-match (mean ± SE over seeds) after each epoch against cumulative compute (× one plain epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>phX*"
    for i, arm in enumerate(a for a in ordered if a != "sft"):
        curves = [curve(arms[arm][s], sft.get(s)) for s in seeds if s in arms[arm]]
        length = max(len(c) for c in curves)
        xs, ys, es = [], [], []
        for k in range(length):
            at = [c[k] for c in curves if len(c) > k]
            xs.append(np.mean([x for x, _ in at]))
            mean, se = mean_se([y for _, y in at])
            ys.append(mean)
            es.append(se if np.isfinite(se) else 0.0)
        style = "--" if arm.startswith("cm_") else "-"
        ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], ls=style, ms=4, capsize=3, lw=1, label=arm)
    if "full" in arms:
        final = np.mean([arms["full"][s]["exact_match"] for s in seeds if s in arms["full"]])
        ax.axhline(final, color="grey", lw=0.8, ls=":", label="full's final exact-match")
    ax.set_xlabel("cumulative compute (× one plain full-pool epoch; training + selection)")
    ax.set_ylabel("greedy exact-match (test)")
    ax.set_title(f"Exact-match after each epoch against compute, mean ± SE over {len(seeds)} seeds")
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="benchmark seeds")
    parser.add_argument("--quick", action="store_true", help="seeds 0 and 1 only")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ALL_ARMS)
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "benchmark-quality")
    parser.add_argument("--report_only", action="store_true", help="only rewrite the tables from cached runs")
    parser.add_argument("--no_report", action="store_true", help="do not rewrite the tables (parallel workers)")
    options = parser.parse_args()
    seeds = [0, 1] if options.quick else options.seeds
    # Runs are cached and can come from several invocations (e.g. an arm added later), so name the canonical command
    command = "OMP_NUM_THREADS=1 python -m benchmarks.quality" + (" --quick" if options.quick else "")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    runs_path = options.out_dir / "runs.jsonl"

    if not options.report_only:
        tokenizer = prepare_protocol_runs()
        arms = [arm for arm in ALL_ARMS if arm in options.arms]
        for seed in seeds:
            done = {run["arm"]: run for run in load_runs(runs_path) if run["seed"] == seed}
            todo = [arm for arm in arms if arm not in done]
            if not todo:
                continue
            task = build_task(seed)
            sft_state, sft_exact, sft_seconds = sft_model(seed, task, tokenizer)
            if "sft" not in done:
                record = {
                    "protocol": PROTOCOL_ID,
                    "arm": "sft",
                    "seed": seed,
                    "exact_match": sft_exact,
                    "wall_seconds": sft_seconds,
                }
                append_run(runs_path, record)
            logger.info("seed %d: SFT exact-match %.3f (%.0fs)", seed, sft_exact, sft_seconds)
            flipped_by_id = {row["id"]: row["flipped"] for row in task["train"]}
            register_rule("benchmark_oracle", scores=(), overwrite=True)(oracle_rule(flipped_by_id))
            for arm in todo:
                overrides: dict[str, Any] = {}
                stop_step = None
                if arm in ("random", "cm_random", "cm_full"):
                    reference = done.get("lossdiff_irm")
                    if reference is None or (arm == "cm_full" and "full" not in done):
                        logger.warning("seed %d: %s needs the lossdiff_irm (and full) runs; skipped", seed, arm)
                        continue
                    if arm == "random":
                        sizes = {e["epoch"]: e["num_kept"] for e in reference["epochs"] if e["epoch"] >= 1}
                    elif arm == "cm_random":
                        fte_per_pair = reference["epoch_fte"] / reference["pool_size"]
                        sizes = matched_epoch_sizes(reference["evals"], fte_per_pair, reference["pool_size"])
                    else:
                        first = done["full"]["evals"][0]
                        budget = counted_compute("lossdiff_irm", reference["evals"][-1])
                        stop_step = matched_steps(budget, first["train_fte"] / first["step"])
                        overrides["num_train_epochs"] = math.ceil(stop_step / first["step"])
                    if arm != "cm_full":
                        register_rule(f"benchmark_{arm}", scores=(), overwrite=True)(random_rule(sizes))
                result = run_arm(arm, seed, task, sft_state, tokenizer, options.work_dir, overrides, stop_step)
                done[arm] = result
                append_run(runs_path, result)
                logger.info(
                    "seed %d %-22s exact-match %s compute x%.2f kept %s (%.0fs + eval %.0fs)",
                    seed,
                    arm,
                    " ".join(f"{p['exact_match']:.3f}" for p in result["evals"]),
                    total_compute(result),
                    [e["num_kept"] for e in result["epochs"]],
                    result["wall_seconds"],
                    result["eval_seconds"],
                )
            if not options.no_report:
                write_report(load_runs(runs_path), options.out_dir, command)
    print(write_report(load_runs(runs_path), options.out_dir, command))


def append_run(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("trl_select", "transformers", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
