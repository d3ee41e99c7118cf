"""The `trl-select` command line: score pairs offline, select a subset, compare selections, plot a run.

```bash
trl-select score --model POLICY --ref_model SFT --dataset train.jsonl --validation val.jsonl \
    --scores lossdiff,irm --out scores.parquet          # per-pair scores (multi-process: accelerate launch -m ...)
trl-select select scores.parquet --rule lossdiff_irm --dataset train.jsonl --out subset/   # datasets.save_to_disk
trl-select overlap subset_a/ subset_b/ scores.parquet   # overlap coefficients between selections
trl-select plot OUTPUT_DIR                              # PNGs of a run's selection into OUTPUT_DIR/selection_plots
trl-select suspects OUTPUT_DIR --dataset train.jsonl    # pairs ranked by the evidence their label is flipped
```

Each subcommand lives in its own `_add_<name>_command(subparsers)`, which defines its arguments and sets `handler`
to a function `(argparse.Namespace) -> int` (the exit status); `main` dispatches. Heavy imports (matplotlib, torch)
happen inside the handlers, so `trl-select --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .suspects_report import add_suspects_command


logger = logging.getLogger(__name__)


def _add_plot_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="Render a run's selection as PNG files (matplotlib): the overview and one figure per selection event.",
        description="Read OUTPUT_DIR/selection_history.jsonl and the score files OUTPUT_DIR/selection/epoch_*.parquet "
        "and write selection_overview.png and selection_epoch_{k}.png.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="The `output_dir` of a selective training run.")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="Where to write the PNGs (default: OUTPUT_DIR/selection_plots)."
    )
    parser.add_argument("--dpi", type=int, default=None, help="Resolution of the PNGs (default: 110).")
    parser.add_argument(
        "--max-points",
        type=int,
        default=None,
        help="At most this many pairs in each scatter panel, sampled deterministically (default: 5000).",
    )
    parser.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    from .plots import plot_selection

    options = {"dpi": args.dpi, "max_points": args.max_points}
    try:
        paths = plot_selection(args.output_dir, args.out, **{k: v for k, v in options.items() if v is not None})
    except (FileNotFoundError, ValueError) as error:
        print(f"trl-select plot: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


# ----- data helpers -----


def load_pairs(path: str, split: str = "train"):
    """A preference dataset from a `save_to_disk` directory (a `DatasetDict` picks `split`), or a .jsonl/.json/.parquet
    file."""
    from pathlib import Path

    from datasets import Dataset, DatasetDict, load_from_disk

    location = Path(path)
    if location.is_dir():
        dataset = load_from_disk(str(location))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} holds splits {list(dataset)}; pick one with --split.")
            dataset = dataset[split]
        return dataset
    if location.suffix in (".jsonl", ".json"):
        return Dataset.from_json(str(location))
    if location.suffix == ".parquet":
        return Dataset.from_parquet(str(location))
    raise ValueError(f"{path}: expected a `save_to_disk` directory or a .jsonl, .json or .parquet file.")


def pair_ids_of(dataset) -> list:
    """The stable id of each row: the `id` column if there is one, else the row index (the trainer's convention)."""
    return list(dataset["id"]) if "id" in dataset.column_names else list(range(len(dataset)))


def _load_plugins(paths: Sequence[str]) -> None:
    """Import each Python file or module in `paths`, so the rules and scorers it registers are available."""
    import importlib
    import importlib.util
    from pathlib import Path

    for index, path in enumerate(paths):
        if path.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"trl_select_plugin_{index}", Path(path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(path)


def _add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="A .py file or an importable module that registers rules/scorers (`register_rule`, `register_scorer`); "
        "repeatable.",
    )


# ----- score -----

OFFLINE_RULE = "trl_select_offline_scores"


def _add_score_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="Score every pair of a dataset with a policy and its reference (and validation data for LossDiff and "
        "influence); write the scores to a parquet file.",
        description="Compute per-pair scores exactly as the trainer does at a selection event: θ_t is --model, π_ref "
        "is --ref_model, θ_aux (LossDiff) is aligned from θ_t on --validation. Multi-process: `accelerate launch -m "
        "trl_select.cli score ...` shards the passes over ranks (not the influence score, which runs on one process). "
        "The output is a trl-select score file: columns pair_id and one per score, readable by `select`.",
    )
    parser.add_argument("--model", required=True, help="The policy θ_t: a `save_pretrained` directory.")
    parser.add_argument("--ref_model", required=True, help="The reference π_ref: a `save_pretrained` directory.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: --model).")
    parser.add_argument("--dataset", required=True, help="Pairs to score (prompt/chosen/rejected columns).")
    parser.add_argument("--validation", default=None, help="Validation pairs (needed by lossdiff and influence).")
    parser.add_argument("--split", default="train", help="Split of a DatasetDict directory (default: train).")
    parser.add_argument("--scores", default="irm", help="Comma-separated registered scores (default: irm).")
    parser.add_argument("--out", required=True, help="The parquet file to write.")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO β (default: 0.1).")
    parser.add_argument("--loss_type", choices=("sigmoid", "hinge"), default="sigmoid", help="sigmoid (DPO) or hinge.")
    parser.add_argument("--max_length", type=int, default=1024, help="Truncation length of prompt+completion.")
    parser.add_argument("--batch_size", type=int, default=8, help="Per-device batch size of the passes.")
    parser.add_argument("--aux_max_steps", type=int, default=-1, help="Aux alignment steps (default: one epoch).")
    parser.add_argument("--aux_learning_rate", type=float, default=1e-6, help="Aux alignment learning rate.")
    parser.add_argument(
        "--aux_mode",
        choices=["lora", "full"],
        default="lora",
        help="Aux model of a fully fine-tuned model: a LoRA update injected for the stage, or a full copy.",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the aux alignment.")
    parser.add_argument("--use_cpu", action="store_true", help="Run on the CPU even if an accelerator is present.")
    parser.add_argument("--bf16", action="store_true", help="Run the passes in bf16 autocast.")
    _add_plugin_argument(parser)
    parser.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .callback import SelectionEvent
    from .config import SelectiveDPOConfig
    from .registry import register_rule
    from .registry_builtins import keep_everything
    from .reporting import write_score_file
    from .trainer import SelectiveDPOTrainer

    _load_plugins(args.plugin)
    names = tuple(name.strip() for name in args.scores.split(",") if name.strip())
    # The trainer prepares exactly what its rule's scores need; an internal rule carries the requested scores.
    register_rule(OFFLINE_RULE, scores=names, overwrite=True)(keep_everything)
    with tempfile.TemporaryDirectory() as scratch:
        config = SelectiveDPOConfig(
            output_dir=scratch,
            report_to="none",
            selection_rule=OFFLINE_RULE,
            beta=args.beta,
            loss_type=[args.loss_type],
            max_length=args.max_length,
            per_device_eval_batch_size=args.batch_size,
            per_device_train_batch_size=args.batch_size,
            aux_max_steps=args.aux_max_steps,
            aux_learning_rate=args.aux_learning_rate,
            aux_mode=args.aux_mode,
            seed=args.seed,
            use_cpu=args.use_cpu,
            bf16=args.bf16,
            disable_tqdm=False,
        )
        dataset = load_pairs(args.dataset, args.split)
        validation = load_pairs(args.validation, args.split) if args.validation else None
        if config.needs_validation and validation is None:
            print(f"trl-select score: --scores {','.join(names)} needs --validation pairs.", file=sys.stderr)
            return 2
        trainer = SelectiveDPOTrainer(
            AutoModelForCausalLM.from_pretrained(args.model),
            ref_model=AutoModelForCausalLM.from_pretrained(args.ref_model),
            args=config,
            train_dataset=dataset,
            eval_dataset=validation,
            processing_class=AutoTokenizer.from_pretrained(args.tokenizer or args.model),
        )
        callback = trainer.selection_callback
        metrics: dict[str, float] = {}
        scores = callback._compute_scores(config.selection_warmup_epochs, metrics, names)
        if trainer.accelerator.is_main_process:
            event = SelectionEvent(
                epoch=0,
                global_step=0,
                kind="offline",
                rule="none",
                pair_ids=callback.pair_ids,
                keep=np.ones(len(callback.pair_ids), dtype=bool),
                scores=scores,
                metrics={key: value for key, value in metrics.items() if not key.startswith("selection/seconds")},
            )
            path = write_score_file(args.out, event, np.zeros(len(callback.pair_ids), dtype=np.int32))
            print(path)
        trainer.accelerator.wait_for_everyone()
    return 0


# ----- select -----


def _add_select_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        help="Apply a registered rule to a score file and write the kept pairs as a `datasets` dataset.",
        description="Read a score file (from `trl-select score`, or a training run's selection/epoch_*.parquet), apply "
        "--rule, and write the kept rows of --dataset (matched by their `id` column, or row index) with "
        "`save_to_disk`, with an `id` column so the subset can be compared with `overlap`.",
    )
    parser.add_argument("scores", metavar="SCORES", help="A score file (.parquet).")
    parser.add_argument("--rule", required=True, help="A registered selection rule, e.g. lossdiff_irm, reward_gap.")
    parser.add_argument("--dataset", required=True, help="The dataset the scores were computed on.")
    parser.add_argument("--split", default="train", help="Split of a DatasetDict directory (default: train).")
    parser.add_argument("--out", required=True, help="Directory to `save_to_disk` the subset into.")
    parser.add_argument(
        "--push_to_hub",
        default=None,
        metavar="REPO_ID",
        help="Also push the subset to this Hub dataset repo (needs a reachable Hub and a token).",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="A SelectiveDPOConfig field the rule reads, e.g. --set irm_lo_percentile=20 --set selection_fraction=0.1.",
    )
    _add_plugin_argument(parser)
    parser.set_defaults(handler=_select)


