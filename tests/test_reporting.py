"""Score files, the wandb views and the per-category scalars: pure helpers, file round trips, and a real offline run."""

from __future__ import annotations

import copy
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import wandb
from datasets import Dataset
from transformers import TrainerState

from trl_select import SelectiveDPOConfig, SelectiveDPOTrainer, read_history
from trl_select.callback import SelectionEvent
from trl_select.cli import main
from trl_select.history import SelectionHistory
from trl_select.plots import event_figure
from trl_select.reporting import (
    KeepTally,
    WandbReporter,
    kept_fraction_by_category,
    metric_safe,
    ordered_score_names,
    pool_categories,
    read_score_file,
    read_score_files,
    resolve_category_column,
    scatter_rows,
    score_file_path,
    selection_scalars,
    write_score_file,
)
from trl_select.rules import band_intersection
from trl_select.testing import build_tiny_llama

from .testing_utils import fast_config


def synthetic_event(num_pairs: int, epoch: int = 1, seed: int = 0, float32_scores: bool = True, ids=None):
    """A LossDiff-IRM selection event over `num_pairs` pairs, with the bands applied by the real rule."""
    rng = np.random.default_rng(seed)
    scores = {"irm": rng.normal(0.3, 0.3, num_pairs), "lossdiff": rng.normal(0.0, 0.05, num_pairs)}
    if float32_scores:  # what the trainer produces: float32 log-probs, cast to float64
        scores = {name: values.astype(np.float32).astype(np.float64) for name, values in scores.items()}
    keep, bands = band_intersection(scores, {"lossdiff": (10.0, 90.0), "irm": (10.0, 90.0)})
    return SelectionEvent(
        epoch=epoch,
        global_step=7 * epoch,
        kind="selection",
        rule="lossdiff_irm",
        pair_ids=list(range(num_pairs)) if ids is None else ids,
        keep=keep,
        scores=scores,
        bands=bands,
        metrics={
            "selection/epoch": float(epoch),
            "selection/kept_fraction": float(keep.mean()),
            "selection/aux/val_loss_before": 0.69,
            "selection/aux/val_loss_after": 0.61,
            "selection/seconds": 1.25,
            "selection/seconds_policy": 0.5,
        },
        aux_refreshed=True,
    )


def warmup_event(num_pairs: int, ids=None) -> SelectionEvent:
    ids = list(range(num_pairs)) if ids is None else ids
    return SelectionEvent(0, 0, "warmup", "lossdiff_irm", ids, np.ones(num_pairs, dtype=bool))


# ----- score files -----


def test_score_file_round_trips_every_field(tmp_path):
    event = synthetic_event(500, float32_scores=False, ids=[f"pair-{i}" for i in range(500)])
    event.scores["irm"][[3, 4, 5]] = [np.nan, np.inf, -np.inf]  # non-finite scores are recorded as they are
    event.keep[[3, 4, 5]] = False
    categories = np.asarray(["web", "books", "code/python"] * 166 + ["web", "web"], dtype=object)
    times_kept = np.arange(500) % 3
    path = write_score_file(score_file_path(tmp_path, 1), event, times_kept, categories, "source")

    assert path == tmp_path / "selection" / "epoch_1.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["epoch_1.parquet"]  # no temporary file left behind
    schema = pq.read_schema(path)
    assert schema.names == ["epoch", "pair_id", "lossdiff", "irm", "kept", "times_kept_so_far", "category"]
    assert str(schema.field("irm").type) == "double"  # float32 would round these scores: kept as float64

    read = read_score_file(path)
    assert read.event.pair_ids == event.pair_ids
    np.testing.assert_array_equal(read.event.keep, event.keep)
    assert read.event.scores.keys() == event.scores.keys()
    for name, values in event.scores.items():
        np.testing.assert_array_equal(read.event.scores[name], values)  # bit for bit, NaN and inf included
    assert read.event.bands == event.bands
    assert (read.event.epoch, read.event.global_step, read.event.kind, read.event.rule) == (
        1,
        7,
        "selection",
        "lossdiff_irm",
    )
    assert read.event.aux_refreshed is True
    # Timings vary between identical runs, so files leave them out; every other metric survives
    assert read.event.metrics == {k: v for k, v in event.metrics.items() if not k.startswith("selection/seconds")}
    np.testing.assert_array_equal(read.times_kept, times_kept)
    assert read.categories.tolist() == categories.tolist() and read.category_column == "source"
    # The band limits in the file decide exactly the kept flags in the file
    recomputed = np.logical_and.reduce(
        [(read.event.scores[n] >= b.lo) & (read.event.scores[n] <= b.hi) for n, b in read.event.bands.items()]
    )
    np.testing.assert_array_equal(recomputed, read.event.keep)


