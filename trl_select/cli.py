"""The `trl-select` command line: score pairs offline, select a subset, compare selections, plot a run, review and
clean its pool.

```bash
trl-select score --model POLICY --ref_model SFT --dataset train.jsonl --validation val.jsonl \
    --scores lossdiff,irm --out scores.parquet          # per-pair scores (multi-process: accelerate launch -m ...)
trl-select select scores.parquet --rule lossdiff_irm --dataset train.jsonl --out subset/   # datasets.save_to_disk
trl-select overlap subset_a/ subset_b/ scores.parquet   # overlap coefficients between selections
trl-select plot OUTPUT_DIR                              # PNGs of a run's selection into OUTPUT_DIR/selection_plots
trl-select suspects OUTPUT_DIR --out suspects.csv       # pairs ranked by the evidence their label is flipped
trl-select clean OUTPUT_DIR --decisions suspects.csv --out cleaned.jsonl   # the reviewed pairs dropped or flipped
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

from .event import PROGRESS_LOGGER
from .pair_files import load_pairs, pair_ids_of
from .suspects import DEFAULT_STATISTIC, SUSPECT_STATISTICS
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
# `scores.SUPPORTED_LOSS_TYPES`, every per-pair loss of TRL (a test keeps the two equal); spelled out here so that
# `trl-select --help` does not import torch.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


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
    parser.add_argument(
        "--loss_type",
        nargs="+",
        choices=LOSS_TYPES,
        default=["sigmoid"],
        metavar="LOSS",
        help="The trainer's loss, as TRL's `--loss_type`: one or more of " + ", ".join(LOSS_TYPES) + " (default: "
        "sigmoid). LossDiff and influence evaluate it per pair; several are summed with --loss_weights.",
    )
    parser.add_argument(
        "--loss_weights",
        nargs="+",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="One weight per --loss_type (default: 1 each), as TRL's `--loss_weights`.",
    )
    parser.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="TRL's `label_smoothing`, read by the robust and exo_pair losses (default: 0).",
    )
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


def _score_config(args: argparse.Namespace, output_dir: str):
    """The trainer config `score` runs its passes with (a `ValueError` naming the option when it is invalid)."""
    from .config import SelectiveDPOConfig

    return SelectiveDPOConfig(
        output_dir=output_dir,
        report_to="none",
        selection_rule=OFFLINE_RULE,
        beta=args.beta,
        loss_type=list(args.loss_type),
        loss_weights=args.loss_weights,
        label_smoothing=args.label_smoothing,
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


def _score(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .event import SelectionEvent
    from .registry import registered_rule
    from .registry_builtins import keep_everything
    from .score_files import write_score_file
    from .trainer import SelectiveDPOTrainer

    _load_plugins(args.plugin)
    names = tuple(name.strip() for name in args.scores.split(",") if name.strip())
    # The trainer prepares what its rule's scores need (the validation pairs, their reference): for the length of this
    # command, a rule that keeps everything and reads the requested scores stands for them.
    with registered_rule(OFFLINE_RULE, keep_everything, scores=names), tempfile.TemporaryDirectory() as scratch:
        try:
            config = _score_config(args, scratch)
        except ValueError as error:  # e.g. --loss_weights of another length than --loss_type, or an unscorable loss
            print(f"trl-select score: {error}", file=sys.stderr)
            return 2
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
        engine = trainer.selection_engine
        metrics: dict[str, float] = {}
        scores = engine.compute_scores(config.selection_warmup_epochs, metrics, names)
        if trainer.accelerator.is_main_process:
            event = SelectionEvent(
                epoch=0,
                global_step=0,
                kind="offline",
                rule="none",
                pair_ids=engine.pair_ids,
                keep=np.ones(engine.pool_size, dtype=bool),
                scores=scores,
                metrics={key: value for key, value in metrics.items() if not key.startswith("selection/seconds")},
            )
            path = write_score_file(args.out, event, np.zeros(engine.pool_size, dtype=np.int32))
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
    from .score_files import read_score_file

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
        from .score_files import read_score_file

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


# ----- clean -----


def _add_clean_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "clean",
        help="Write a dataset without the pairs a reviewer (or a policy) dropped and with the flipped ones swapped.",
        description="Read the decisions (the `trl-select suspects --out` CSV/JSONL with its `decision` column filled "
        "with keep, drop or flip) or apply a policy to a run's suspects ranking (--drop-top, --flip-top), check every "
        "decision against the dataset, and write the cleaned dataset in the input's format (.jsonl, .json, .parquet "
        "or a `save_to_disk` folder) with a JSON manifest of every change and the source's sha256. Nothing is written "
        "if a decision names an id not in the dataset, an id twice, or an unknown decision.",
    )
    parser.add_argument(
        "output_dir",
        nargs="?",
        default=None,
        metavar="OUTPUT_DIR",
        help="The run whose pool is cleaned: its recorded dataset is the default --dataset, its ranking the policies'.",
    )
    parser.add_argument("--decisions", default=None, metavar="FILE", help="The reviewed suspects .csv or .jsonl.")
    parser.add_argument(
        "--drop-top", default=None, metavar="N|P%", help="Drop the N (or P%% of the pool) most suspect pairs."
    )
    parser.add_argument(
        "--flip-top", default=None, metavar="N|P%", help="Flip the N (or P%% of the pool) most suspect pairs."
    )
    parser.add_argument(
        "--dataset", default=None, help="The dataset to clean (default: the one OUTPUT_DIR recorded, if any)."
    )
    parser.add_argument("--split", default="train", help="Split of a DatasetDict directory (default: train).")
    parser.add_argument("--out", required=True, help="The cleaned dataset: a file like the input's, or a folder.")
    parser.add_argument("--manifest", default=None, metavar="FILE", help="The manifest (default: OUT.manifest.json).")
    parser.add_argument(
        "--statistic",
        default=DEFAULT_STATISTIC,
        choices=sorted(SUSPECT_STATISTICS),
        help=f"The suspicion statistic the policies rank by (default: {DEFAULT_STATISTIC}).",
    )
    parser.set_defaults(handler=_clean)


def _clean(args: argparse.Namespace) -> int:
    from .cleaning import clean_dataset, policy_decisions, read_decisions
    from .pool_source import file_sha256
    from .suspects import recorded_dataset

    policies = [flag for flag, value in (("--drop-top", args.drop_top), ("--flip-top", args.flip_top)) if value]
    try:
        if (args.decisions is None) == (not policies) or len(policies) > 1:
            raise ValueError("Give either --decisions FILE or one policy (--drop-top N|P% or --flip-top N|P%).")
        if policies and args.output_dir is None:
            raise ValueError(f"{policies[0]} ranks the pairs of a run: pass its OUTPUT_DIR.")
        dataset, split = args.dataset, args.split
        if dataset is None:
            if args.output_dir is None:
                raise ValueError("Pass --dataset PATH (or a run's OUTPUT_DIR that recorded its pool).")
            dataset, recorded_split, note = recorded_dataset(args.output_dir)
            if dataset is None:
                raise ValueError(f"No dataset to clean: {note}. Pass --dataset PATH.")
            split = recorded_split or split
        if args.decisions is not None:
            decisions = read_decisions(args.decisions)
            source = {"file": str(args.decisions), "sha256": file_sha256(args.decisions)}
        else:
            decisions, source = policy_decisions(args.output_dir, args.drop_top, args.flip_top, args.statistic)
        result = clean_dataset(
            dataset, decisions, args.out, split=split, manifest=args.manifest, decisions_source=source
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"trl-select clean: {error}", file=sys.stderr)
        return 2
    print(
        f"{dataset}: {result.source_rows} pairs -> {result.output_rows} ({result.dropped} dropped, {result.flipped} "
        f"flipped) -> {result.output}"
    )
    print(f"Manifest (every change, the source's sha256): {result.manifest}")
    if not result.dropped and not result.flipped:
        print("No decision changed a pair: fill the `decision` column with keep, drop or flip.")
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
    _add_clean_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)  # the scoring passes' progress bars
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
