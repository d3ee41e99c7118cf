"""Render the `trl-select suspects` HTML report in headless Chromium: measure its layout, and take the screenshot.

    apt-get install -y chromium                                       # Debian; any Chromium or Chrome binary works
    accelerate launch recipes/dpo_lossdiff_irm.py                     # the demo run (score files, pool_source.json)
    python -m benchmarks.render_suspects_report                       # -> docs/suspects_report.png
    python -m benchmarks.render_suspects_report benchmarks/results/suspects_hh_rlhf \
        --dataset tests/data/hh_rlhf/harmless-base-test.first72.jsonl --out docs/suspects_report_hh_rlhf.png

Steps: `find_suspects(OUTPUT_DIR, dataset)` (the dataset the run recorded unless `--dataset`) -> the HTML report
(`suspects_report.write_suspects`, the file `trl-select suspects --html` writes) -> `measure_layout`: a copy of the
page with a measuring script, loaded by `chromium --headless --dump-dom` at the screenshot's window size, reports how
many rows are wholly on the first screen, whether any column header is cut, the `<details>` elements and sparklines
(the report itself has no script) -> `chromium --headless --screenshot --window-size=1400,1000`. The page fetches
nothing, so it renders the same offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from trl_select.suspects import find_suspects, recorded_dataset
from trl_select.suspects_report import write_suspects


REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmarks.render_suspects_report")

DEMO_OUTPUT = REPO / "outputs" / "dpo-lossdiff-irm-demo"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 1000)
# What the report promises a reviewer on one 1400x1000 screen.
MIN_ROWS_PER_SCREEN = 25

_MEASURE = """<script>
(function () {
  var rows = Array.from(document.querySelectorAll('tbody tr'));
  var heads = Array.from(document.querySelectorAll('thead th'));
  var result = {
    rows: rows.length,
    viewport: [window.innerWidth, window.innerHeight],
    rows_on_first_screen: rows.filter(function (r) { return r.getBoundingClientRect().bottom <= window.innerHeight; }).length,
    row_heights: rows.map(function (r) { return Math.round(r.getBoundingClientRect().height); }),
    headers: heads.map(function (h) { return h.textContent; }),
    cut_headers: heads.filter(function (h) { return h.scrollWidth > h.clientWidth + 1; }).map(function (h) { return h.textContent; }),
    details: document.querySelectorAll('tbody details').length,
    sparklines: document.querySelectorAll('tbody svg').length,
    scripts_in_report: %d
  };
  var out = document.createElement('pre');
  out.id = 'layout-measure';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
})();
</script>"""


def browser() -> str | None:
    """The first Chromium or Chrome binary on the PATH, or `None`."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = browser()
    if binary is None:
        raise SystemExit(f"No headless browser found (looked for {', '.join(BROWSERS)}): apt-get install -y chromium.")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def measure_layout(html_path: Path, window: tuple[int, int] = WINDOW) -> dict:
    """The rendered layout of a report at `window` (width, height): `rows`, `rows_on_first_screen` (rows whose
    bottom is on the first screen), `row_heights`, `headers`, `cut_headers` (headers wider than their column),
    `details` and `sparklines` in the table body, and `scripts_in_report` (the report's own `<script>` tags)."""
    page = html_path.read_text(encoding="utf-8")
    scripts = len(re.findall(r"<script\b", page, flags=re.IGNORECASE))
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "measure.html"
        probe.write_text(page.replace("</body>", (_MEASURE % scripts) + "\n</body>"), encoding="utf-8")
        dom = chromium(f"--window-size={window[0]},{window[1]}", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="layout-measure">(.*?)</pre>', dom, flags=re.DOTALL)
    if found is None:
        raise RuntimeError(f"Chromium did not run the measuring script on {html_path}.")
    return json.loads(
        found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", type=Path, default=DEMO_OUTPUT, help="a run's output_dir")
    parser.add_argument("--dataset", type=Path, default=None, help="its training data (default: what it recorded)")
    parser.add_argument("--top", type=int, default=40, help="pairs in the report")
    parser.add_argument("--html", type=Path, default=None, help="where to keep the HTML (default: next to --out)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "suspects_report.png", help="the screenshot")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    html_path = options.html or options.out.with_suffix(".html")
    if options.dataset is not None:
        dataset, note = options.dataset, f"text from {options.dataset.name}"
    else:
        dataset, _, note = recorded_dataset(options.output_dir)
        if dataset is not None:
            note = f"text from {Path(dataset).name} (recorded by the run, sha256 checked)"
    suspects = find_suspects(options.output_dir, dataset=dataset, top=options.top)
    source = f"{options.output_dir.name}/selection"
    write_suspects(suspects, html_path, source=source, format="html", text_note=note)

    layout = measure_layout(html_path)
    logger.info("Layout at %dx%d: %s", *WINDOW, json.dumps({k: v for k, v in layout.items() if k != "row_heights"}))
    problems = []
    if layout["rows"] != len(suspects) or layout["sparklines"] != len(suspects):
        problems.append(f"{layout['rows']} rows and {layout['sparklines']} sparklines for {len(suspects)} pairs")
    if layout["rows_on_first_screen"] < min(MIN_ROWS_PER_SCREEN, len(suspects)):
        problems.append(f"only {layout['rows_on_first_screen']} rows on the first screen")
    if layout["cut_headers"]:
        problems.append(f"headers cut: {layout['cut_headers']}")
    if layout["scripts_in_report"]:
        problems.append("the report has a <script>")
    if problems:
        raise SystemExit("The report's layout fails: " + "; ".join(problems))

    options.out.parent.mkdir(parents=True, exist_ok=True)
    chromium(
        f"--screenshot={options.out.resolve()}", f"--window-size={WINDOW[0]},{WINDOW[1]}", html_path.resolve().as_uri()
    )
    logger.info("Screenshot: %s", options.out)
    if options.html is None:
        html_path.unlink()


if __name__ == "__main__":
    main()