def test_float32_scores_are_stored_as_float32_without_loss(tmp_path):
    event = synthetic_event(200)
    path = write_score_file(tmp_path / "e.parquet", event, np.ones(200, dtype=int))
    assert {str(pq.read_schema(path).field(n).type) for n in ("lossdiff", "irm")} == {"float"}
    for name, values in event.scores.items():
        np.testing.assert_array_equal(read_score_file(path).event.scores[name], values)


def test_warmup_score_file_keeps_everything_and_has_no_scores(tmp_path):
    path = write_score_file(score_file_path(tmp_path, 0), warmup_event(50), np.ones(50, dtype=int))
    assert pq.read_schema(path).names == ["epoch", "pair_id", "kept", "times_kept_so_far"]
    read = read_score_file(path)
    assert read.event.kind == "warmup" and read.event.scores == {} and read.event.bands == {}
    assert read.event.keep.all() and read.categories is None


def test_score_files_are_read_in_epoch_order_and_overwritten_whole(tmp_path):
    for epoch in (10, 2, 1):
        write_score_file(score_file_path(tmp_path, epoch), synthetic_event(30, epoch=epoch), np.ones(30, dtype=int))
    write_score_file(score_file_path(tmp_path, 2), synthetic_event(40, epoch=2), np.ones(40, dtype=int))
    files = read_score_files(tmp_path)
    assert [f.event.epoch for f in files] == [1, 2, 10]
    assert len(files[1].event.pair_ids) == 40
    pq.write_table(pq.read_table(files[0].path).replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="not a trl-select score file"):
        read_score_file(tmp_path / "plain.parquet")


def test_score_file_of_a_60k_pair_pool_is_compact(tmp_path):
    """The documented size: two float32 scores and integer ids, about 0.45 MB for 60,000 pairs."""
    event = synthetic_event(60_000)
    times_kept = 1 + event.keep.astype(int)
    path = write_score_file(tmp_path / "e.parquet", event, times_kept)
    size = path.stat().st_size
    assert 300_000 < size < 550_000, size  # 8 bytes of scores per pair, ids and flags almost free
    assert len(read_score_file(path).event.pair_ids) == 60_000


# ----- pure helpers -----


def test_times_kept_counts_every_epoch_and_resumes_from_the_history(tmp_path):
    history = SelectionHistory(tmp_path)
    ids = [10, 11, 12, 13]
    history.append({"epoch": 0, "event": "warmup", "selected_ids": ids})
    history.append({"epoch": 1, "event": "selection", "selected_ids": [10, 99]})  # 99: no longer in the pool
    history.append({"epoch": 1, "event": "selection", "selected_ids": [10, 11]})  # recorded again: the last counts
    history.append({"epoch": 2, "event": "selection", "selected_ids": [13]})  # this very event: not counted twice
    tally = KeepTally(tmp_path)  # a resumed run: epochs 0-1 happened before the restart
    event = SelectionEvent(2, 0, "selection", "irm_band", ids, np.array([False, False, False, True]))
    assert tally.times_kept(event).tolist() == [2, 2, 1, 2]
    assert tally.times_kept(event).tolist() == [2, 2, 1, 2]  # a second reporter asking adds nothing
    event3 = SelectionEvent(3, 0, "selection", "irm_band", ids, np.array([True, False, False, True]))
    assert tally.times_kept(event3).tolist() == [3, 2, 1, 3]


