"""The recipes and TRL's own dpo.py, run for real in subprocesses (each launch bounded by a timeout)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trl_select import read_history
from trl_select.pool_source import resolve_pool_source
from trl_select.testing import build_char_tokenizer, build_tiny_llama

from .testing_utils import DEMO_DATA, REPO


pytestmark = pytest.mark.slow  # every test here launches a subprocess


RECIPES = REPO / "recipes"
# docs/recipes.md's command, turning TRL's installed dpo.py into a selective one by swapping two imports.
SED_TO_SELECTIVE = [
    "-e", r"s/^\( *\)from trl import DPOTrainer,/\1from trl_select import SelectiveDPOTrainer as DPOTrainer\n\1from trl import/",
    "-e", r"s/^\( *\)from trl import DatasetMixtureConfig, DPOConfig,/\1from trl_select import SelectiveDPOConfig as DPOConfig\n\1from trl import DatasetMixtureConfig,/",
]  # fmt: skip


def _run(command: list[str], cwd: Path, timeout: int) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_MODE", None)  # the demo decides: offline unless logged in
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def _swapped_trl_script(tmp_path: Path) -> tuple[Path, Path]:
    """TRL's installed dpo.py with the two classes swapped (docs/recipes.md), and a tiny local model to run it on."""
    import trl.scripts.dpo

    script = tmp_path / "dpo_select.py"
    result = subprocess.run(["sed", *SED_TO_SELECTIVE, trl.scripts.dpo.__file__], capture_output=True, text=True)
    assert "SelectiveDPOTrainer as DPOTrainer" in result.stdout and "SelectiveDPOConfig as DPOConfig" in result.stdout
    script.write_text(result.stdout)
    tokenizer = build_char_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    build_tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return script, model_dir


def _accelerate(script: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(script), *flags]


def test_demo_recipe_with_no_arguments(tmp_path):
    """The Quickstart's main job exactly as documented: no arguments, embedded model and data, wandb offline."""
    output = _run(_accelerate(RECIPES / "dpo_lossdiff_irm.py"), cwd=tmp_path, timeout=600)
    output_dir = tmp_path / "outputs" / "dpo-lossdiff-irm-demo"
    history = read_history(output_dir)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[0]["num_selected"] == history[0]["pool_size"] == 2000
    for record in history[1:]:
        assert 0.5 <= record["num_selected"] / record["pool_size"] <= 0.8
    # The demo reports what selection did to the known-flipped pairs
    rows = re.findall(r"^\s+(\d) selection\s+(\d+)/2000\s+([\d.]+)\s+([\d.]+)$", output, flags=re.M)
    assert len(rows) == 2
    for _, _, flipped_kept, flipped_dropped in rows:
        assert float(flipped_kept) < 0.3 < float(flipped_dropped)
    assert "Greedy exact-match" in output
    # The demo records the file its pool came from: `trl-select suspects` shows each pair's text without --dataset
    assert resolve_pool_source(output_dir)[0] == str((RECIPES / "data" / "reverse_digits" / "train.jsonl").resolve())
    assert list((output_dir / "wandb").glob("offline-run-*")), "wandb did not log offline"
    assert (output_dir / "model.safetensors").exists()


def test_slic_recipe(tmp_path):
    flags = [
        "--output_dir",
        str(tmp_path / "slic"),
        "--num_train_epochs",
        "2",
        "--demo_sft_epochs",
        "2",
        "--report_to",
        "none",
    ]
    _run(_accelerate(RECIPES / "slic_lossdiff_irm.py", *flags), cwd=tmp_path, timeout=600)
    history = read_history(tmp_path / "slic")
    assert [r["event"] for r in history] == ["warmup", "selection"]


