"""`trl-select suspects`: the statistic on synthetic score files, the CLI outputs, the errors, the HTML report, the
wandb table, and that the module loads without torch."""

from __future__ import annotations

import csv
import html
import json
import re
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from benchmarks import render_suspects_report as render
from trl_select import find_suspects
from trl_select.callback import SelectionEvent
from trl_select.cli import main
from trl_select.reporting import KeepTally, WandbReporter, score_file_path, write_score_file
from trl_select.rules import band_intersection
from trl_select.suspects import (
    SUSPECT_STATISTICS,
    load_score_files,
    percentile_ranks,
    rank_suspects,
    split_implicit_prompt,
)
from trl_select.suspects_report import sparkline_svg, suspects_html, suspects_table, write_suspects


REPO = Path(__file__).resolve().parents[1]
HH_RUN = REPO / "benchmarks" / "results" / "suspects_hh_rlhf"  # the score files of a run on the HH-RLHF slice
HH_RLHF_SLICE = REPO / "tests" / "data" / "hh_rlhf" / "harmless-base-test.first72.jsonl"
POOL = 60
PLANTED = 17  # the pair whose label is "flipped": lowest IRM and LossDiff at every event


def event(epoch: int, seed: int, kind: str = "selection", pair_ids=None) -> SelectionEvent:
    rng = np.random.default_rng(seed)
    scores = {"irm": rng.normal(0.3, 0.3, POOL), "lossdiff": rng.normal(0.0, 0.05, POOL)}
    scores["irm"][PLANTED], scores["lossdiff"][PLANTED] = -2.0, -0.5
    if kind == "warmup":
        return SelectionEvent(epoch, 0, "warmup", "lossdiff_irm", list(range(POOL)), np.ones(POOL, dtype=bool))
    keep, bands = band_intersection(scores, {"lossdiff": (10.0, 90.0), "irm": (10.0, 90.0)})
    ids = list(range(POOL)) if pair_ids is None else pair_ids
    return SelectionEvent(epoch, 10 * epoch, kind, "lossdiff_irm", ids, keep, scores, bands)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run's score files, written by the trainer's own writer: a warm-up epoch, then two selection events."""
    out = tmp_path / "run"
    for epoch, kind in ((0, "warmup"), (1, "selection"), (2, "selection")):
        write_score_file(score_file_path(out, epoch), event(epoch, seed=epoch, kind=kind), np.ones(POOL, np.int32))
    return out


@pytest.fixture
def dataset_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"id": i, "prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(POOL)]
    rows[PLANTED]["chosen"] = "<script>alert('x')</script> & more"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----- the math -----


def test_percentile_ranks_are_mid_ranks_of_the_finite_values():
    p = percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0, np.nan, np.inf]))
    # finite values 3, 1, 2, 2 (n = 4): ranks 4, 1, 2.5, 2.5 -> 100 (r - 1/2) / 4
    np.testing.assert_allclose(p[:4], [87.5, 12.5, 50.0, 50.0])
    assert np.isnan(p[4:]).all()
    assert (percentile_ranks(np.ones(5)) == 50.0).all()


@pytest.mark.parametrize("statistic", sorted(SUSPECT_STATISTICS))
def test_a_planted_flipped_pair_ranks_first(run_dir, statistic):
    suspects = rank_suspects(load_score_files(run_dir), statistic=statistic)
    assert suspects[0].pair_id == PLANTED and suspects[0].rank == 1
    assert len(suspects) == POOL and [row.rank for row in suspects] == list(range(1, POOL + 1))
    values = [row.statistic for row in suspects]
    assert values == sorted(values, reverse=True)
    top = suspects[0]
    assert list(top.percentiles) == ["epoch_1", "epoch_2"]  # the warm-up file has no scores: skipped
    assert top.percentiles["epoch_1"] == {"irm": pytest.approx(50 / POOL), "lossdiff": pytest.approx(50 / POOL)}
    assert top.times_dropped == 2


def test_default_statistic_is_the_documented_formula(run_dir):
    events = load_score_files(run_dir)
    suspects = {row.pair_id: row for row in find_suspects(run_dir)}
    for pair_id in (0, PLANTED, 42):  # pair ids are the rows here
        # mean_log_odds: 100 σ(mean over events and scores of logit(q / 100)), q = 100 - percentile
        q = [100 - percentile_ranks(e.scores[s])[pair_id] for e in events for s in ("irm", "lossdiff")]
        log_odds = np.mean([np.log(v / (100 - v)) for v in q])
        assert suspects[pair_id].statistic == pytest.approx(100 / (1 + np.exp(-log_odds)))


def test_run_and_offline_files_combine_and_pools_must_match(run_dir, tmp_path):
    offline = tmp_path / "offline.parquet"
    write_score_file(offline, event(0, seed=9, kind="offline"), np.zeros(POOL, np.int32))
    suspects = find_suspects([run_dir, offline], top=3)
    assert len(suspects) == 3 and suspects[0].pair_id == PLANTED
    assert list(suspects[0].percentiles) == ["epoch_1", "epoch_2", "offline"]
    other = tmp_path / "other.parquet"
    write_score_file(other, event(0, seed=9, kind="offline", pair_ids=list(range(100, 100 + POOL))), np.zeros(POOL))
    with pytest.raises(ValueError, match="not the same pairs"):
        find_suspects([run_dir, other])


def test_the_score_file_layout_matches_the_writer():
    from trl_select import reporting, suspects

    assert suspects.SCORE_DIR == reporting.SCORE_DIR and suspects.METADATA_KEY == reporting.METADATA_KEY
    assert suspects.FORMAT_VERSION == reporting.FORMAT_VERSION
    table = reporting.score_table(event(1, seed=1), np.ones(POOL, np.int32), np.array(["a"] * POOL), "kind")
    assert set(table.column_names) - set(suspects.FIXED_COLUMNS) == {"irm", "lossdiff"}


def test_implicit_prompt_split():
    chosen = "\n\nHuman: hi\n\nAssistant: hello there"
    rejected = "\n\nHuman: hi\n\nAssistant: go away"
    assert split_implicit_prompt(chosen, rejected) == ("\n\nHuman: hi\n\nAssistant:", " hello there", " go away")
    assert split_implicit_prompt("abcX", "abcY") == ("abc", "X", "Y")


# ----- the CLI -----


def test_cli_prints_the_top_pairs_and_a_legend(run_dir, capsys):
    assert main(["suspects", str(run_dir), "--top", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    assert header.split() == [
        "rank", "pair_id", "suspicion", "times_dropped",
        "epoch_1.irm", "epoch_1.lossdiff", "epoch_2.irm", "epoch_2.lossdiff",
    ]  # fmt: skip
    first = lines[lines.index(header) + 1].split()
    assert first[:2] == ["1", str(PLANTED)]
    assert "Columns:" in out and "times_dropped:" in out and "0 = lowest of the pool" in out
    # the run recorded no pool source: the console says so and how to add the text
    assert "No text of the pairs" in out and "--dataset PATH adds it" in out


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_cli_writes_jsonl_and_csv_with_the_text(run_dir, dataset_file, tmp_path, suffix):
    out = tmp_path / f"suspects{suffix}"
    assert main(["suspects", str(run_dir), "--dataset", str(dataset_file), "--out", str(out)]) == 0
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
    assert len(rows) == POOL  # every pair by default in a file
    assert list(rows[0]) == [
        "rank", "pair_id", "suspicion", "times_dropped", "epoch_1.irm", "epoch_1.lossdiff", "epoch_2.irm",
        "epoch_2.lossdiff", "prompt", "chosen", "rejected", "decision",
    ]  # fmt: skip
    assert {row["decision"] for row in rows} == {""}  # for the reviewer to fill
    assert str(rows[0]["pair_id"]) == str(PLANTED) and rows[0]["chosen"].startswith("<script>")
    assert rows[1]["prompt"] == f"question {rows[1]['pair_id']}"


def test_cli_errors_name_the_fix(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["suspects", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "No score files" in err and "trl-select score" in err
    warmup_only = tmp_path / "warmup_only"
    write_score_file(score_file_path(warmup_only, 0), event(0, 0, kind="warmup"), np.ones(POOL, np.int32))
    assert main(["suspects", str(warmup_only)]) == 2
    assert "selection_warmup_epochs" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"id": 1000 + i, "chosen": "a", "rejected": "b"}) + "\n" for i in range(POOL)))
    assert main(["suspects", str(run_dir), "--dataset", str(wrong), "--top", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{POOL} of the {POOL} pair ids" in err and "Pass the dataset the run trained on" in err
    assert main(["suspects", str(run_dir), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".jsonl, .csv or .html" in capsys.readouterr().err
    assert main(["suspects", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----- the HTML report -----


class Structure(HTMLParser):
    """Tags, attributes and text of a page, as the standard library's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.rows_in_body = 0
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows_in_body += 1

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_and_escapes_the_text(run_dir, dataset_file, tmp_path):
    out = tmp_path / "report.html"
    assert main(["suspects", str(run_dir), "--dataset", str(dataset_file), "--html", str(out), "--top", "10"]) == 0
    page = out.read_text(encoding="utf-8")
    parsed = Structure()
    parsed.feed(page)
    assert "script" not in parsed.tags  # the pair's "<script>" is text, not a tag
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert any("<script>alert('x')</script> & more" in text for text in parsed.text)
    assert parsed.rows_in_body == 10 and parsed.tags.count("svg") == 10
    assert parsed.tags.count("style") == 1 and "link" not in parsed.tags and "img" not in parsed.tags
    urls = [value for name, value in parsed.attributes if name in ("src", "href") and value]
    assert urls == []  # nothing fetched
    assert all(not value.startswith("http") for name, value in parsed.attributes if value and name != "xmlns")


