"""Helpers shared by the benchmarks: paired statistics, a least-squares line, peak memory, the machine's name.

The arithmetic here is pure (lists in, numbers out) and tested in `tests/test_benchmark_helpers.py`; the benchmarks
themselves are never run by the tests.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PairedDelta:
    """Paired difference `arm - baseline` over seeds.

    `mean` is the mean of the per-seed differences d_s; `se` its standard error `sd(d) / sqrt(n)` (sample sd, ddof 1;
    NaN for n < 2); `wins`/`losses`/`ties` count seeds with d_s > 0, < 0 and == 0.
    """

    mean: float
    se: float
    wins: int
    losses: int
    ties: int
    n: int


def paired_delta(arm: Sequence[float], baseline: Sequence[float]) -> PairedDelta:
    """Paired `arm - baseline` statistics over seeds; both sequences are in the same seed order."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired_delta needs one value per seed in both arms, got {len(arm)} and {len(baseline)}")
    if not arm:
        raise ValueError("paired_delta needs at least one seed")
    deltas = [a - b for a, b in zip(arm, baseline, strict=True)]
    n = len(deltas)
    mean = sum(deltas) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1) / n) if n > 1 else float("nan")
    return PairedDelta(
        mean=mean,
        se=se,
        wins=sum(d > 0 for d in deltas),
        losses=sum(d < 0 for d in deltas),
        ties=sum(d == 0 for d in deltas),
        n=n,
    )


@dataclass(frozen=True)
class LineFit:
    """Least-squares line `y = intercept + slope * x` and its coefficient of determination `r2`."""

    slope: float
    intercept: float
    r2: float


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    """Ordinary least squares of `y` on `x` (at least two distinct x values)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"fit_line needs two equally long sequences of >= 2 points, got {len(x)} and {len(y)}")
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    sxx = sum((a - mean_x) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("fit_line needs at least two distinct x values")
    sxy = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((b - mean_y) ** 2 for b in y)
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LineFit(slope=slope, intercept=intercept, r2=r2)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (`getrusage(RUSAGE_SELF).ru_maxrss`; KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def machine_description(threads: int | None = None) -> str:
    """CPU model (from `lscpu`), logical CPUs, load, torch threads and versions, for the header of every results table.

    `threads` is the number of torch threads the measured processes used (default: this process's).
    """
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Other jobs on shared cores inflate wall times; the load average says whether a run had the machine to itself.
    load = f"1-min load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else "load unknown"
    return (
        f"{model}, {cpus} logical CPUs ({load}), torch {torch.__version__} "
        f"({threads or torch.get_num_threads()} threads per process), Python {platform.python_version()}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_tiny_llama(path: Path, shape: tuple[int, int, int, int], max_position_embeddings: int) -> int:
    """Build a Llama of `shape` = (hidden, layers, heads, intermediate) with the character tokenizer, save both to
    `path`, and return the parameter count. Benchmarks load it back by path, so every arm starts from the same weights.
    """
    from trl_select.testing import build_char_tokenizer, build_tiny_llama

    hidden, layers, heads, intermediate = shape
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position_embeddings,
        seed=0,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