def test_selection_scalars_of_warmup_and_categories():
    event = warmup_event(4)
    assert selection_scalars(event) == {
        "selection/epoch": 0.0,
        "selection/pool_size": 4.0,
        "selection/num_selected": 4.0,
        "selection/kept_fraction": 1.0,
    }
    event = synthetic_event(6)
    event.keep = np.array([True, False, True, True, False, False])
    categories = np.array(["a/b c", "a/b c", "x", "x", "x", "x"], dtype=object)
    scalars = selection_scalars(event, categories, "data source")
    assert scalars["selection/by_data_source/a_b_c/kept_fraction"] == 0.5
    assert scalars["selection/by_data_source/x/kept_fraction"] == 0.5
    assert scalars["selection/aux/val_loss_after"] == 0.61  # the event's own metrics are passed through
    assert all(key.startswith("selection/") for key in scalars)
    assert kept_fraction_by_category(categories, event.keep) == {"a/b c": 0.5, "x": 0.5}
    assert metric_safe("a/b c") == "a_b_c" and metric_safe("///") == "_"


def test_scatter_rows_are_bounded_deterministic_and_distinct():
    rows = scatter_rows(60_000, 5_000, seed=3)
    assert rows.size == 5_000 and np.all(np.diff(rows) > 0) and rows.max() < 60_000
    np.testing.assert_array_equal(rows, scatter_rows(60_000, 5_000, seed=3))
    assert not np.array_equal(rows, scatter_rows(60_000, 5_000, seed=4))
    np.testing.assert_array_equal(scatter_rows(300, 5_000), np.arange(300))


def test_score_names_put_lossdiff_on_the_x_axis():
    assert ordered_score_names(["irm", "lossdiff"]) == ["lossdiff", "irm"]
    assert ordered_score_names(["other", "irm"]) == ["irm", "other"]


def test_category_column_is_configured_or_detected(caplog):
    assert resolve_category_column(["id", "source", "category"], None) == "source"
    assert resolve_category_column(["id", "category"], None) == "category"
    assert resolve_category_column(["id", "prompt"], None) is None
    assert resolve_category_column(["id", "kind"], "kind") == "kind"
    with pytest.raises(ValueError, match="`selection_category_column='kind'`"):
        resolve_category_column(["id", "source"], "kind")
    with pytest.raises(ValueError, match="selection_category_column"):
        SelectiveDPOConfig(output_dir="unused", report_to="none", bf16=False, selection_category_column="")
    dataset = Dataset.from_dict({"source": [f"url-{i}" for i in range(60)], "kind": ["a", "b"] * 30})
    with caplog.at_level(logging.WARNING, logger="trl_select.reporting"):
        assert pool_categories(dataset, None) == (None, None)  # 60 distinct values: an id, not a grouping
    assert "60 distinct values" in caplog.text
    column, values = pool_categories(dataset, "kind")
    assert column == "kind" and values.tolist() == ["a", "b"] * 30


def test_wandb_payload_is_bounded_for_a_large_pool(tmp_path):
    event = synthetic_event(60_000)
    categories = np.asarray(["near_miss", "copy"] * 30_000, dtype=object)
    reporter = WandbReporter(KeepTally(tmp_path), categories, "rejected_kind", max_points=5_000)
    payload = reporter.payload(event, wandb)
    table = payload["selection/pairs"]
    assert table.columns == ["pair_id", "lossdiff", "irm", "status", "times_kept", "rejected_kind"]
    assert len(table.data) == 5_000
    assert {row[3] for row in table.data} == {"kept", "dropped"}
    kept_share = np.mean([row[3] == "kept" for row in table.data])
    assert abs(kept_share - event.keep.mean()) < 0.03  # a uniform sample of the pool
    chart = payload["selection/scatter"]
    assert chart.spec.fields == {"x": "lossdiff", "y": "irm"}
    assert isinstance(payload["selection/lossdiff/histogram"], wandb.Histogram)
    assert sum(payload["selection/irm/histogram"].histogram) == 60_000
    assert isinstance(payload["selection/event_plot"], wandb.Image)
    assert payload["selection/by_rejected_kind/copy/kept_fraction"] == pytest.approx(event.keep[1::2].mean())
    assert all(key.startswith("selection/") for key in payload)


