"""docs/configuration.md's table of every `DPOConfig` field cannot drift from the code: it lists exactly the fields of
the installed `DPOConfig`, and each row marked "refused" is refused by `SelectiveDPOConfig` (with selection on)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from accelerate.parallelism_config import ParallelismConfig
from trl import DPOConfig

from trl_select import SelectiveDPOConfig

from .testing_utils import REPO


HEADING = "## Every `DPOConfig` field with selection"
# A non-default value for each refused field, and a word its error must contain.
REFUSED_VALUES = {
    "dataloader_drop_last": (True, "dataloader_drop_last"),
    "parallelism_config": (ParallelismConfig(tp_size=2), "tp_size"),
}


def _table() -> dict[str, str]:
    """`{field: status}` from the table's rows (a row may list several fields in its first column)."""
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text[text.index(HEADING) :]
    section = section[: section.index("\n## ", len(HEADING))]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("field", "---"):
            continue
        for name in re.findall(r"`(\w+)`", cells[0]):
            assert name not in rows, f"{name} is listed twice"
            rows[name] = cells[1]
    return rows


def test_the_table_lists_every_dpo_config_field():
    table = _table()
    fields = {field.name for field in dataclasses.fields(DPOConfig)}
    assert set(table) == fields, (sorted(fields - set(table)), sorted(set(table) - fields))
    assert set(table.values()) <= {"works", "refused"}


def test_refused_rows_are_refused():
    table = _table()
    assert {name for name, status in table.items() if status == "refused"} == set(REFUSED_VALUES)
    for name, (value, word) in REFUSED_VALUES.items():
        with pytest.raises(ValueError, match=word):
            SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, **{name: value})


@pytest.mark.parametrize("name", ["dataloader_drop_last"])
def test_refused_rows_work_without_selection(name):
    value, _ = REFUSED_VALUES[name]
    SelectiveDPOConfig(output_dir="out", use_cpu=True, bf16=False, selection_rule="none", **{name: value})


def test_loss_rows_work_with_selection():
    """The loss fields the table says work: non-default values build a config that evaluates the loss."""
    config = SelectiveDPOConfig(
        output_dir="out",
        use_cpu=True,
        bf16=False,
        loss_type=["robust", "sft"],
        loss_weights=[1.0, 0.5],
        label_smoothing=0.1,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
        discopop_tau=0.1,
        beta=0.2,
        padding_free=True,
    )
    loss = config.preference_loss()
    assert config.evaluates_loss and loss.loss_types == ("robust", "sft") and loss.label_smoothing == 0.1


def test_ld_and_wpo_rows_work_with_selection():
    """`ld_alpha` and `use_weighting` (rows marked "works"): a config that evaluates the loss, which carries WPO."""
    config = SelectiveDPOConfig(
        output_dir="out", use_cpu=True, bf16=False, loss_type=["sigmoid", "ipo"], ld_alpha=0.5, use_weighting=True
    )
    assert config.evaluates_loss and config.preference_loss().use_weighting
