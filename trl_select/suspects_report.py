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

from .suspects import DEFAULT_STATISTIC, SUSPECT_STATISTICS, TAIL_PERCENTILE, TEXT_COLUMNS, Suspect, find_suspects


# ----- writers -----

LEGEND = {
    "rank": "1 = most likely mislabeled",
    "pair_id": "the pair's id (the dataset's `id` column, else its row index)",
    "suspicion": "the evidence that the label is flipped, 0-100: 100·σ(mean over events and scores of the log-odds "
    "of (100 - percentile)); 50 = an average pair, near 100 = at the bottom of IRM and LossDiff at every event",
    "times_dropped": "selection events whose rule left the pair out",
    "{event}.{score}": "the pair's percentile of that score at that event (0 = lowest of the pool; low IRM = the policy "
    "prefers the 'rejected' side, low LossDiff = the pair pulls against the validation data)",
}


def legend_lines(statistic: str = DEFAULT_STATISTIC) -> list[str]:
    """What each output column means, one line per column."""
    lines = []
    for column, meaning in LEGEND.items():
        if column == "suspicion":
            column = statistic
            if statistic != DEFAULT_STATISTIC:
                meaning = " ".join(SUSPECT_STATISTICS[statistic].__doc__.split())
        lines.append(f"  {column}: {meaning}")
    return lines


def records_of(suspects: Sequence[Suspect], statistic: str = DEFAULT_STATISTIC) -> list[dict[str, Any]]:
    return [row.to_record(statistic) for row in suspects]