# ----- a real run, logged to wandb offline -----


def wandb_records(run_file: Path):
    """The records of a wandb run file: the W&B header, then LevelDB-log style blocks of 32 KiB whose chunks carry a
    7-byte header (masked CRC32C, length, type: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32 * 1024, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict[str, object]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tokenizer, reverse_rows):
    """Warm-up + one selection of the tiny model, with report_to=wandb (offline) and a category column."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("wandb_run")
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables wandb for every other test
    monkeypatch.setenv("WANDB_DIR", str(root))
    wandb.teardown()  # wandb freezes its settings at the first setup: start from the environment set here
    pool = Dataset.from_list(reverse_rows["train"][:100])
    validation = Dataset.from_list(reverse_rows["validation"][:32])
    model = build_tiny_llama(tokenizer, seed=0)
    args = fast_config(
        root / "out",
        report_to=["wandb"],
        num_train_epochs=2,
        selection_category_column="rejected_kind",
        run_name="reporting-test",
    )
    trainer = SelectiveDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pool,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    try:
        trainer.train()
    finally:
        wandb.finish()
        wandb.teardown()
        monkeypatch.undo()
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = list(wandb_records(run_file))
    return {"trainer": trainer, "pool": pool, "output_dir": root / "out", "run_dir": run_dir, "records": records}


def test_wandb_run_has_the_selection_views(wandb_run):
    records = wandb_run["records"]
    history = read_history(wandb_run["output_dir"])
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "selection/*" and m.step_metric == "selection/epoch" for m in metrics)
    assert any(m.name == "selection/epoch" for m in metrics)

    rows = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    events = [row for row in rows if "selection/epoch" in row]
    assert [row["selection/epoch"] for row in events] == [0, 1]  # one row per event, warm-up included
    for row in events:  # what the reporter logs is under selection/ (plus the step wandb itself syncs in)
        assert all(key.startswith(("selection/", "_")) or key == "train/global_step" for key in row), row.keys()
    warmup, selection = events
    assert warmup["selection/kept_fraction"] == 1.0
    assert warmup["selection/times_kept/histogram/_type"] == "histogram"
    record = history[1]
    assert selection["selection/kept_fraction"] == pytest.approx(record["num_selected"] / record["pool_size"])
    assert selection["selection/num_selected"] == record["num_selected"]
    assert selection["selection/lossdiff/band_lo"] == pytest.approx(record["thresholds"]["lossdiff"]["lo"])
    assert selection["selection/irm/band_hi"] == pytest.approx(record["thresholds"]["irm"]["hi"])
    assert selection["selection/churn"] == pytest.approx(1 - record["num_selected"] / 100)  # vs the full pool
    assert selection["selection/aux/val_loss_after"] < selection["selection/aux/val_loss_before"]
    for name in ("lossdiff", "irm", "times_kept"):
        assert selection[f"selection/{name}/histogram/_type"] == "histogram"
    assert sum(selection["selection/irm/histogram/values"]) == 100
    kept = set(record["selected_ids"])
    kinds = dict(zip(wandb_run["pool"]["id"], wandb_run["pool"]["rejected_kind"], strict=True))
    for kind in ("copy", "near_miss"):
        expected = np.mean([pair_id in kept for pair_id, k in kinds.items() if k == kind])
        assert selection[f"selection/by_rejected_kind/{kind}/kept_fraction"] == pytest.approx(expected)
    assert selection["selection/event_plot/_type"] == "image-file"

    # The sampled table (the whole pool here: 100 < 5,000) and the scatter chart that reads it
    assert selection["selection/pairs/_type"] == "table-file" and selection["selection/pairs/nrows"] == 100
    table = json.loads((wandb_run["run_dir"] / "files" / selection["selection/pairs/path"]).read_text())
    assert table["columns"] == ["pair_id", "lossdiff", "irm", "status", "times_kept", "rejected_kind"]
    assert {row[0] for row in table["data"] if row[3] == "kept"} == kept
    assert selection["selection/scatter_table/_type"] == "table-file"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(_items(r.config.update))
    chart = config["_wandb/visualize/selection/scatter"]["panel_config"]
    assert chart["panelDefId"] == "wandb/scatter/v0" and chart["fieldSettings"] == {"x": "lossdiff", "y": "irm"}
    # Nothing dropped: wandb drops a row whose step goes backwards (and warns in the console log); the reporter logs
    # without `step=`, alongside the WandbCallback, and both event rows are in the run
    console = (wandb_run["run_dir"] / "files" / "output.log").read_text()
    assert "Tried to log to step" not in console


