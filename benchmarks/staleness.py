"""How stale are the policy log-probs `scoring_reuse="reference_and_policy"` takes from the training steps?

    OMP_NUM_THREADS=1 python -m benchmarks.staleness                 # 10 seeds (about 8 min on 2 busy cores)
    python -m benchmarks.staleness --report_only                     # rewrite the table from the cached runs

With `reference_and_policy`, the event at epoch e scores each pair the previous epoch trained with θ as it was at that
pair's training step (up to one epoch old), and rescores only the others with θ_t. Here every such event is scored
twice: the run's own (stale) IRM and LossDiff, and fresh ones from a θ_t pass over the whole pool with the same π_ref
and θ_aux log-probs (an extra pass that does not change the run). Reported per event, over seeds: the share of pairs
with stale log-probs, the Spearman rank correlation of stale vs fresh IRM and LossDiff, and the overlap of the
LossDiff-IRM selection (bands 10-90) made from stale vs fresh scores (Jaccard, and pairs that change sides). The
exact-match cost of the staleness is the `lossdiff_irm_stale` − `lossdiff_irm_exact` row of `quality.md`.

Protocol: `benchmarks/quality.py`'s (reverse digits, pool 2000 with 30% flipped, validation 100, SFT warm start, DPO
3 epochs, warm-up 1, aux refresh every epoch), arm `lossdiff_irm_stale`. Runs are cached in
`results/staleness/runs.jsonl`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_description, markdown_table
from benchmarks.quality import PROTOCOL, arm_config, build_task, mean_se, protocol_args, sft_model


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "staleness"
BAND = (10.0, 90.0)

logger = logging.getLogger("benchmarks.staleness")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over the rows finite in both (ranks by argsort; float scores have no ties)."""
    finite = np.isfinite(a) & np.isfinite(b)
    ranks_a = np.argsort(np.argsort(a[finite])).astype(float)
    ranks_b = np.argsort(np.argsort(b[finite])).astype(float)
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def band_selection(scores: dict[str, np.ndarray], lo: float = BAND[0], hi: float = BAND[1]) -> np.ndarray:
    """LossDiff-IRM's keep-mask: both scores within their `lo`-`hi` percentile band of the pool."""
    from trl_select.rules import percentile_band

    masks = [percentile_band(scores[name], lo, hi)[0] for name in ("lossdiff", "irm")]
    return masks[0] & masks[1]


def fresh_scores(
    stale: dict[str, np.ndarray], fresh_irm: np.ndarray, beta: float, loss_type: str
) -> dict[str, np.ndarray]:
    """IRM and LossDiff from fresh θ_t log-probs, with the run's own θ_aux loss.

    LossDiff = L(θ_t) − L(θ_aux), L = the preference loss of the margin IRM/β, so the run's θ_aux loss is
    L(stale IRM/β) − stale LossDiff, and the fresh LossDiff is L(fresh IRM/β) minus that.
    """
    import torch

    from trl_select.scores import preference_loss

    def loss(irm: np.ndarray) -> np.ndarray:
        return preference_loss(torch.as_tensor(irm, dtype=torch.float64) / beta, beta, loss_type).numpy()

    aux_loss = loss(stale["irm"]) - stale["lossdiff"]
    return {"irm": fresh_irm, "lossdiff": loss(fresh_irm) - aux_loss}