def _swapped_trl_command(tmp_path: Path, plain: bool = False, **overrides: str | list[str]) -> list[str]:
    """The command running TRL's swapped dpo.py on the tiny model and the demo data, 2 epochs unless `overrides` (flag
    name -> value, or a list of values) say otherwise. `plain`: TRL's own dpo.py on the same run, no selection flag."""
    script, model_dir = _swapped_trl_script(tmp_path)
    if plain:
        import trl.scripts.dpo

        script = Path(trl.scripts.dpo.__file__)
    flags: dict[str, str | list[str]] = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(DEMO_DATA),
        "dataset_test_split": "validation",
        "eval_strategy": "epoch",
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": "2",
        "learning_rate": "1e-3",
        "per_device_train_batch_size": "64",
        "max_length": "32",
        "gradient_checkpointing": "False",
        "bf16": "False",
        "report_to": "none",
        "save_strategy": "no",
        "aux_max_steps": "2",
        **overrides,
    }
    if plain:
        flags.pop("aux_max_steps")
    arguments = []
    for name, value in flags.items():
        arguments += [f"--{name}", *([value] if isinstance(value, str) else value)]
    return [sys.executable, str(script), *arguments]


def test_trl_dpo_script_with_selective_classes(tmp_path):
    """Swap DPOTrainer/DPOConfig for the Selective classes in TRL's installed dpo.py; run it on local model + data."""
    swapped = _run(_swapped_trl_command(tmp_path), cwd=tmp_path, timeout=600)
    history = read_history(tmp_path / "out")
    assert [r["event"] for r in history] == ["warmup", "selection"]
    assert 0.5 <= history[1]["num_selected"] / 2000 <= 0.8
    # The same run with TRL's own script: selection adds at most 30% to what the console shows
    plain_command = _swapped_trl_command(tmp_path, plain=True, output_dir=str(tmp_path / "plain"))
    plain = _run(plain_command, cwd=tmp_path, timeout=600)
    assert "trl-select" not in plain
    swapped_lines, plain_lines = len(swapped.splitlines()), len(plain.splitlines())
    assert swapped_lines <= 1.3 * plain_lines, (swapped_lines, plain_lines, swapped)


@pytest.mark.parametrize(
    "loss_flags",
    [{"loss_type": "ipo"}, {"loss_type": ["sigmoid", "sft"], "loss_weights": ["1", "1"]}],
    ids=["ipo", "sigmoid+sft"],
)
def test_trl_dpo_script_selects_with_other_losses(tmp_path, loss_flags):
    """TRL's dpo.py, classes swapped, with a loss other than DPO's: it trains, selects, and prints one line per event."""
    output = _run(_swapped_trl_command(tmp_path, **loss_flags), cwd=tmp_path, timeout=600)
    history = read_history(tmp_path / "out")
    assert [r["event"] for r in history] == ["warmup", "selection"]
    assert 0 < history[1]["num_selected"] < 2000
    assert output.count("trl-select: epoch 1 selection kept") == 1  # the event's console line, once


def test_trl_dpo_script_one_epoch_with_max_steps_selects_inside_the_epoch(tmp_path):
    """TRL's documented command (one epoch, `--max_steps`), classes swapped, no selection flag: events inside it."""
    command = _swapped_trl_command(tmp_path, num_train_epochs="1", max_steps="30", per_device_train_batch_size="16")
    output = _run(command, cwd=tmp_path, timeout=600)
    history = read_history(tmp_path / "out")
    # warm-up 0.2 of the 30 steps, then an event every 0.2, all inside epoch 0 (2,000 pairs: 125 steps an epoch)
    assert [r["event"] for r in history] == ["warmup"] + ["selection"] * 4
    assert [r["global_step"] for r in history] == [0, 6, 12, 18, 24]
    assert all(r["epoch"] == 0 for r in history)
    assert output.count("selects inside the epochs") == 1
    assert "first at step 6, then every 6 steps" in output


@pytest.mark.parametrize("script", ["dpo_lossdiff_irm.py", "slic_lossdiff_irm.py"])
def test_recipe_help_lists_selection_flags(script):
    output = _run([sys.executable, str(RECIPES / script), "--help"], cwd=RECIPES, timeout=120)
    for flag in ("--selection_rule", "--irm_lo_percentile", "--aux_refresh_epochs", "--dataset_validation_split"):
        assert flag in output