def _polylines(svg: str) -> list[list[float]]:
    """The y coordinates of each polyline of an SVG, in drawing order."""
    return [
        [float(point.split(",")[1]) for point in points.split()]
        for points in re.findall(r'<polyline points="([^"]+)"', svg)
    ]


def test_sparkline_draws_both_scores_on_one_axis_that_separates_the_top_suspects():
    svg = sparkline_svg({"epoch_1": {"irm": 1.0, "lossdiff": 50.0}, "epoch_2": {"irm": 2.0, "lossdiff": 99.0}})
    parsed = Structure()
    parsed.feed(svg)
    # IRM: a line with round dots; LossDiff: a dashed line with square markers
    assert parsed.tags.count("polyline") == 2 and parsed.tags.count("circle") == 2
    assert ("stroke-dasharray", "3 2") in parsed.attributes
    # Two top suspects, both in the bottom percents of the pool, must not draw the same flat line
    a = _polylines(sparkline_svg({"e1": {"irm": 0.1, "lossdiff": 0.2}, "e2": {"irm": 0.1, "lossdiff": 0.2}}))
    b = _polylines(sparkline_svg({"e1": {"irm": 3.0, "lossdiff": 5.0}, "e2": {"irm": 3.0, "lossdiff": 5.0}}))
    assert min(abs(ya - yb) for line_a, line_b in zip(a, b) for ya, yb in zip(line_a, line_b)) >= 5.0
    # ... and the axis is shared: the same percentile is the same height in any pair's sparkline
    c = _polylines(sparkline_svg({"e1": {"irm": 0.1, "lossdiff": 9.0}, "e2": {"irm": 0.1, "lossdiff": 9.0}}))
    assert c[0] == a[0] and c[1] != a[1]
    assert suspects_html([]).count("<tr>") == 1  # an empty ranking: the header row only


