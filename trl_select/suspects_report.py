"""What `trl-select suspects` writes: JSONL/CSV rows, a text table with its legend, a self-contained HTML report, a
wandb table; and the `suspects` subcommand itself.

The ranking is computed by `trl_select.suspects` (pure numpy over score files read with pyarrow); this module only
formats it. Neither imports torch, transformers nor TRL.

```bash
trl-select suspects OUTPUT_DIR                                   # the top 20, with a legend of the columns
trl-select suspects OUTPUT_DIR --dataset train.jsonl --out suspects.jsonl   # every pair, with its text (or .csv)
trl-select suspects OUTPUT_DIR --dataset train.jsonl --html report.html     # the HTML report (top 200)
trl-select suspects OUTPUT_DIR offline_scores.parquet           # a run's events plus an offline `score` pass
```
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .suspects import (
    DEFAULT_STATISTIC,
    SUSPECT_STATISTICS,
    TAIL_PERCENTILE,
    TEXT_COLUMNS,
    Suspect,
    find_suspects,
    recorded_dataset,
)


# ----- writers -----

# The column a reviewer fills in the .csv/.jsonl (`keep`, `drop` or `flip`); `trl-select clean` reads it.
DECISION_COLUMN = "decision"

LEGEND = {
    "rank": "1 = most likely mislabeled",
    "pair_id": "the pair's id (the dataset's `id` column, else its row index)",
    "suspicion": "the evidence that the label is flipped, 0-100: 100·σ(mean over events and scores of the log-odds "
    "of (100 - percentile)); 50 = an average pair, near 100 = at the bottom of IRM and LossDiff at every event",
    "times_dropped": "selection events whose rule left the pair out",
    "{event}.{score}": "the pair's percentile of that score at that event (0 = lowest of the pool; low IRM = the policy "
    "prefers the 'rejected' side, low LossDiff = the pair pulls against the validation data)",
}
DECISION_LEGEND = "empty; write keep, drop or flip per pair, then `trl-select clean --decisions FILE`"


def legend_lines(statistic: str = DEFAULT_STATISTIC) -> list[str]:
    """What each output column means, one line per column."""
    lines = []
    for column, meaning in LEGEND.items():
        if column == "suspicion" and statistic != DEFAULT_STATISTIC:
            meaning = f"the statistic {statistic}: " + " ".join(SUSPECT_STATISTICS[statistic].__doc__.split())
        lines.append(f"  {column}: {meaning}")
    return lines


def records_of(suspects: Sequence[Suspect], decision: bool = False) -> list[dict[str, Any]]:
    """`Suspect.to_record` of each row; with `decision`, an empty `decision` column last, for the reviewer."""
    records = [row.to_record() for row in suspects]
    if decision:
        for record in records:
            record[DECISION_COLUMN] = ""
    return records


def write_suspects(
    suspects: Sequence[Suspect],
    path: str | os.PathLike,
    statistic: str = DEFAULT_STATISTIC,
    source: str = "",
    format: str | None = None,
    text_note: str = "",
) -> Path:
    """Write the ranking to `path` as `format` (default: from the extension).

    `jsonl` (one JSON object a line) and `csv` hold the columns of `Suspect.to_record` and an empty `decision` column
    for the reviewer (`trl-select clean --decisions` reads it back); `html` is `suspects_html` (`source` and
    `text_note`, where the text came from, in its header).
    """
    path = Path(path)
    format = format or {".jsonl": "jsonl", ".csv": "csv", ".html": "html", ".htm": "html"}.get(path.suffix.lower())
    if format not in ("jsonl", "csv", "html"):
        raise ValueError(f"--out {path}: the extension picks the format; use .jsonl, .csv or .html.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "html":
        page = suspects_html(suspects, statistic=statistic, source=source, text_note=text_note)
        path.write_text(page, encoding="utf-8")
        return path
    records = records_of(suspects, decision=True)
    if format == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def format_table(suspects: Sequence[Suspect], text_width: int = 40) -> str:
    """The ranking as a fixed-width text table (what the CLI prints), text cut to `text_width`."""
    records = records_of(suspects)
    if not records:
        return "(no pairs)"
    columns = [key for key in records[0] if key not in TEXT_COLUMNS]
    texts = [key for key in TEXT_COLUMNS if key in records[0]]

    def cell(value: Any, width: int | None = None) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        text = " ".join(str(value).split())
        return text if width is None or len(text) <= width else text[: width - 1] + "…"

    rows = [[cell(r[c]) for c in columns] + [cell(r[t], text_width) for t in texts] for r in records]
    header = columns + texts
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += [
        "  ".join(v.rjust(w) if i < len(columns) else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


# ----- the HTML report -----

_SCORE_COLOURS = {"irm": "#1f77b4", "lossdiff": "#d62728"}
_SCORE_NAMES = {"irm": "IRM", "lossdiff": "LossDiff"}
_OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b")
# Texts longer than this (in characters, after collapsing whitespace) are shown collapsed in a <details> element.
COLLAPSE_AFTER = {"prompt": 36, "chosen": 56, "rejected": 56}
# The sparkline's y axis: the percentile on a log scale from SPARK_RANGE[0] (bottom) to 100 (top), the same for
# every pair. The suspects live at the bottom of the pool, where a linear axis would draw every top row as the same
# flat line; on this one 0.1, 1 and 10 are a third of the height apart.
SPARK_RANGE = (0.02, 100.0)
SPARK_GRID = (0.1, 1.0, 10.0)

_CSS = """
body { font: 13px/1.3 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 12px 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 2px; }
p.meta { color: #555; margin: 2px 0; }
p.notice { margin: 4px 0; padding: 3px 8px; background: #fff6d6; border-left: 3px solid #e0b000; }
details.legend { color: #555; margin: 2px 0 6px; }
details.legend ul { margin: 2px 0; padding-left: 18px; font-size: 12px; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 2px 6px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; font-size: 12px; white-space: nowrap; z-index: 1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; line-height: 26px; }
td.text { font: 12px/26px ui-monospace, Menlo, Consolas, monospace; overflow: hidden; }
td.text span.short, td.text summary { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
td.text summary { cursor: pointer; list-style-position: inside; }
td.text details[open] summary { color: #777; }
td.text pre { margin: 0 0 4px; white-space: pre-wrap; word-break: break-word; font: 12px/1.35 ui-monospace, Menlo,
  Consolas, monospace; }
td.chosen { background: #f3f9f3; } td.rejected { background: #fbf3f3; }
td.spark { white-space: nowrap; padding-top: 1px; padding-bottom: 1px; }
td.spark svg { vertical-align: middle; }
.pcts { display: inline-block; vertical-align: middle; font-size: 10px; line-height: 12px; color: #444;
  margin-left: 4px; }
.bar { display: inline-block; height: 7px; background: #d62728; vertical-align: middle; margin-left: 4px; }
.key { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin: 0 3px 0 8px; }
col.rank { width: 5ch; } col.id { width: 9ch; } col.stat { width: 13ch; } col.dropped { width: 14ch; }
col.spark { width: 235px; } col.prompt { width: 22%; }
"""


def _log_percentile(percentile: float) -> float:
    return math.log10(min(max(percentile, SPARK_RANGE[0]), SPARK_RANGE[1]))


def _score_colour(name: str, index: int) -> str:
    return _SCORE_COLOURS.get(name, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])


def sparkline_svg(
    percentiles: Mapping[str, Mapping[str, float]],
    width: int = 120,
    height: int = 26,
    tail: float = TAIL_PERCENTILE,
) -> str:
    """An inline SVG of a pair's percentile of each score per event: x = events in order, y = the percentile on a log
    axis, the same for every pair (bottom 0.02, faint lines at 0.1, 1 and 10, top 100), so the top suspects, all in
    the bottom percents of the pool, still look different. IRM is a solid blue line with dots, LossDiff a dashed red
    one with squares; the suspect tail `p < tail` is shaded."""
    events = list(percentiles)
    names = list(dict.fromkeys(name for values in percentiles.values() for name in values))
    pad = 3
    low, high = _log_percentile(SPARK_RANGE[0]), _log_percentile(SPARK_RANGE[1])

    def x(index: int) -> float:
        return pad + (width - 2 * pad) * (index / (len(events) - 1) if len(events) > 1 else 0.5)

    def y(value: float) -> float:
        return pad + (height - 2 * pad) * (high - _log_percentile(value)) / (high - low)

    title = "; ".join(
        f"{event}: " + ", ".join(f"{_SCORE_NAMES.get(n, n)} {values[n]:.2f}" for n in names if n in values)
        for event, values in percentiles.items()
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" class="sparkline"><title>{html.escape(title)}</title>',
        f'<rect x="0" y="{y(tail):.1f}" width="{width}" height="{height - y(tail):.1f}" fill="#fbe5e1"/>',
    ]
    parts += [
        f'<line x1="0" x2="{width}" y1="{y(grid):.1f}" y2="{y(grid):.1f}" stroke="#d0d0d0" stroke-width="0.6"/>'
        for grid in SPARK_GRID
    ]
    parts.append(f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="none" stroke="#ccc"/>')
    for index, name in enumerate(names):
        colour = _score_colour(name, index)
        dash = ' stroke-dasharray="3 2"' if name == "lossdiff" else ""
        points = [
            (x(i), y(values[name]))
            for i, values in enumerate(percentiles.values())
            if name in values and math.isfinite(values[name])
        ]
        if len(points) > 1:
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
        if name == "lossdiff":
            parts += [
                f'<rect x="{px - 2:.1f}" y="{py - 2:.1f}" width="4" height="4" fill="{colour}"/>' for px, py in points
            ]
        else:
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.2" fill="{colour}"/>' for px, py in points]
    parts.append("</svg>")
    return "".join(parts)


def _percentile_caption(percentiles: Mapping[str, Mapping[str, float]]) -> str:
    """`IRM 0.3 → 0.4` per score: the sparkline's values, events in order."""
    names = list(dict.fromkeys(name for values in percentiles.values() for name in values))
    lines = [
        html.escape(_SCORE_NAMES.get(name, name))
        + " "
        + " → ".join(_short(values.get(name, math.nan)) for values in percentiles.values())
        for name in names
    ]
    return '<span class="pcts">' + "<br>".join(lines) + "</span>"


def _short(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _text_cell(column: str, text: str | None) -> str:
    """One text cell: a short text as is on one line; a long one collapsed in `<details>`, its summary one line (the
    end of a prompt, where the last turn is; the start of an answer), the whole text one click away."""
    text = (text or "").strip()
    flat = " ".join(text.split())
    limit = COLLAPSE_AFTER.get(column, 56)
    if len(flat) <= limit and "\n" not in text:
        return f'<td class="text {column}"><span class="short">{html.escape(flat)}</span></td>'
    if column == "prompt":  # the end, where the last turn is (without a closing "Assistant:" label)
        end = flat.removesuffix("Assistant:").rstrip()
        summary = "…" + end[-(limit - 1) :]
    else:
        summary = flat[: limit - 1] + "…"
    return (
        f'<td class="text {column}"><details><summary>{html.escape(summary)}</summary>'
        f"<pre>{html.escape(text)}</pre></details></td>"
    )


def suspects_html(
    suspects: Sequence[Suspect],
    statistic: str = DEFAULT_STATISTIC,
    title: str = "Likely mislabeled preference pairs",
    source: str = "",
    text_note: str = "",
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no script, nothing fetched): the ranking as a compact table,
    one line per pair, with its percentile history and text; a long text is collapsed in a `<details>` element whose
    summary is its first (a prompt: last) characters. Every piece of data text is HTML-escaped.

    Args:
        suspects (`Sequence[Suspect]`): the rows, in rank order.
        statistic (`str`): the statistic the suspicion column holds (named in the header line).
        title (`str`): the page's title.
        source (`str`): where the scores came from (shown in the header line).
        text_note (`str`): where the text came from; without text, the page says how to add it instead.
    """
    escape = html.escape
    names = list(dict.fromkeys(n for row in suspects for values in row.percentiles.values() for n in values))
    events = list(dict.fromkeys(e for row in suspects for e in row.percentiles))
    has_text = any(row.chosen is not None for row in suspects)
    keys = "".join(
        f'<span class="key" style="background:{_score_colour(n, i)}"></span>{escape(_SCORE_NAMES.get(n, n))}'
        for i, n in enumerate(names)
    )
    out = io.StringIO()
    out.write('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n')
    out.write(f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n")
    out.write(f"<h1>{escape(title)}</h1>\n")
    meta = f"{len(suspects)} pairs ranked by <b>suspicion</b> ({escape(statistic)}) over {len(events)} score "
    meta += f"event(s) ({escape(', '.join(events))}); percentile history {keys}"
    meta += f". Scores: {escape(source)}" if source else ""
    meta += f". {escape(text_note[0].upper() + text_note[1:])}" if has_text and text_note else ""
    out.write(f'<p class="meta">{meta}.</p>\n')
    if not has_text:
        reason = f" ({escape(text_note)})" if text_note else ""
        out.write(
            f'<p class="notice">No text of the pairs{reason}: <code>trl-select suspects ... --dataset PATH</code> '
            "adds the prompt, chosen and rejected text of each pair.</p>\n"
        )
    out.write('<details class="legend"><summary>What the columns mean, and what to do next</summary>\n<ul>\n')
    for line in legend_lines(statistic):
        column, _, meaning = line.strip().partition(": ")
        out.write(f"<li><b>{escape(column)}</b>: {escape(meaning)}</li>\n")
    out.write(
        "<li><b>IRM / LossDiff percentile</b>: the {event}.{score} percentiles, events left to right, on a log axis "
        "shared by every pair (bottom 0.02, faint lines at 0.1, 1 and 10, top 100; the shaded band is the bottom "
        f"{TAIL_PERCENTILE:.0f}% the built-in rules cut), and their values</li>\n"
        "<li><b>prompt, chosen, rejected</b>: one line each; click a line ending in … for the whole text</li>\n"
        "<li><b>next</b>: <code>--out suspects.csv</code> writes every pair with an empty <code>decision</code> "
        "column; fill it with keep, drop or flip, then <code>trl-select clean OUTPUT_DIR --decisions suspects.csv "
        "--out cleaned.jsonl</code> writes the fixed dataset</li>\n</ul>\n</details>\n"
    )
    out.write('<table>\n<colgroup><col class="rank"><col class="id"><col class="stat"><col class="dropped">')
    out.write('<col class="spark">' + ('<col class="prompt"><col><col>' if has_text else "") + "</colgroup>\n")
    headers = ["rank", "pair_id", "suspicion", "times_dropped", "IRM / LossDiff percentile"]
    headers += list(TEXT_COLUMNS) if has_text else []
    out.write("<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>\n<tbody>\n")
    for row in suspects:
        bar = f'<span class="bar" style="width:{max(0.0, min(row.statistic, 100.0)) * 0.4:.0f}px"></span>'
        statistic_cell = f"{row.statistic:.1f}" if math.isfinite(row.statistic) else "-"
        cells = [
            f'<td class="num">{row.rank}</td>',
            f'<td class="num">{escape(str(row.pair_id))}</td>',
            f'<td class="num">{statistic_cell}{bar}</td>',
            f'<td class="num">{row.times_dropped} of {len(row.percentiles)}</td>',
            f'<td class="spark">{sparkline_svg(row.percentiles)}{_percentile_caption(row.percentiles)}</td>',
        ]
        if has_text:
            cells += [_text_cell(column, getattr(row, column)) for column in TEXT_COLUMNS]
        out.write("<tr>" + "".join(cells) + "</tr>\n")
    out.write("</tbody>\n</table>\n</body>\n</html>\n")
    return out.getvalue()


# ----- wandb -----


def suspects_table(suspects: Sequence[Suspect], wandb: Any):
    """The ranking as a `wandb.Table` (built with the `wandb` module passed in): the columns of `to_record`."""
    records = records_of(suspects)
    columns = list(dict.fromkeys(key for record in records for key in record)) or ["rank", "pair_id", "suspicion"]
    return wandb.Table(columns=columns, data=[[record.get(c) for c in columns] for record in records])


# ----- the CLI subcommand -----

DEFAULT_PRINT_TOP = 20
DEFAULT_HTML_TOP = 200


def add_suspects_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `trl-select suspects` on the `trl-select` parser."""
    parser = subparsers.add_parser(
        "suspects",
        help="Rank a run's pairs by the evidence that their preference label is flipped (from its score files).",
        description="Read OUTPUT_DIR/selection/epoch_*.parquet (and any offline `trl-select score` files given) and "
        "rank the pairs by their suspicion: how low their IRM and LossDiff percentiles sat over the selection events. "
        "Print the top pairs and what the columns mean; --out and --html also write files. The text of each pair "
        "comes from the dataset the run recorded (OUTPUT_DIR/selection/pool_source.json), or from --dataset.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="A selective run's output_dir, a folder of score files, or a score file (.parquet); several are combined.",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="The training dataset, for each pair's text (default: the one the run recorded, if any).",
    )
    parser.add_argument("--split", default="train", help="Split of a DatasetDict directory (default: train).")
    parser.add_argument(
        "--top",
        type=int,
        default=None,
        help=f"How many pairs (default: {DEFAULT_PRINT_TOP} printed, all in .jsonl/.csv, {DEFAULT_HTML_TOP} in HTML).",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="Also write the ranking to FILE: .jsonl, .csv (with an empty `decision` column) or .html, by extension.",
    )
    parser.add_argument("--html", default=None, metavar="FILE", help="Also write the HTML report to FILE.")
    parser.add_argument(
        "--statistic",
        default=DEFAULT_STATISTIC,
        choices=sorted(SUSPECT_STATISTICS),
        help=f"How the evidence of the events is combined into the suspicion (default: {DEFAULT_STATISTIC}).",
    )
    parser.set_defaults(handler=run_suspects_command)


def run_suspects_command(args: argparse.Namespace) -> int:
    """The `suspects` handler: print the top pairs, write the files asked for; exit status 0, or 2 with the error on
    stderr."""
    if args.top is not None and args.top < 1:
        print("trl-select suspects: --top must be at least 1.", file=sys.stderr)
        return 2
    try:
        if args.dataset is not None:
            dataset, split, text_note = args.dataset, args.split, f"text from --dataset {args.dataset}"
        else:
            dataset, split, text_note = recorded_dataset(args.paths)
            split = split or args.split
        suspects = find_suspects(args.paths, dataset=dataset, statistic=args.statistic, split=split)
        source = " ".join(args.paths)
        written = []
        if args.out is not None:
            top = args.top if args.top is not None else _default_top(args.out)
            written.append(write_suspects(suspects[:top], args.out, args.statistic, source, text_note=text_note))
        if args.html is not None:
            top = args.top if args.top is not None else DEFAULT_HTML_TOP
            written.append(
                write_suspects(suspects[:top], args.html, args.statistic, source, format="html", text_note=text_note)
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"trl-select suspects: {error}", file=sys.stderr)
        return 2
    top = args.top if args.top is not None else DEFAULT_PRINT_TOP
    events = list(suspects[0].percentiles) if suspects else []
    print(
        f"{len(suspects)} pairs ranked by suspicion ({args.statistic}) over {len(events)} score events "
        f"({', '.join(events)})."
    )
    if dataset is not None:
        print(text_note[0].upper() + text_note[1:] + ".")
    else:
        print(f"No text of the pairs ({text_note}): --dataset PATH adds it.")
    print(f"Top {min(top, len(suspects))}, most likely mislabeled first:\n")
    print(format_table(suspects[:top]))
    print("\nColumns:")
    print("\n".join(legend_lines(args.statistic)))
    if written:
        print("\nWritten:")
        for path in written:
            print(path)
    else:
        print("Write every pair with --out FILE.csv|.jsonl (a `decision` column to fill in) or --html FILE.html.")
    return 0


def _default_top(path: str) -> int | None:
    return DEFAULT_HTML_TOP if Path(path).suffix.lower() in (".html", ".htm") else None


__all__ = [
    "DECISION_COLUMN",
    "add_suspects_command",
    "format_table",
    "legend_lines",
    "records_of",
    "run_suspects_command",
    "sparkline_svg",
    "suspects_html",
    "suspects_table",
    "write_suspects",
]