def _config_overrides(pairs: Sequence[str]) -> dict[str, float | int | str]:
    overrides: dict[str, float | int | str] = {}
    for pair in pairs:
        field, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}.")
        for cast in (int, float):
            try:
                overrides[field] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[field] = value
    return overrides


def _select(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np

    from .config import SelectiveDPOConfig
    from .registry import SelectionContext, apply_rule, get_rule
    from .reporting import read_score_file

    _load_plugins(args.plugin)
    try:
        required = get_rule(args.rule, "--rule").scores
        score_file = read_score_file(args.scores)
        with tempfile.TemporaryDirectory() as scratch:
            config = SelectiveDPOConfig(
                output_dir=scratch, report_to="none", bf16=False, selection_rule=args.rule,
                **_config_overrides(args.set),
            )  # fmt: skip
        event = score_file.event
        missing = [name for name in required if name not in event.scores]
        if missing:
            raise ValueError(
                f"--rule {args.rule} reads scores {list(required)}, but {args.scores} has no {missing} column(s); "
                f"it has {sorted(event.scores)}. Rescore with `trl-select score --scores {','.join(required)}`."
            )
        dataset = load_pairs(args.dataset, args.split)
        ids = pair_ids_of(dataset)
        row_of = {pair_id: row for row, pair_id in enumerate(ids)}
        unknown = [pair_id for pair_id in event.pair_ids if pair_id not in row_of]
        if unknown:
            raise ValueError(
                f"{len(unknown)} pair ids of {args.scores} (e.g. {unknown[:3]}) are not in --dataset {args.dataset}: "
                "score and select the same dataset."
            )
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"trl-select select: {error}", file=sys.stderr)
        return 2
    context = SelectionContext(
        epoch=event.epoch,
        seed=config.seed,
        pool_size=len(event.pair_ids),
        pair_ids=list(event.pair_ids),
        args=config,
        dataset=dataset.select([row_of[pair_id] for pair_id in event.pair_ids]),
    )
    keep, bands = apply_rule(args.rule, {name: event.scores[name] for name in required}, context)
    rows = [row_of[event.pair_ids[index]] for index in np.flatnonzero(keep)]
    subset = dataset.select(rows)
    if "id" not in subset.column_names:
        subset = subset.add_column("id", rows)
    subset.save_to_disk(args.out)
    limits = ", ".join(f"{name} in [{band.lo:.4g}, {band.hi:.4g}]" for name, band in bands.items())
    print(f"kept {len(rows)}/{len(event.pair_ids)} pairs ({limits or 'no bands'}) -> {args.out}")
    if args.push_to_hub:
        subset.push_to_hub(args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")
    return 0


# ----- overlap -----


def _add_overlap_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "overlap",
        help="Print the overlap coefficient |A ∩ B| / min(|A|, |B|) between every two selections.",
        description="Each SELECTION is a subset written by `select` (its `id` column) or a score file (its kept "
        "pairs).",
    )
    parser.add_argument("selections", nargs="+", metavar="SELECTION", help="Subset directories or score files.")
    parser.set_defaults(handler=_overlap)