def run_seed(seed: int, work_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_select import SelectiveDPOTrainer
    from trl_select.scores import implicit_reward_margin
    from trl_select.testing import build_char_tokenizer, build_tiny_llama

    tokenizer = build_char_tokenizer()
    task = build_task(seed)
    sft_state, _, _ = sft_model(seed, task, tokenizer)
    model = build_tiny_llama(tokenizer, seed=seed)
    model.load_state_dict(sft_state)
    output_dir = work_dir / f"seed{seed}"
    shutil.rmtree(output_dir, ignore_errors=True)
    args = protocol_args(output_dir, seed, **{**PROTOCOL, **arm_config("lossdiff_irm_stale")})
    events: list[dict[str, Any]] = []

    def compare(event, train_args, state) -> None:
        if event.kind != "selection":
            return
        engine = trainer.selection_engine
        fresh_policy = engine.policy_log_probs()  # a θ_t pass over the whole pool; the run does not see it
        fresh_irm = implicit_reward_margin(fresh_policy, engine.reference_log_probs(), train_args.beta).numpy()
        stale = {name: np.asarray(event.scores[name], dtype=np.float64) for name in ("irm", "lossdiff")}
        fresh = fresh_scores(stale, fresh_irm.astype(np.float64), train_args.beta, train_args.loss_type[0])
        keep_stale, keep_fresh = band_selection(stale), band_selection(fresh)
        union = int((keep_stale | keep_fresh).sum())
        events.append(
            {
                "epoch": event.epoch,
                "stale_fraction": 1.0 - event.metrics["selection/policy_rescored_fraction"],
                "spearman_irm": spearman(stale["irm"], fresh["irm"]),
                "spearman_lossdiff": spearman(stale["lossdiff"], fresh["lossdiff"]),
                "jaccard": int((keep_stale & keep_fresh).sum()) / union if union else 1.0,
                "changed_side": int((keep_stale != keep_fresh).sum()),
                "kept_stale": int(keep_stale.sum()),
                "kept_by_run": int(event.keep.sum()),
            }
        )

    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(task["train"]),
        validation_dataset=Dataset.from_list(task["validation"]),
        processing_class=tokenizer,
        selection_reporters=[compare],  # called after each event, when `trainer` is bound
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"seed": seed, "events": events}


def _cell(events: list[dict[str, Any]], key: str, digits: int = 3) -> str:
    mean, se = mean_se([event[key] for event in events])
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def write_report(runs: list[dict[str, Any]], command: str) -> str:
    seeds = sorted(run["seed"] for run in runs)
    rows = []
    for epoch in sorted({event["epoch"] for run in runs for event in run["events"]}):
        events = [event for run in runs for event in run["events"] if event["epoch"] == epoch]

        rows.append(
            [
                str(epoch),
                _cell(events, "stale_fraction"),
                _cell(events, "spearman_irm", 4),
                _cell(events, "spearman_lossdiff", 4),
                _cell(events, "jaccard"),
                _cell(events, "changed_side", 1),
                _cell(events, "kept_stale", 0),
            ]
        )
    lines = [
        '# Staleness of the reused policy log-probs (`scoring_reuse="reference_and_policy"`)',
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Seeds: {seeds}. Protocol: `benchmarks/quality.py` (protocol 2), arm `lossdiff_irm_stale`. Each selection "
        "event's stale scores (the run's) against fresh ones from an extra θ_t pass over the pool with the same π_ref "
        "and θ_aux log-probs. Mean ± standard error over seeds.",
        "",
        markdown_table(
            [
                "event (epoch)",
                "pairs with stale θ log-probs",
                "Spearman IRM (stale vs fresh)",
                "Spearman LossDiff",
                "Jaccard of the selections",
                "pairs that change side",
                "pairs kept (stale)",
            ],
            rows,
        ),
        "",
        "The epoch-1 event reuses the warm-up epoch's steps (every pair trained, θ up to one epoch old); the epoch-2 "
        "event reuses epoch 1's for the pairs it trained and rescores the rest. What the staleness costs in quality "
        "(exact-match vs the exact way) is the `lossdiff_irm_stale` row of [quality.md](quality/quality.md).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "benchmark-staleness"))
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("transformers", "trl", "accelerate", "datasets", "trl_select"):
        logging.getLogger(name).setLevel(logging.WARNING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = RESULTS / "runs.jsonl"
    runs = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = {run["seed"] for run in runs}
    if not options.report_only:
        for seed in options.seeds:
            if seed in done:
                continue
            run = run_seed(seed, Path(options.work_dir))
            logger.info("seed %d: %s", seed, run["events"])
            with cache.open("a") as handle:
                handle.write(json.dumps(run) + "\n")
            runs.append(run)
    runs = [run for run in runs if run["seed"] in set(options.seeds)]
    report = write_report(runs, "OMP_NUM_THREADS=1 python -m benchmarks.staleness")
    (REPO / "benchmarks" / "results" / "staleness.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
