"""Rescoring cost of the embedded demo, relative to its training epochs, measured side by side in one run.

    python -m benchmarks.demo_overhead [--output results/demo_overhead.md]

Runs the demo recipe's configuration (tiny Llama, 2,000 reverse-digits pairs, 3 epochs, LossDiff-IRM) and reports, per
epoch: the training time of the epoch (from after the selection event to the end of the epoch, no evaluation), and
the selection event's time split into the reference pass (none with the default `scoring_reuse="reference"`, which takes π_ref's log-probs from the warm-up steps; else once per run), the policy pass, and the aux refresh
(alignment on the validation pairs + one aux pass over the pool). Ratios are against the full-pool epoch 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


REPO = Path(__file__).resolve().parents[1]


def _load_recipe():
    """The demo recipe module, loaded from its file (recipes/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("dpo_lossdiff_irm", REPO / "recipes" / "dpo_lossdiff_irm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_recipe = _load_recipe()
main, make_parser = _recipe.main, _recipe.make_parser


class EpochTimer(TrainerCallback):
    """Added after the selection callback, so its on_epoch_begin runs once the selection event is over."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_seconds.append(time.perf_counter() - self._start)


def run(output_dir: str) -> tuple[list[float], list[dict[str, float]]]:
    timer = EpochTimer()
    argv = ["--output_dir", output_dir, "--report_to", "none", "--eval_strategy", "no"]
    script_args, training_args, model_args = make_parser(argv=argv).parse_args_and_config(args=argv)

    import trl_select.trainer as trainer_module

    original_init = trainer_module.SelectiveDPOTrainer.__init__

    def init_with_timer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(timer)

    trainer_module.SelectiveDPOTrainer.__init__ = init_with_timer
    try:
        trainer = main(script_args, training_args, model_args)
    finally:
        trainer_module.SelectiveDPOTrainer.__init__ = original_init
    events = [
        {key.removeprefix("selection/"): value for key, value in entry.items() if key.startswith("selection/seconds")}
        | {"epoch": entry["selection/epoch"]}
        for entry in trainer.state.log_history
        if "selection/epoch" in entry
    ]
    return timer.epoch_seconds, events


def format_table(epoch_seconds: list[float], events: list[dict[str, float]]) -> str:
    full = epoch_seconds[0]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "",
        "| epoch | training epoch (s) | reference pass (s) | policy pass (s) | aux refresh (s) | whole event (s) "
        "| policy pass / full epoch | whole event / full epoch |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | {full:.2f} | | | | | | |",
    ]
    for event in events:
        epoch = int(event["epoch"])
        lines.append(
            f"| {epoch} | {epoch_seconds[epoch]:.2f} | {event.get('seconds_reference', 0):.2f} | "
            f"{event.get('seconds_policy', 0):.2f} | {event.get('seconds_aux', 0):.2f} | {event['seconds']:.2f} | "
            f"{event.get('seconds_policy', 0) / full:.2f} | {event['seconds'] / full:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "demo_overhead.md"))
    parser.add_argument("--output_dir", default="outputs/benchmark-demo-overhead")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = format_table(*run(options.output_dir))
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(table)
    print(table)