def test_other_backends_get_the_per_category_scalars(wandb_run):
    logged = [h for h in wandb_run["trainer"].state.log_history if "selection/kept_fraction" in h]
    assert len(logged) == 1
    assert {
        "selection/by_rejected_kind/copy/kept_fraction",
        "selection/by_rejected_kind/near_miss/kept_fraction",
    } <= set(logged[0])


def test_run_score_files_match_the_history(wandb_run):
    output_dir, pool = wandb_run["output_dir"], wandb_run["pool"]
    history = read_history(output_dir)
    files = read_score_files(output_dir)
    assert [(f.event.epoch, f.event.kind) for f in files] == [(0, "warmup"), (1, "selection")]
    warmup, selection = files
    assert warmup.event.keep.all() and warmup.times_kept.tolist() == [1] * 100
    assert selection.event.pair_ids == pool["id"]
    kept_ids = [i for i, k in zip(selection.event.pair_ids, selection.event.keep, strict=True) if k]
    assert kept_ids == history[1]["selected_ids"]
    np.testing.assert_array_equal(selection.times_kept, 1 + selection.event.keep)
    assert selection.categories.tolist() == pool["rejected_kind"] and selection.category_column == "rejected_kind"
    for name, band in selection.event.bands.items():
        assert {"lo": band.lo, "hi": band.hi} == history[1]["thresholds"][name]  # exactly
        values = selection.event.scores[name]
        assert np.all((values[selection.event.keep] >= band.lo) & (values[selection.event.keep] <= band.hi))
    assert "selection/aux/val_loss_after" in selection.event.metrics


def test_reporters_write_nothing_on_other_ranks(tmp_path):
    from trl_select.reporting import ScoreFileReporter

    state = TrainerState()
    state.is_world_process_zero = False
    ScoreFileReporter(tmp_path, KeepTally(tmp_path))(synthetic_event(10), None, state)
    assert not (tmp_path / "selection").exists()
    state.is_world_process_zero = True
    ScoreFileReporter(tmp_path, KeepTally(tmp_path))(synthetic_event(10), None, state)
    assert score_file_path(tmp_path, 1).exists()


def test_plots_of_the_real_run(wandb_run):
    """`trl-select plot` on the real run: its PNGs, with the categories of the dataset."""
    assert main(["plot", str(wandb_run["output_dir"])]) == 0
    plot_dir = wandb_run["output_dir"] / "selection_plots"
    assert sorted(p.name for p in plot_dir.iterdir()) == ["selection_epoch_1.png", "selection_overview.png"]
    figure = event_figure(read_score_files(wandb_run["output_dir"])[1])
    titles = [ax.get_title() for ax in figure.axes]
    assert "Kept fraction by rejected_kind" in titles and "LossDiff × IRM" in titles