def write_suspects(
    suspects: Sequence[Suspect],
    path: str | os.PathLike,
    statistic: str = DEFAULT_STATISTIC,
    source: str = "",
    format: str | None = None,
) -> Path:
    """Write the ranking to `path` as `format` (default: from the extension): `jsonl` (one JSON object a line, the
    columns of `Suspect.to_record`), `csv` (the same columns) or `html` (`suspects_html`, `source` in its header)."""
    path = Path(path)
    format = format or {".jsonl": "jsonl", ".csv": "csv", ".html": "html", ".htm": "html"}.get(path.suffix.lower())
    if format not in ("jsonl", "csv", "html"):
        raise ValueError(f"--out {path}: the extension picks the format; use .jsonl, .csv or .html.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "html":
        path.write_text(suspects_html(suspects, statistic=statistic, source=source), encoding="utf-8")
        return path
    records = records_of(suspects, statistic)
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


def format_table(suspects: Sequence[Suspect], statistic: str = DEFAULT_STATISTIC, text_width: int = 40) -> str:
    """The ranking as a fixed-width text table (the CLI's output without `--out`), text cut to `text_width`."""
    records = records_of(suspects, statistic)
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
_OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b")

_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta, ul.legend { color: #555; margin: 4px 0; }
ul.legend { padding-left: 18px; font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin-top: 12px; table-layout: fixed; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td pre { margin: 0; white-space: pre-wrap; word-break: break-word; max-height: 9em; overflow: auto;
  font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; }
td.chosen pre { background: #f1f8f1; } td.rejected pre { background: #fbf1f1; }
.pcts { font-size: 11px; color: #555; white-space: nowrap; }
.bar { display: inline-block; height: 8px; background: #d62728; vertical-align: middle; margin-left: 4px; }
.key { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin: 0 4px 0 10px; }
col.rank { width: 3.5em; } col.id { width: 6em; } col.stat { width: 8em; } col.spark { width: 150px; }
col.dropped { width: 7.5em; }
"""


def sparkline_svg(
    percentiles: Mapping[str, Mapping[str, float]],
    width: int = 120,
    height: int = 40,
    tail: float = TAIL_PERCENTILE,
) -> str:
    """An inline SVG of a pair's percentile of each score per event (x: events in order; y: 0 at the bottom, 100 at
    the top), the suspect tail `p < tail` shaded."""
    events = list(percentiles)
    names = list(dict.fromkeys(name for values in percentiles.values() for name in values))
    pad = 3

    def x(index: int) -> float:
        return pad + (width - 2 * pad) * (index / (len(events) - 1) if len(events) > 1 else 0.5)

    def y(value: float) -> float:
        return pad + (height - 2 * pad) * (1.0 - value / 100.0)

    title = "; ".join(
        f"{event}: " + ", ".join(f"{name} {values[name]:.0f}" for name in names if name in values)
        for event, values in percentiles.items()
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" class="sparkline"><title>{html.escape(title)}</title>',
        f'<rect x="0" y="{y(tail):.1f}" width="{width}" height="{y(0) - y(tail) + pad:.1f}" fill="#f8cfc8"/>',
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="none" stroke="#ccc"/>',
    ]
    for index, name in enumerate(names):
        colour = _SCORE_COLOURS.get(name, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])
        points = [
            (x(i), y(values[name]))
            for i, values in enumerate(percentiles.values())
            if name in values and math.isfinite(values[name])
        ]
        if len(points) > 1:
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{colour}"/>' for px, py in points]
    parts.append("</svg>")
    return "".join(parts)


def _percentile_caption(percentiles: Mapping[str, Mapping[str, float]]) -> str:
    """`irm 0.3 → 0.4` per score: the sparkline's values, events in order."""
    names = list(dict.fromkeys(name for values in percentiles.values() for name in values))
    lines = [
        html.escape(name) + " " + " → ".join(_short(values.get(name, math.nan)) for values in percentiles.values())
        for name in names
    ]
    return '<div class="pcts">' + "<br>".join(lines) + "</div>"


def _short(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def suspects_html(
    suspects: Sequence[Suspect],
    statistic: str = DEFAULT_STATISTIC,
    title: str = "Likely mislabeled preference pairs",
    source: str = "",
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no script, nothing fetched): the ranking as a table with each
    pair's text and its percentile history. Every piece of data text is HTML-escaped."""
    escape = html.escape
    names = list(dict.fromkeys(n for row in suspects for values in row.percentiles.values() for n in values))
    events = list(dict.fromkeys(e for row in suspects for e in row.percentiles))
    has_text = any(row.chosen is not None for row in suspects)
    keys = "".join(
        f'<span class="key" style="background:{_SCORE_COLOURS.get(n, _OTHER_COLOURS[i % len(_OTHER_COLOURS)])}">'
        f"</span>{escape(n)}"
        for i, n in enumerate(names)
    )
    out = io.StringIO()
    out.write('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n')
    out.write(f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n")
    out.write(f"<h1>{escape(title)}</h1>\n")
    meta = f"{len(suspects)} pairs ranked by <b>{escape(statistic)}</b> over {len(events)} score event(s): "
    meta += escape(", ".join(events)) + (f". Source: {escape(source)}" if source else "") + "."
    out.write(f'<p class="meta">{meta}</p>\n<ul class="legend">\n')
    for line in legend_lines(statistic):
        column, _, meaning = line.strip().partition(": ")
        out.write(f"<li><b>{escape(column)}</b>: {escape(meaning)}</li>\n")
    out.write(
        f"<li><b>history</b>: the {{event}}.{{score}} percentiles, events left to right ({keys}), and their values; the "
        f"shaded band is the bottom {TAIL_PERCENTILE:.0f}% the built-in rules cut</li>\n</ul>\n"
    )
    out.write('<table>\n<colgroup><col class="rank"><col class="id"><col class="stat"><col class="spark">')
    out.write('<col class="dropped">' + ("<col><col><col>" if has_text else "") + "</colgroup>\n<thead><tr>")
    headers = ["rank", "pair_id", statistic, "history", "times_dropped"] + (list(TEXT_COLUMNS) if has_text else [])
    out.write("".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>\n<tbody>\n")
    for row in suspects:
        bar = f'<span class="bar" style="width:{max(0.0, min(row.statistic, 100.0)) * 0.4:.0f}px"></span>'
        statistic_cell = f"{row.statistic:.1f}" if math.isfinite(row.statistic) else "-"
        cells = [
            f'<td class="num">{row.rank}</td>',
            f'<td class="num">{escape(str(row.pair_id))}</td>',
            f'<td class="num">{statistic_cell}{bar}</td>',
            f"<td>{sparkline_svg(row.percentiles)}{_percentile_caption(row.percentiles)}</td>",
            f'<td class="num">{row.times_dropped}</td>',
        ]
        if has_text:
            cells += [
                f'<td class="{column}"><pre>{escape((getattr(row, column) or "").strip())}</pre></td>'
                for column in TEXT_COLUMNS
            ]
        out.write("<tr>" + "".join(cells) + "</tr>\n")
    out.write("</tbody>\n</table>\n</body>\n</html>\n")
    return out.getvalue()


# ----- wandb -----


def suspects_table(suspects: Sequence[Suspect], wandb: Any, statistic: str = DEFAULT_STATISTIC):
    """The ranking as a `wandb.Table` (built with the `wandb` module passed in): the columns of `to_record`."""
    records = records_of(suspects, statistic)
    columns = list(dict.fromkeys(key for record in records for key in record)) or ["rank", "pair_id", statistic]
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
        "Without --out, print the top pairs and what the columns mean.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="A selective run's output_dir, a folder of score files, or a score file (.parquet); several are combined.",
    )
    parser.add_argument("--dataset", default=None, help="The training dataset, to show each pair's text.")
    parser.add_argument("--split", default="train", help="Split of a DatasetDict directory (default: train).")
    parser.add_argument(
        "--top",
        type=int,
        default=None,
        help=f"How many pairs (default: {DEFAULT_PRINT_TOP} printed, all in .jsonl/.csv, {DEFAULT_HTML_TOP} in HTML).",
    )
    parser.add_argument("--out", default=None, help="Write the ranking to FILE: .jsonl, .csv or .html by extension.")
    parser.add_argument("--html", default=None, metavar="FILE", help="Also write the HTML report to FILE.")
    parser.add_argument(
        "--statistic",
        default=DEFAULT_STATISTIC,
        choices=sorted(SUSPECT_STATISTICS),
        help=f"How the evidence of the events is combined (default: {DEFAULT_STATISTIC}).",
    )
    parser.set_defaults(handler=run_suspects_command)


def run_suspects_command(args: argparse.Namespace) -> int:
    """The `suspects` handler: exit status 0, or 2 with the error on stderr."""
    if args.top is not None and args.top < 1:
        print("trl-select suspects: --top must be at least 1.", file=sys.stderr)
        return 2
    try:
        suspects = find_suspects(args.paths, dataset=args.dataset, statistic=args.statistic, split=args.split)
        source = " ".join(args.paths)
        written = []
        if args.out is not None:
            top = args.top if args.top is not None else _default_top(args.out)
            written.append(write_suspects(suspects[:top], args.out, args.statistic, source))
        if args.html is not None:
            top = args.top if args.top is not None else DEFAULT_HTML_TOP
            written.append(write_suspects(suspects[:top], args.html, args.statistic, source, format="html"))
    except (FileNotFoundError, ValueError) as error:
        print(f"trl-select suspects: {error}", file=sys.stderr)
        return 2
    if not written:
        top = args.top if args.top is not None else DEFAULT_PRINT_TOP
        events = list(suspects[0].percentiles) if suspects else []
        print(
            f"{len(suspects)} pairs ranked by {args.statistic} over {len(events)} score events ({', '.join(events)})."
        )
        print(f"Top {min(top, len(suspects))}, most likely mislabeled first:\n")
        print(format_table(suspects[:top], args.statistic))
        print("\nColumns:")
        print("\n".join(legend_lines(args.statistic)))
        print("Write every pair with --out FILE.jsonl|.csv|.html (--dataset PATH adds the text).")
    for path in written:
        print(path)
    return 0


def _default_top(path: str) -> int | None:
    return DEFAULT_HTML_TOP if Path(path).suffix.lower() in (".html", ".htm") else None


__all__ = [
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