def test_html_rows_are_compact_and_long_texts_collapse_in_details(run_dir, tmp_path):
    long_answer = "A long answer that goes on. " * 20
    rows = [
        {"id": i, "prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": long_answer, "rejected": "no"}
        for i in range(POOL)
    ]
    dataset = tmp_path / "long.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report.html"
    assert main(["suspects", str(run_dir), "--dataset", str(dataset), "--html", str(out), "--top", "5"]) == 0
    page = out.read_text(encoding="utf-8")
    parsed = Structure()
    parsed.feed(page)
    headers = re.findall(r"<th>(.*?)</th>", page)
    assert headers == [
        "rank", "pair_id", "suspicion", "times_dropped", "IRM / LossDiff percentile", "prompt", "chosen", "rejected"
    ]  # fmt: skip
    # a long text and a text of several lines collapse (here the answer and the prompt of each row), plus the legend
    assert parsed.tags.count("details") == 2 * 5 + 1
    assert "<pre>" + html.escape(long_answer.strip()) + "</pre>" in page  # the whole text, one click away
    # a prompt's summary is its end, the last turn; a short one-line text is a plain span
    assert f"<summary>…Human: question {PLANTED}?</summary>" in page
    assert '<span class="short">no</span>' in page
    assert "script" not in parsed.tags


