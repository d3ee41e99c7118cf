"""`trl-select score | select | overlap` end to end on a tiny model saved locally (subprocess for score and select)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from trl_select import read_score_file
from trl_select.cli import main
from trl_select.testing import build_tiny_llama, write_jsonl

from .independent import pair_log_probs


pytestmark = pytest.mark.slow  # every test here launches a subprocess


BETA = 0.5


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_select.cli", *argv], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer, reverse_rows):
    """A policy and reference saved with `save_pretrained`, 40 training and 16 validation pairs, scored by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    reference = build_tiny_llama(tokenizer, seed=0)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(reverse_rows["train"][:40], root / "train.jsonl")
    write_jsonl(reverse_rows["validation"][:16], root / "validation.jsonl")
    result = _run_cli(
        "score",
        "--model",
        str(root / "policy"),
        "--ref_model",
        str(root / "reference"),
        "--dataset",
        str(root / "train.jsonl"),
        "--validation",
        str(root / "validation.jsonl"),
        "--scores",
        "lossdiff,irm,reward_gap,davir,influence",
        "--beta",
        str(BETA),
        "--max_length",
        "64",
        "--batch_size",
        "16",
        "--aux_max_steps",
        "3",
        "--aux_learning_rate",
        "1e-3",
        "--use_cpu",
        "--out",
        str(root / "scores.parquet"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "policy": policy, "reference": reference, "stdout": result.stdout}


def test_score_writes_every_score_with_stable_ids(scored, tokenizer, reverse_rows):
    root = scored["root"]
    assert str(root / "scores.parquet") in scored["stdout"]
    event = read_score_file(root / "scores.parquet").event
    rows = reverse_rows["train"][:40]
    assert event.pair_ids == [row["id"] for row in rows]
    assert set(event.scores) == {"lossdiff", "irm", "reward_gap", "davir", "influence"}
    assert all(np.isfinite(values).all() and np.std(values) > 0 for values in event.scores.values())
    assert event.metrics["selection/aux/val_loss_after"] < event.metrics["selection/aux/val_loss_before"]
    # IRM of a few pairs against plain forwards of the saved models
    for index in (0, 17, 39):
        row = rows[index]
        tokens = {
            "prompt_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"],
            "chosen_ids": tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            "rejected_ids": tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id],
        }
        with torch.no_grad():
            (chosen, rejected) = pair_log_probs(scored["policy"], tokens)
            (ref_chosen, ref_rejected) = pair_log_probs(scored["reference"], tokens)
        expected = BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)).item()
        assert event.scores["irm"][index] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_select_writes_the_rules_subset_and_overlap_compares_them(scored, capsys):
    root = scored["root"]
    event = read_score_file(root / "scores.parquet").event
    result = _run_cli(
        "select",
        str(root / "scores.parquet"),
        "--rule",
        "lossdiff_irm",
        "--dataset",
        str(root / "train.jsonl"),
        "--out",
        str(root / "lossdiff_irm"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    in_band = np.ones(40, dtype=bool)
    for name in ("lossdiff", "irm"):
        lo, hi = np.percentile(event.scores[name], [10, 90])
        in_band &= (event.scores[name] >= lo) & (event.scores[name] <= hi)
    expected_ids = {pair_id for pair_id, kept in zip(event.pair_ids, in_band, strict=True) if kept}
    subset = load_from_disk(str(root / "lossdiff_irm"))
    assert set(subset["id"]) == expected_ids and {"prompt", "chosen", "rejected"} <= set(subset.column_names)
    assert f"kept {len(expected_ids)}/40" in result.stdout

    assert (
        main(
            [
                "select",
                str(root / "scores.parquet"),
                "--rule",
                "reward_gap",
                "--set",
                "selection_fraction=0.1",
                "--dataset",
                str(root / "train.jsonl"),
                "--out",
                str(root / "hard"),
            ]
        )
        == 0
    )
    hardest = {event.pair_ids[i] for i in np.argsort(event.scores["reward_gap"], kind="stable")[:4]}
    assert set(load_from_disk(str(root / "hard"))["id"]) == hardest

    capsys.readouterr()
    assert main(["overlap", str(root / "lossdiff_irm"), str(root / "hard"), str(root / "scores.parquet")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cells = [line.split() for line in lines[1:]]
    assert [int(row[1]) for row in cells] == [len(expected_ids), 4, 40]
    assert float(cells[0][3]) == pytest.approx(round(len(expected_ids & hardest) / 4, 3))
    assert float(cells[2][2]) == 1.0  # every selection is inside the full pool


def test_select_plugins_and_errors(scored, tmp_path, capsys):
    root = scored["root"]
    plugin = tmp_path / "my_rules.py"
    plugin.write_text(
        "import numpy as np\nfrom trl_select import register_rule\n\n"
        "@register_rule('positive_davir_test', scores=('davir',))\n"
        "def positive_davir(scores, context):\n    return scores['davir'] > 0\n"
    )
    out = tmp_path / "positive"
    argv = ["select", str(root / "scores.parquet"), "--dataset", str(root / "train.jsonl"), "--out", str(out)]
    assert main([*argv, "--rule", "positive_davir_test", "--plugin", str(plugin)]) == 0
    davir = read_score_file(root / "scores.parquet").event.scores["davir"]
    assert len(load_from_disk(str(out))) == int((davir > 0).sum())

    capsys.readouterr()
    assert main([*argv, "--rule", "no_such_rule"]) == 2
    assert "`--rule` must be a registered rule" in capsys.readouterr().err
    assert main([*argv, "--rule", "irm_band", "--set", "irm_lo_percentile=95"]) == 2
    assert "`irm_lo_percentile" in capsys.readouterr().err
    missing = tmp_path / "irm_only.parquet"
    table_event = read_score_file(root / "scores.parquet")
    table_event.event.scores = {"irm": table_event.event.scores["irm"]}
    from trl_select.reporting import write_score_file

    write_score_file(missing, table_event.event, table_event.times_kept)
    assert (
        main(
            [
                "select",
                str(missing),
                "--rule",
                "lossdiff_irm",
                "--dataset",
                str(root / "train.jsonl"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "has no ['lossdiff'] column" in capsys.readouterr().err


def test_score_with_two_processes_matches_one(scored, tmp_path):
    root = scored["root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    common = [
        "--model",
        str(root / "policy"),
        "--ref_model",
        str(root / "reference"),
        "--dataset",
        str(root / "train.jsonl"),
        "--beta",
        str(BETA),
        "--max_length",
        "64",
        "--batch_size",
        "16",
        "--use_cpu",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trl_select.cli", "score"]
    result = subprocess.run(
        [*launch, *common, "--scores", "irm", "--out", str(tmp_path / "two.parquet")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (read_score_file(path).event for path in (root / "scores.parquet", tmp_path / "two.parquet"))
    assert two.pair_ids == one.pair_ids
    np.testing.assert_allclose(two.scores["irm"], one.scores["irm"], rtol=1e-5, atol=1e-5)
    # The influence score refuses several processes instead of returning per-rank numbers.
    result = subprocess.run(
        [
            *launch,
            *common,
            "--validation",
            str(root / "validation.jsonl"),
            "--scores",
            "influence",
            "--out",
            str(tmp_path / "influence.parquet"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0 and "runs on one process only; this run has 2" in result.stderr
    assert not (tmp_path / "influence.parquet").exists()


def test_score_accepts_every_per_pair_loss_and_its_weights(tmp_path):
    from trl_select.cli import LOSS_TYPES, OFFLINE_RULE, _score_config, build_parser
    from trl_select.registry import registered_rule
    from trl_select.registry_builtins import keep_everything
    from trl_select.scores import SUPPORTED_LOSS_TYPES

    assert LOSS_TYPES == SUPPORTED_LOSS_TYPES
    base = ["score", "--model", "m", "--ref_model", "r", "--dataset", "d.jsonl", "--out", "o.parquet", "--use_cpu"]
    for loss_type in SUPPORTED_LOSS_TYPES:
        args = build_parser().parse_args([*base, "--loss_type", loss_type])
        assert args.loss_type == [loss_type]
    args = build_parser().parse_args(
        [*base, "--loss_type", "robust", "sft", "--loss_weights", "1", "0.5", "--label_smoothing", "0.1"]
    )
    with registered_rule(OFFLINE_RULE, keep_everything, scores=("lossdiff",)):
        loss = _score_config(args, str(tmp_path)).preference_loss()
    assert loss.loss_types == ("robust", "sft") and list(loss.loss_weights) == [1.0, 0.5]
    assert loss.label_smoothing == 0.1
    assert build_parser().parse_args(base).loss_type == ["sigmoid"]  # the default
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--loss_type", "aot"])  # no per-pair form: not a choice


def test_score_with_a_weighted_loss_list(scored, capsys):
    root = scored["root"]
    argv = [
        "score",
        "--model",
        str(root / "policy"),
        "--ref_model",
        str(root / "reference"),
        "--dataset",
        str(root / "train.jsonl"),
        "--validation",
        str(root / "validation.jsonl"),
        "--scores",
        "lossdiff,irm",
        "--beta",
        str(BETA),
        "--max_length",
        "64",
        "--batch_size",
        "16",
        "--aux_max_steps",
        "2",
        "--use_cpu",
        "--out",
        str(root / "weighted.parquet"),
        "--loss_type",
        "ipo",
        "sft",
    ]
    assert main([*argv, "--loss_weights", "1"]) == 2  # one weight for two losses
    assert "loss_weights" in capsys.readouterr().err
    assert main([*argv, "--loss_weights", "1", "0.5"]) == 0
    event = read_score_file(root / "weighted.parquet").event
    assert set(event.scores) == {"lossdiff", "irm"} and np.isfinite(event.scores["lossdiff"]).all()
