"""`trl-select clean`: decisions checked before anything is written, flips in text and conversational formats, round
trips on the shipped HH-RLHF slice and on the demo pool, and the policies over a run's ranking."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from trl_select.cleaning import paired_columns, parse_count, read_decisions
from trl_select.cli import main
from trl_select.event import SelectionEvent
from trl_select.pool_source import file_sha256, record_pool_source
from trl_select.rules import band_intersection
from trl_select.score_files import score_file_path, write_score_file
from trl_select.suspects import find_suspects


REPO = Path(__file__).resolve().parents[1]
HH_RLHF_SLICE = REPO / "tests" / "data" / "hh_rlhf" / "harmless-base-test.first72.jsonl"
DEMO_POOL = REPO / "recipes" / "data" / "reverse_digits" / "train.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_decisions(path: Path, rows: list[dict]) -> Path:
    """A reviewed suspects CSV: the columns `trl-select suspects --out` writes that `clean` reads."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "pair_id", "suspicion", "decision"])
        writer.writeheader()
        for rank, row in enumerate(rows, start=1):
            writer.writerow({"rank": rank, "suspicion": 90.0, **row})
    return path


def messages(transcript: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as a list of chat messages."""
    turns = re.split(r"\n\n(Human|Assistant): ", transcript)
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": text}
        for speaker, text in zip(turns[1::2], turns[2::2], strict=True)
    ]


# ----- refusals -----


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"pair_id": 3, "decision": "drop"}, {"pair_id": 5, "decision": "remove"}], "line 3 (pair_id 5): decision 'remove'"),
        ([{"pair_id": 3, "decision": "drop"}, {"pair_id": 3, "decision": "flip"}], "line 3 decides pair_id 3 again (first on line 2)"),
        ([{"pair_id": 3, "decision": "drop"}, {"pair_id": 9999, "decision": "flip"}], "line 3: pair_id 9999 is not in --dataset"),
        ([{"pair_id": "", "decision": "drop"}], "line 2 has no pair_id"),
    ],
)  # fmt: skip
def test_bad_decisions_are_refused_naming_the_row_and_nothing_is_written(tmp_path, capsys, rows, message):
    decisions = write_decisions(tmp_path / "decisions.csv", rows)
    out = tmp_path / "cleaned.jsonl"
    assert main(["clean", "--dataset", str(DEMO_POOL), "--decisions", str(decisions), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(decisions) in err
    assert not out.exists() and not (tmp_path / "cleaned.jsonl.manifest.json").exists()


def test_other_refusals_name_the_fix(tmp_path, capsys):
    no_column = tmp_path / "no_decision.csv"
    no_column.write_text("rank,pair_id\n1,3\n")
    out = tmp_path / "cleaned.jsonl"
    assert main(["clean", "--dataset", str(DEMO_POOL), "--decisions", str(no_column), "--out", str(out)]) == 2
    assert "has no `decision` column" in capsys.readouterr().err
    decisions = write_decisions(tmp_path / "d.csv", [{"pair_id": 3, "decision": "drop"}])
    wrong_format = tmp_path / "cleaned.parquet"
    assert main(["clean", "--dataset", str(DEMO_POOL), "--decisions", str(decisions), "--out", str(wrong_format)]) == 2
    assert "so the cleaned one is too: name it *.jsonl" in capsys.readouterr().err
    assert main(["clean", "--dataset", str(DEMO_POOL), "--decisions", str(decisions), "--out", str(DEMO_POOL)]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert main(["clean", "--dataset", str(DEMO_POOL), "--drop-top", "10%", "--out", str(out)]) == 2
    assert "pass its OUTPUT_DIR" in capsys.readouterr().err
    assert main(["clean", "--decisions", str(decisions), "--out", str(out)]) == 2
    assert "Pass --dataset PATH" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="--drop-top 1x"):
        parse_count("1x", 100, "--drop-top")
    assert parse_count("10%", 2000, "--drop-top") == 200 and parse_count("7", 5, "--flip-top") == 5


def test_decisions_read_case_insensitively_and_empty_cells_are_undecided(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"pair_id": 1, "decision": " Flip "}, {"pair_id": 2, "decision": ""}, {"pair_id": 3, "decision": None}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    decisions = read_decisions(path)
    assert [(d.pair_id, d.decision, d.line) for d in decisions] == [(1, "flip", 1)]
    spreadsheet = tmp_path / "saved_by_a_spreadsheet.csv"  # pair_id first, behind a byte-order mark
    spreadsheet.write_bytes("pair_id,decision\r\n7,Drop\r\n8,\r\n".encode("utf-8-sig"))
    assert [(d.pair_id, d.decision, d.line) for d in read_decisions(spreadsheet)] == [("7", "drop", 2)]


def test_flip_swaps_paired_columns():
    assert paired_columns(["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "chosen_model"]) == [
        ("chosen", "rejected"),
        ("score_chosen", "score_rejected"),
    ]


# ----- round trips -----


def test_hh_rlhf_slice_round_trip_keeps_the_real_text(tmp_path):
    source = read_jsonl(HH_RLHF_SLICE)  # no id column: pair ids are row indices
    drop, flip = {0, 15, 71}, {5, 41}
    decisions = write_decisions(
        tmp_path / "d.csv",
        [{"pair_id": i, "decision": "drop"} for i in drop]
        + [{"pair_id": i, "decision": "flip"} for i in flip]
        + [{"pair_id": 2, "decision": "keep"}, {"pair_id": 3, "decision": ""}],
    )
    out = tmp_path / "hh.cleaned.jsonl"
    assert main(["clean", "--dataset", str(HH_RLHF_SLICE), "--decisions", str(decisions), "--out", str(out)]) == 0
    expected = [
        {"chosen": row["rejected"], "rejected": row["chosen"]} if i in flip else row
        for i, row in enumerate(source)
        if i not in drop
    ]
    assert read_jsonl(out) == expected and len(expected) == 72 - 3
    # the unchanged lines are the source's bytes
    source_lines = HH_RLHF_SLICE.read_text(encoding="utf-8").splitlines()
    out_lines = out.read_text(encoding="utf-8").splitlines()
    kept = [i for i in range(72) if i not in drop]
    assert all(out_lines[k] == source_lines[i] for k, i in enumerate(kept) if i not in flip)
    assert "\n\nHuman:" in read_jsonl(out)[4]["rejected"]  # pair 5, flipped: the whole transcript moved
    manifest = json.loads((tmp_path / "hh.cleaned.jsonl.manifest.json").read_text())
    assert manifest["source"]["files"][0]["sha256"] == file_sha256(HH_RLHF_SLICE)
    assert (
        manifest["source"]["files"][0]["sha256"] == "bd526f2eae03bcd189893404eb76408b0839e7ec973465edf93c186d45104478"
    )
    assert manifest["output"]["files"][0]["sha256"] == file_sha256(out)
    assert manifest["counts"] == {"dropped": 3, "flipped": 2, "kept_unchanged": 67, "decided_keep": 1}
    assert [(c["pair_id"], c["decision"]) for c in manifest["changes"]] == [
        (0, "drop"), (5, "flip"), (15, "drop"), (41, "flip"), (71, "drop")
    ]  # fmt: skip
    assert manifest["decisions"]["sha256"] == file_sha256(decisions)


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_conversational_messages_flip_in_parquet_and_save_to_disk(tmp_path, layout):
    """The HH-RLHF slice as conversational data: a shared prompt of messages, chosen/rejected the last reply."""
    rows = []
    for i, row in enumerate(read_jsonl(HH_RLHF_SLICE)[:20]):
        chosen, rejected = messages(row["chosen"]), messages(row["rejected"])
        rows.append({"id": f"hh-{i}", "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:],
                     "score_chosen": 8.0, "score_rejected": 2.0})  # fmt: skip
    train = Dataset.from_list(rows)
    if layout == "parquet":
        source, out = tmp_path / "train.parquet", tmp_path / "cleaned.parquet"
        train.to_parquet(str(source))
    else:
        source, out = tmp_path / "pairs", tmp_path / "cleaned"
        DatasetDict({"train": train, "test": train.select(range(3))}).save_to_disk(str(source))
    decisions = write_decisions(
        tmp_path / "d.csv", [{"pair_id": "hh-4", "decision": "flip"}, {"pair_id": "hh-7", "decision": "drop"}]
    )
    assert main(["clean", "--dataset", str(source), "--decisions", str(decisions), "--out", str(out)]) == 0
    if layout == "parquet":
        cleaned = Dataset.from_parquet(str(out))
    else:
        saved = load_from_disk(str(out))
        assert saved["test"].to_list() == train.select(range(3)).to_list()  # the other split as it was
        cleaned = saved["train"]
    assert cleaned["id"] == [row["id"] for row in rows if row["id"] != "hh-7"]
    flipped = cleaned[cleaned["id"].index("hh-4")]
    assert flipped["chosen"] == rows[4]["rejected"] and flipped["rejected"] == rows[4]["chosen"]
    assert flipped["chosen"][0]["role"] == "assistant" and flipped["prompt"] == rows[4]["prompt"]
    assert (flipped["score_chosen"], flipped["score_rejected"]) == (2.0, 8.0)
    untouched = cleaned[cleaned["id"].index("hh-5")]
    assert untouched == rows[5]


# ----- the demo pool and the policies -----


@pytest.fixture
def demo_run(tmp_path) -> Path:
    """Score files of the demo pool (2000 pairs) whose flipped pairs score low, and the record of its file."""
    pool = read_jsonl(DEMO_POOL)
    ids = [row["id"] for row in pool]
    flipped = np.array([row["flipped"] for row in pool])
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for epoch in (1, 2):
        scores = {name: rng.normal(0.0, 1.0, len(ids)) - 1.5 * flipped for name in ("irm", "lossdiff")}
        keep, bands = band_intersection(scores, {"lossdiff": (10.0, 90.0), "irm": (10.0, 90.0)})
        event = SelectionEvent(epoch, 10 * epoch, "selection", "lossdiff_irm", ids, keep, scores, bands)
        write_score_file(score_file_path(run, epoch), event, np.ones(len(ids), np.int32))
    record_pool_source(run, location=DEMO_POOL)
    return run


def test_demo_pool_review_loop(demo_run, tmp_path, capsys):
    """suspects -> decisions -> clean: the cleaned pool is the pool minus the dropped ids, with the flips applied."""
    suspects_csv = tmp_path / "suspects.csv"
    assert main(["suspects", str(demo_run), "--out", str(suspects_csv)]) == 0
    with suspects_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2000 and rows[0]["decision"] == "" and rows[0]["chosen"]  # text from the recorded pool
    for row in rows[:30]:
        row["decision"] = "flip"
    for row in rows[30:50]:
        row["decision"] = "drop"
    with suspects_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "cleaned.jsonl"
    assert main(["clean", str(demo_run), "--decisions", str(suspects_csv), "--out", str(out)]) == 0
    assert "2000 pairs -> 1980 (20 dropped, 30 flipped)" in capsys.readouterr().out
    dropped = {int(row["pair_id"]) for row in rows[30:50]}
    flips = {int(row["pair_id"]) for row in rows[:30]}
    pool = read_jsonl(DEMO_POOL)
    cleaned = {row["id"]: row for row in read_jsonl(out)}
    assert set(cleaned) == {row["id"] for row in pool} - dropped
    for row in pool:
        if row["id"] in flips:
            assert (cleaned[row["id"]]["chosen"], cleaned[row["id"]]["rejected"]) == (row["rejected"], row["chosen"])
        elif row["id"] not in dropped:
            assert cleaned[row["id"]] == row


def test_policies_drop_or_flip_the_top_of_the_ranking(demo_run, tmp_path):
    ranking = [row.pair_id for row in find_suspects(demo_run)]
    out = tmp_path / "dropped.jsonl"
    assert main(["clean", str(demo_run), "--drop-top", "10%", "--out", str(out)]) == 0
    assert {row["id"] for row in read_jsonl(out)} == set(ranking[200:])
    manifest = json.loads((tmp_path / "dropped.jsonl.manifest.json").read_text())
    assert manifest["decisions"]["policy"] == "--drop-top 10%" and manifest["counts"]["dropped"] == 200
    assert [c["rank"] for c in sorted(manifest["changes"], key=lambda c: c["rank"])] == list(range(1, 201))
    flipped_out = tmp_path / "flipped.jsonl"
    assert main(["clean", str(demo_run), "--flip-top", "25", "--out", str(flipped_out)]) == 0
    pool = {row["id"]: row for row in read_jsonl(DEMO_POOL)}
    cleaned = read_jsonl(flipped_out)
    assert len(cleaned) == 2000
    swapped = {row["id"] for row in cleaned if row["chosen"] != pool[row["id"]]["chosen"]}
    assert swapped == set(ranking[:25])
    # the planted signal: most of the top of the ranking is the demo's known-flipped pairs
    assert sum(pool[i]["flipped"] for i in ranking[:200]) > 150


def test_clean_starts_without_torch_transformers_or_trl(tmp_path):
    decisions = write_decisions(tmp_path / "d.csv", [{"pair_id": 3, "decision": "flip"}])
    code = (
        "import sys\nfrom trl_select.cli import main\n"
        f"assert main(['clean', '--dataset', {str(DEMO_POOL)!r}, '--decisions', {str(decisions)!r}, "
        f"'--out', {str(tmp_path / 'out.jsonl')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]"