def selection_ids(path: str) -> set:
    """The ids of a selection: a subset directory's `id` column, or the kept pairs of a score file."""
    if path.endswith(".parquet"):
        from .reporting import read_score_file

        event = read_score_file(path).event
        return {pair_id for pair_id, kept in zip(event.pair_ids, event.keep, strict=True) if kept}
    dataset = load_pairs(path)
    if "id" not in dataset.column_names:
        raise ValueError(f"{path} has no `id` column; write subsets with `trl-select select`, which adds one.")
    return set(dataset["id"])


def _overlap(args: argparse.Namespace) -> int:
    from .rules import overlap_coefficient

    if len(args.selections) < 2:
        print("trl-select overlap: give at least two selections.", file=sys.stderr)
        return 2
    try:
        selections = {path: selection_ids(path) for path in args.selections}
    except (FileNotFoundError, ValueError) as error:
        print(f"trl-select overlap: {error}", file=sys.stderr)
        return 2
    names = list(selections)
    width = max(len(name) for name in names)
    print(" " * width + "  size  " + "  ".join(f"[{i}]".rjust(6) for i in range(len(names))))
    for i, name in enumerate(names):
        cells = "  ".join(f"{overlap_coefficient(selections[name], selections[other]):6.3f}" for other in names)
        print(f"{name.ljust(width)}  {len(selections[name]):4d}  {cells}  [{i}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-select",
        description="Score and select preference pairs offline, compare selections, inspect training runs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_score_command(subparsers)
    _add_select_command(subparsers)
    _add_overlap_command(subparsers)
    _add_plot_command(subparsers)
    add_suspects_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
