"""`python -m benchmarks.gpu_check --cpu-smoke`: the GPU check's every phase, at tiny sizes on the CPU, in a subprocess.

The smoke runs the same functions as the bf16 ~0.5B GPU run; only sizes, dtype and device differ. On the CPU the peaks
are the process's unresettable peak RSS, so no ordering of peaks is asserted: keys, finiteness, positive rates, and
that both aux modes ran and produced finite LossDiff scores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # every test here launches a subprocess


REPO = Path(__file__).resolve().parents[1]

PLAIN_KEYS = (
    "epoch_s",
    "train_s",
    "steps",
    "first_step_s",
    "median_step_s",
    "train_pairs_per_s",
    "steady_train_pairs_per_s",
    "peak_mib",
)
SELECTIVE_KEYS = (
    "aux_mode",
    "warmup_steps",
    "warmup_s",
    "train_peak_mib",
    "event_peak_mib",
    "peak_mib",
    "event_scores_s",
    "reference_pass_s",
    "policy_pass_s",
    "policy_pass_pairs_per_s",
    "aux_refresh_s",
    "aux_steps",
    "aux_val_loss_before",
    "aux_val_loss_after",
    "optimizer_state_mib",
    "lossdiff_finite",
    "lossdiff_mean",
    "lossdiff_std",
    "irm_finite",
    "scored_pairs",
    "peak_vs_plain",
    "policy_pass_vs_epoch",
    "aux_refresh_vs_epoch",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TQDM_DISABLE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_header(smoke):
    assert smoke["cpu_smoke"] is True
    assert smoke["complete"] is True
    assert smoke["device"].startswith("CPU")
    assert smoke["precision"] == "fp32"
    assert smoke["memory_kind"] == "peak_rss_monotone"
    sizes = smoke["sizes"]
    assert (sizes["hidden"], sizes["layers"], sizes["vocab"], sizes["pairs"], sizes["seq_len"]) == (64, 2, 256, 32, 32)
    assert smoke["parameters"] > 0
    assert {"torch", "transformers", "trl", "peft", "accelerate"} <= set(smoke["versions"])
    assert _finite_positive(smoke["total_s"])
    assert smoke["command"].startswith("python -m benchmarks.gpu_check")


def test_plain_epoch(smoke):
    plain = smoke["plain"]
    assert set(PLAIN_KEYS) <= set(plain)
    for key in PLAIN_KEYS:
        assert _finite_positive(plain[key]), (key, plain[key])
    assert plain["steps"] == smoke["sizes"]["pairs"] // smoke["sizes"]["train_batch"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_selective_arm(smoke, mode):
    arm = smoke["selective"][mode]
    assert set(SELECTIVE_KEYS) <= set(arm)
    assert arm["aux_mode"] == mode
    for key in (
        "warmup_s",
        "train_peak_mib",
        "event_peak_mib",
        "peak_mib",
        "event_scores_s",
        "reference_pass_s",
        "policy_pass_s",
        "policy_pass_pairs_per_s",
        "aux_refresh_s",
        "peak_vs_plain",
        "policy_pass_vs_epoch",
        "aux_refresh_vs_epoch",
    ):
        assert _finite_positive(arm[key]), (key, arm[key])
    assert arm["peak_mib"] == max(arm["train_peak_mib"], arm["event_peak_mib"])
    # the event ran with the policy's AdamW state held, as at a real epoch boundary
    assert _finite_positive(arm["optimizer_state_mib"])
    # the aux refresh ran: its alignment steps were taken and moved the aux model on the validation pairs
    assert arm["aux_steps"] == smoke["sizes"]["aux_max_steps"]
    assert math.isfinite(arm["aux_val_loss_before"]) and math.isfinite(arm["aux_val_loss_after"])
    assert arm["aux_val_loss_after"] < arm["aux_val_loss_before"]
    # LossDiff over the whole pool, finite and not all equal (the aux differs from θ_t)
    assert arm["scored_pairs"] == smoke["sizes"]["pairs"]
    assert arm["lossdiff_finite"] is True and arm["irm_finite"] is True
    assert math.isfinite(arm["lossdiff_mean"]) and _finite_positive(arm["lossdiff_std"])


def test_reports(smoke):
    from benchmarks.gpu_check import report

    text = report(smoke, smoke["command"])
    assert "| plain DPO (training epoch) |" in text and 'aux_mode="full"' in text
    failed = {**smoke, "selective": {**smoke["selective"], "full": {"aux_mode": "full", "error": "OutOfMemoryError"}}}
    text = report(failed, smoke["command"])
    assert text.startswith("# GPU check (incomplete)") and "OutOfMemoryError" in text