def test_recorded_pool_gives_the_text_and_dataset_overrides_it(run_dir, dataset_file, tmp_path, capsys):
    from trl_select.pool_source import record_pool_source

    record_pool_source(run_dir, location=dataset_file)
    html_out = tmp_path / "report.html"
    assert main(["suspects", str(run_dir), "--top", "3", "--html", str(html_out)]) == 0
    out = capsys.readouterr().out
    assert f"Text from {dataset_file.resolve()} (recorded by the run, sha256 checked)." in out
    assert "rank  pair_id  suspicion" in out and "question" in out  # the console table is printed with --html too
    assert out.rstrip().endswith(str(html_out))
    assert "&lt;script&gt;" in html_out.read_text()  # the planted pair's text, from the recorded file
    other = tmp_path / "other.jsonl"
    other.write_text(dataset_file.read_text().replace("question", "other question"))
    assert main(["suspects", str(run_dir), "--top", "3", "--dataset", str(other)]) == 0
    assert "other question" in capsys.readouterr().out
    dataset_file.write_text(dataset_file.read_text().replace("good", "fine"))  # the file changed since the run
    assert main(["suspects", str(run_dir), "--top", "3", "--html", str(html_out)]) == 0
    out = capsys.readouterr().out
    assert "changed since the run" in out and "--dataset PATH adds it" in out
    page = html_out.read_text()
    assert "No text of the pairs" in page and "--dataset PATH" in page and "changed since the run" in page


@pytest.mark.skipif(render.browser() is None, reason="needs headless Chromium (apt-get install -y chromium)")
def test_report_layout_in_chromium(tmp_path):
    """The HH-RLHF report, rendered: 25 rows or more on a 1400x1000 screen, no header cut, long texts collapsed."""
    suspects = find_suspects(HH_RUN, dataset=HH_RLHF_SLICE, top=40)
    page = tmp_path / "report.html"
    write_suspects(suspects, page, format="html", text_note="text from the HH-RLHF slice")
    layout = render.measure_layout(page, window=(1400, 1000))
    assert layout["rows"] == 40 and layout["sparklines"] == 40
    assert layout["rows_on_first_screen"] >= 25, layout
    assert layout["cut_headers"] == [] and "times_dropped" in layout["headers"]
    assert layout["details"] >= 40  # every HH-RLHF prompt is a long multi-turn transcript
    assert layout["scripts_in_report"] == 0


# ----- wandb -----


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


def test_wandb_reporter_logs_the_suspects_table(run_dir):
    fake_wandb = types.SimpleNamespace(Table=FakeTable)
    table = suspects_table(find_suspects(run_dir, top=4), fake_wandb)
    assert table.columns[:3] == ["rank", "pair_id", "suspicion"] and len(table.data) == 4
    assert table.data[0][1] == PLANTED

    wandb_module = types.SimpleNamespace(
        Table=FakeTable,
        Histogram=lambda np_histogram: np_histogram,
        Image=lambda image: image,
        plot=types.SimpleNamespace(scatter=lambda table, x, y, title: (x, y)),
    )
    reporter = WandbReporter(KeepTally(run_dir), log_figures=False, output_dir=run_dir, max_suspects=5)
    payload = reporter.payload(event(2, seed=2), wandb_module)
    suspects = payload["selection/suspects"]
    assert isinstance(suspects, FakeTable) and len(suspects.data) == 5 and suspects.data[0][1] == PLANTED
    assert "epoch_2.irm" in suspects.columns
    # a reporter without output_dir (or a warm-up event) logs no suspects table
    assert "selection/suspects" not in WandbReporter(KeepTally(run_dir), log_figures=False).payload(
        event(2, seed=2), wandb_module
    )


def test_suspects_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys, trl_select.suspects, trl_select.suspects_report, trl_select.cli, trl_select.cleaning, "
        "trl_select.pool_source; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


def test_benchmark_precision_and_recall_at_k():
    from benchmarks.suspects import precision_recall_at

    ranked = [3, 1, 4, 5, 9, 2, 6, 8, 7, 0]
    flipped = {3, 4, 0}
    assert precision_recall_at(ranked, flipped, pool_size=10, fraction=0.2) == (0.5, 1 / 3)  # top 2: 3, 1
    assert precision_recall_at(ranked, flipped, pool_size=10, fraction=0.3) == (2 / 3, 2 / 3)
    assert precision_recall_at(ranked, flipped, pool_size=10, fraction=1.0) == (0.3, 1.0)
