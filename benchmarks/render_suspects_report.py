"""Render the `trl-select suspects` HTML report in headless Chromium: check that it loads, and take the screenshot.

    apt-get install -y chromium                                       # Debian; any Chromium or Chrome binary works
    python recipes/dpo_lossdiff_irm.py                                # the demo run (writes the score files)
    python -m benchmarks.render_suspects_report                       # -> docs/suspects_report.png
    python -m benchmarks.render_suspects_report OUTPUT_DIR --dataset train.jsonl --out shot.png --top 30

Steps: `find_suspects(OUTPUT_DIR, dataset)` -> the HTML report (`suspects_report.write_suspects`, the file `trl-select
suspects --html` writes) -> `chromium --headless --dump-dom` (the parsed page must hold the table, one row per pair,
one inline SVG per row) -> `chromium --headless --screenshot --window-size=1280,900`. The page has no script and
fetches nothing, so it renders the same offline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from trl_select.suspects import find_suspects
from trl_select.suspects_report import write_suspects


REPO = Path(__file__).resolve().parents[1]


DEMO_OUTPUT = REPO / "outputs" / "dpo-lossdiff-irm-demo"
DEMO_TRAIN = REPO / "recipes" / "data" / "reverse_digits" / "train.jsonl"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"No headless browser found (looked for {', '.join(BROWSERS)}): apt-get install -y chromium.")


def chromium(*args: str) -> subprocess.CompletedProcess:
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEMO_OUTPUT, help="a run's output_dir")
    parser.add_argument("--dataset", type=Path, default=DEMO_TRAIN, help="its training data (for the text)")
    parser.add_argument("--top", type=int, default=25, help="pairs in the report")
    parser.add_argument("--html", type=Path, default=None, help="where to keep the HTML (default: next to --out)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "suspects_report.png", help="the screenshot")
    options = parser.parse_args()

    html_path = options.html or options.out.with_suffix(".html")
    suspects = find_suspects(options.output_dir, dataset=options.dataset, top=options.top)
    source = f"{options.output_dir.name}/selection, text from {options.dataset.name}"
    write_suspects(suspects, html_path, source=source, format="html")
    url = html_path.resolve().as_uri()

    dom = chromium("--dump-dom", url).stdout
    rows, svgs = dom.count("<tr>") - 1, dom.count("<svg")  # the header row is a <tr> too
    if rows != len(suspects) or svgs != len(suspects):
        raise SystemExit(f"Chromium's DOM has {rows} rows and {svgs} sparklines, expected {len(suspects)} of each.")
    print(f"Chromium parsed {html_path}: {rows} rows, {svgs} inline SVG sparklines, no script.")

    options.out.parent.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={options.out.resolve()}", "--window-size=1280,900", url)
    print(f"Screenshot: {options.out}")
    if options.html is None:
        html_path.unlink()


if __name__ == "__main__":
    main()
