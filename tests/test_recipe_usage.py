"""The recipes as TRL users run them: TRL's split flags, a clean console, and `--selection_rule none` as the baseline.

Each run is a real `accelerate launch` subprocess bounded by a timeout, on a tiny local model and local data.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from trl_select import read_history
from trl_select.testing import build_char_tokenizer, build_tiny_llama, read_jsonl, write_jsonl

from .test_recipes import RECIPES, _accelerate, _run
from .testing_utils import DEMO_DATA


def _load_recipe():
    """The DPO recipe script as a module (registered first: its dataclasses resolve annotations through it)."""
    name = "recipe_dpo_lossdiff_irm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / "dpo_lossdiff_irm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny local model, and a local dataset with TRL's usual `train`/`test` splits and no `validation` split."""
    root = tmp_path_factory.mktemp("recipe-usage")
    tokenizer = build_char_tokenizer()
    model_dir = root / "tiny-llama"
    build_tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = root / "pairs"
    data_dir.mkdir()
    write_jsonl(read_jsonl(DEMO_DATA / "train.jsonl")[:128], data_dir / "train.jsonl")
    write_jsonl(read_jsonl(DEMO_DATA / "validation.jsonl")[:40], data_dir / "test.jsonl")
    return model_dir, data_dir


@pytest.mark.slow
def test_dataset_test_split_supplies_the_validation_pairs_and_the_console_stays_clean(tmp_path, model_and_data):
    """TRL's `--dataset_test_split` with no `--dataset_validation_split`: the recipe aligns on the test split, says so,
    and the console has one line per selection event and none of accelerate's per-metric remainder messages."""
    model_dir, data_dir = model_and_data
    flags = [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data_dir),
        "--dataset_test_split",
        "test",
        "--output_dir",
        str(tmp_path / "out"),
        "--num_train_epochs",
        "3",
        "--per_device_train_batch_size",
        "32",
        "--max_length",
        "32",
        "--activation_checkpointing",
        "True",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--aux_max_steps",
        "2",
    ]
    output = _run(_accelerate(RECIPES / "dpo_lossdiff_irm.py", *flags), cwd=tmp_path, timeout=600)
    assert "No `validation` split: aligning on the test split `test` (40 pairs)" in output
    assert len(re.findall(r"Aux model refreshed at epoch \d", output)) == 2  # aligned on those pairs
    assert len(re.findall(r"trl-select: epoch \d selection kept", output)) == 2  # once each, not twice
    assert [r["event"] for r in read_history(tmp_path / "out")] == ["warmup", "selection", "selection"]
    assert "had no length" not in output


def test_missing_validation_split_names_the_flags():
    """A split asked for by name that the dataset lacks is an error naming the flag, not `validation_dataset=`."""
    recipe = _load_recipe()
    dataset = DatasetDict({"train": Dataset.from_list([{"a": 1}]), "test": Dataset.from_list([{"a": 2}])})
    args = recipe.RecipeArguments(dataset_name="x", dataset_validation_split="dev")
    with pytest.raises(ValueError, match=r"--dataset_validation_split dev.*\['test', 'train'\]"):
        recipe.validation_split(dataset, args, needs_validation=True)
    # Neither a validation nor a test split: both flags are named
    args = recipe.RecipeArguments(dataset_name="x", dataset_test_split="eval")
    with pytest.raises(ValueError, match=r"--dataset_validation_split.*--dataset_test_split"):
        recipe.validation_split(DatasetDict({"train": dataset["train"]}), args, needs_validation=True)
    # A rule without validation pairs does not need one
    assert recipe.validation_split(DatasetDict({"train": dataset["train"]}), args, needs_validation=False) is None
    # Default: `validation` when there is one, else the test split
    args = recipe.RecipeArguments(dataset_name="x")
    assert recipe.validation_split(dataset, args, needs_validation=True) == "test"
    with_validation = DatasetDict({**dataset, "validation": dataset["test"]})
    assert recipe.validation_split(with_validation, args, needs_validation=True) == "validation"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo_lossdiff_irm.py", "slic_lossdiff_irm.py"])
def test_selection_rule_none_prints_the_baseline_summary(tmp_path, script):
    """The demo's comparison run: full pool every epoch, and the same exact-match summary as a selective run."""
    flags = [
        "--selection_rule",
        "none",
        "--output_dir",
        str(tmp_path / "none"),
        "--num_train_epochs",
        "1",
        "--demo_sft_epochs",
        "1",
        "--report_to",
        "none",
    ]
    output = _run(_accelerate(RECIPES / script, *flags), cwd=tmp_path, timeout=600)
    assert re.search(r"no selection \(--selection_rule none\): all 2000 pairs trained every epoch", output)
    match = re.search(
        r"Greedy exact-match on 500 unseen test prompts: SFT ([\d.]+) -> after \w+ without selection "
        r"([\d.]+)",
        output,
    )
    assert match, output[-3000:]
    assert 0.0 <= float(match[1]) <= 1.0 and 0.0 <= float(match[2]) <= 1.0
    assert not (tmp_path / "none" / "selection_history.jsonl").exists()
    assert (tmp_path / "none" / "model.safetensors").exists()


def test_demo_baseline_defaults_to_its_own_output_dir():
    """`--selection_rule none` on the demo writes next to the selective demo's model, not over it."""
    recipe = _load_recipe()
    for argv in (["--selection_rule", "none"], ["--selection_rule=none"]):
        _, training_args, _ = recipe.make_parser(argv=argv).parse_args_and_config(args=argv)
        assert training_args.output_dir == "outputs/dpo-lossdiff-irm-demo-none"
        assert training_args.run_name == "dpo-lossdiff-irm-demo-none"
    _, training_args, _ = recipe.make_parser(argv=[]).parse_args_and_config(args=[])
    assert training_args.output_dir == "outputs/dpo-lossdiff-irm-demo"
    assert not training_args.activation_checkpointing  # off without a deprecated-name default that warns
