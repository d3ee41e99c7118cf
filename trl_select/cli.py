"""The `trl-select` command line: one subcommand per task on a run's output directory.

```bash
trl-select plot OUTPUT_DIR            # PNGs of the selection into OUTPUT_DIR/selection_plots
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-select", description="Inspect the in-loop data selection of trl-select training runs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_plot_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
