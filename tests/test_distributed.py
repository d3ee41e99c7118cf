"""Selection under DDP with 2 real processes on the CPU (gloo), each launch bounded by a timeout."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_select.rules import overlap_coefficient
from trl_select.scoring import check_same_on_all_ranks


SCRIPT = Path(__file__).resolve().parent / "distributed" / "selection_run.py"


def _launch(out: Path, nproc: int, *flags: str) -> list[dict]:
    result = _run(out, nproc, *flags)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    for rank in range(nproc):
        assert f"rank {rank} of world size {nproc} done" in result.stdout
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def _run(out: Path, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "WANDB_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
    }
    if nproc == 1:
        command = [sys.executable, str(SCRIPT), str(out), *flags]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            str(SCRIPT),
            str(out),
            *flags,
        ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_ddp_ranks_train_disjoint_shards_of_one_selection(tmp_path, peft):
    # 100 pairs, 2 ranks x 16: the pool is not divisible by world size x batch, nor is every selection by 2
    ranks = _launch(tmp_path, 2, *(["--peft"] if peft else []))
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    history = ranks[0]["history"]
    assert [record["event"] for record in history] == ["warmup", "selection", "selection"]
    for record in history:
        epoch = str(record["epoch"])
        shards = [r["trained_ids"][epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1])  # equal work per rank
        assert not set(shards[0]) & set(shards[1])  # disjoint
        assert len(record["trimmed_ids"]) == record["num_selected"] % 2
        assert sorted(shards[0] + shards[1] + record["trimmed_ids"]) == sorted(record["selected_ids"])
    # The aux model is aligned identically on both ranks (gradients averaged), refresh after refresh
    assert len(ranks[0]["aux_hashes"]) == 2
    assert ranks[0]["aux_hashes"] == ranks[1]["aux_hashes"]


def _check_disjoint_shards_of_one_selection(ranks: list[dict]) -> None:
    history = ranks[0]["history"]
    assert [record["event"] for record in history] == ["warmup", "selection", "selection"]
    for record in history:
        epoch = str(record["epoch"])
        shards = [r["trained_ids"][epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1])
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1] + record["trimmed_ids"]) == sorted(record["selected_ids"])


# ZeRO-3 configs set stage3_param_persistence_threshold=0, so even this tiny model is really partitioned: a forward
# one rank skips would hang, and every parameter must be gathered to be used.
DEEPSPEED_RUNS = {
    "zero2": ("zero2.json", []),
    "zero2-offload": ("zero2_offload.json", []),
    "zero3": ("zero3.json", []),
    "zero2-lora": ("zero2.json", ["--peft"]),
    "zero3-lora": ("zero3.json", ["--peft"]),
    "zero3-precompute": ("zero3.json", ["--precompute_ref"]),
    "zero3-precompute-apart": ("zero3.json", ["--precompute_ref", "--validation_apart"]),
    "zero2-bf16-checkpointing": ("zero2_bf16.json", ["--bf16", "--gradient_checkpointing"]),
    "zero3-bf16-checkpointing": ("zero3_bf16.json", ["--bf16", "--gradient_checkpointing"]),
    "zero3-gathered-copy": ("zero3.json", ["--gather_aux_copy"]),
    # aux_mode="lora": LoRA layers injected into the (ZeRO-3: partitioned) policy for the aux stage, removed after
    "zero2-loraaux": ("zero2.json", ["--aux_mode", "lora", "--check_aux_identity"]),
    "zero3-loraaux": ("zero3.json", ["--aux_mode", "lora", "--check_aux_identity"]),
}


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    cache: dict[str, list[dict]] = {}

    def run(name: str) -> list[dict]:
        if name not in cache:
            config, flags = DEEPSPEED_RUNS[name]
            out = tmp_path_factory.mktemp(name)
            cache[name] = _launch(out, 2, "--deepspeed", str(SCRIPT.parent / config), *flags)
        return cache[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEEPSPEED_RUNS))
def test_deepspeed_ranks_agree_and_never_hang(deepspeed_runs, name):
    ranks = deepspeed_runs(name)
    stage = 3 if name.startswith("zero3") else 2
    assert [(r["distributed_type"], r["zero_stage"], r["world_size"]) for r in ranks] == [
        ("DistributedType.DEEPSPEED", stage, 2)
    ] * 2
    _check_disjoint_shards_of_one_selection(ranks)
    refreshes = 2 + ("--check_aux_identity" in DEEPSPEED_RUNS[name][1])  # that check refreshes once more at the end
    assert len(ranks[0]["aux_hashes"]) == refreshes and ranks[0]["aux_hashes"] == ranks[1]["aux_hashes"]
    # The aux engine (or adapter) leaves this rank's policy shards, its optimizer state and its LR schedule alone
    assert all(r["policy_untouched_by_aux"] == [True] * refreshes for r in ranks)


FULL_COPY_RUNS = [name for name in DEEPSPEED_RUNS if "lora" not in name]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_COPY_RUNS)
def test_deepspeed_aux_is_built_sharded_in_the_policy_dtype(deepspeed_runs, name):
    """What the full-copy aux build hands to `deepspeed.initialize`, recorded from inside the build on every rank.

    Never an unsharded copy: no `GatheredParameters` call covers all the parameters (the old build gathered them all
    at once, then built a whole fp32 model); under ZeRO-3 the model arrives already partitioned (this rank holds about
    1/2 of the elements) and, as the partitions match the policy's, without a single gather. It holds exactly the
    policy's weights, in the policy's dtype (bf16 under bf16), and recomputes activations when the policy does.
    """
    ranks = deepspeed_runs(name)
    zero3 = name.startswith("zero3")
    for rank in ranks:
        builds = rank["aux_builds"]
        assert len(builds) == 2  # one per refresh
        for build in builds:
            assert max(build["gathers"], default=0) < build["policy_numel"]
            assert (
                build["dtypes"]
                == build["policy_dtypes"]
                == (["torch.bfloat16"] if "bf16" in name else ["torch.float32"])
            )
            assert build["checkpointing"] == build["policy_checkpointing"] == ("checkpointing" in name)
            assert build["full_numel"] == build["policy_numel"]
            assert build["equals_policy"]
            if zero3:
                assert all(build["partitioned"])
                # each parameter padded to a multiple of 2, then halved
                assert build["local_numel"] <= (build["full_numel"] + len(build["partitioned"])) // 2
            else:
                assert not any(build["partitioned"]) and build["local_numel"] == build["full_numel"]
            if name == "zero3-gathered-copy":  # one parameter at a time: the policy's, then its aux twin
                gathers = build["gathers"]
                assert len(gathers) == 2 * len(build["partitioned"]) and gathers[0::2] == gathers[1::2]
                assert sum(gathers) == 2 * build["full_numel"]
            elif zero3:
                assert build["gathers"] == []  # each rank copied its own partitions


@pytest.mark.slow
def test_zero3_aux_copied_by_partition_equals_the_gathered_copy(deepspeed_runs):
    """The partition-wise copy and the parameter-by-parameter gathered copy build the same aux: same aligned weights
    after every refresh, same selection."""
    direct, gathered = deepspeed_runs("zero3"), deepspeed_runs("zero3-gathered-copy")
    assert direct[0]["aux_hashes"] == gathered[0]["aux_hashes"]
    assert [r["selected_ids"] for r in direct[0]["history"]] == [r["selected_ids"] for r in gathered[0]["history"]]


@pytest.mark.slow
def test_zero3_with_trl_precomputed_reference_selects_the_same(deepspeed_runs):
    """TRL's precompute path (its own inference engine over the ZeRO-3 shards) gives the reference our pass gives."""
    cached, live = deepspeed_runs("zero3-precompute")[0]["history"], deepspeed_runs("zero3")[0]["history"]
    assert [r["selected_ids"] for r in cached] == [r["selected_ids"] for r in live]
    for name, band in live[1]["thresholds"].items():
        assert cached[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-4)
        assert cached[1]["thresholds"][name]["hi"] == pytest.approx(band["hi"], abs=1e-4)


def test_precomputed_reference_on_in_memory_data_is_refused_before_any_forward():
    from datasets import Dataset

    from trl_select.trainer import _check_precomputed_reference_is_shared

    in_memory = Dataset.from_list([{"prompt": "1", "chosen": "1", "rejected": "2"}])
    args = SimpleNamespace(precompute_ref_log_probs=True, world_size=2)
    with pytest.raises(ValueError, match=r"needs `eval_dataset\['dev'\]` backed by files.*load_from_disk"):
        _check_precomputed_reference_is_shared(args, {"train_dataset": None, "eval_dataset": {"dev": in_memory}})
    _check_precomputed_reference_is_shared(
        SimpleNamespace(precompute_ref_log_probs=True, world_size=1), {"x": in_memory}
    )


@pytest.mark.slow
def test_zero3_precomputed_reference_without_ref_model_for_a_separate_validation_set(deepspeed_runs):
    """No `ref_model`, validation pairs apart from the eval set: π_ref's validation log-probs are precomputed before
    training (TRL's engine over the ZeRO-3 shards, its cache file shared by the ranks), not taken from the policy at
    the first selection, so the run selects what the run with a live `ref_model` selects."""
    apart, live = deepspeed_runs("zero3-precompute-apart"), deepspeed_runs("zero3")
    # The policy at the first selection as its own reference makes every validation margin 0: a loss of exactly log 2
    # (fp32: 0.6931472) before alignment. π_ref is one warm-up epoch behind the policy here: 0.6924.
    assert all(abs(r["aux_losses"][0][0] - math.log(2)) > 1e-4 for r in apart)
    for (apart_before, apart_after), (live_before, live_after) in zip(
        apart[0]["aux_losses"], live[0]["aux_losses"], strict=True
    ):
        assert apart_before == pytest.approx(live_before, abs=1e-5)
        assert apart_after == pytest.approx(live_after, abs=1e-5)
    history, reference = apart[0]["history"], live[0]["history"]
    assert [r["selected_ids"] for r in history] == [r["selected_ids"] for r in reference]
    for name, band in reference[1]["thresholds"].items():
        assert history[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-4)
        assert history[1]["thresholds"][name]["hi"] == pytest.approx(band["hi"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "-lora"], ids=["full", "lora"])
def test_zero3_selects_what_zero2_selects(deepspeed_runs, variant):
    """Same seed, fp32: sharding the parameters changes nothing the scores can see.

    With LoRA under ZeRO-3 the aux model is a second adapter added to the already partitioned model.
    """
    zero2, zero3 = deepspeed_runs(f"zero2{variant}")[0]["history"], deepspeed_runs(f"zero3{variant}")[0]["history"]
    assert zero3[1]["selected_ids"] == zero2[1]["selected_ids"]
    for name, band in zero2[1]["thresholds"].items():
        assert zero3[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-4)


def _check_lora_aux_run(ranks: list[dict]) -> None:
    """`aux_mode="lora"` on 2 ranks: the checks of `test_lora_aux.py`, per rank, plus agreement across ranks."""
    for r in ranks:
        # two refreshes in training, then one with learning rate 0 (`--check_aux_identity`)
        assert r["policy_untouched_by_aux"] == [True] * 3  # shards, grads, flags, optimizer state, LR schedule
        assert r["lora_left"] == [False] * 3  # every injected layer removed
        assert r["aux_identity_gap"] == 0.0  # B = 0: θ_aux = θ_t before any aux step, bit for bit
        assert r["aux_optimizers"] == [None] * 3  # a plain torch AdamW over the adapter, never a second engine
        for before, after in r["aux_losses"][:2]:
            assert after < before  # alignment lowers the validation loss
    assert ranks[0]["aux_hashes"] == ranks[1]["aux_hashes"]  # the same A draw and averaged gradients on both ranks
    assert ranks[0]["aux_losses"] == ranks[1]["aux_losses"]
    assert len(set(ranks[0]["aux_hashes"][:2])) == 2  # the second refresh is a new adapter


@pytest.mark.slow
def test_ddp_lora_aux(tmp_path):
    ranks = _launch(tmp_path, 2, "--aux_mode", "lora", "--check_aux_identity")
    _check_disjoint_shards_of_one_selection(ranks)
    _check_lora_aux_run(ranks)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_lora_aux(deepspeed_runs, stage):
    """Under ZeRO-3 the LoRA layers wrap the partitioned modules (their DeepSpeed hooks still gather the weights), and
    the adapter is whole on every rank; the policy's shards and its engine's optimizer are left alone."""
    ranks = deepspeed_runs(f"{stage}-loraaux")
    _check_disjoint_shards_of_one_selection(ranks)
    _check_lora_aux_run(ranks)


@pytest.mark.slow
def test_zero2_offload_aux_engine_uses_deepspeed_cpu_adam(deepspeed_runs):
    """`offload_optimizer` without PEFT: the aux engine gets DeepSpeedCPUAdam (a torch AdamW is refused by DeepSpeed).

    Its stage aligns (validation loss falls), leaves the policy alone, and selects what the same run without offload
    selects: CPU Adam and torch AdamW agree to rounding, so the first selection's bands agree to well below 1e-3.
    """
    offload, plain = deepspeed_runs("zero2-offload"), deepspeed_runs("zero2")
    assert all(r["aux_optimizers"] == ["DeepSpeedCPUAdam"] * 2 for r in offload)
    assert all(r["aux_optimizers"] == ["AdamW"] * 2 for r in plain)
    for before, after in offload[0]["aux_losses"]:
        assert after < before
    history, reference = offload[0]["history"], plain[0]["history"]
    assert overlap_coefficient(history[1]["selected_ids"], reference[1]["selected_ids"]) >= 0.95
    for name, band in reference[1]["thresholds"].items():
        assert history[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-3)
        assert history[1]["thresholds"][name]["hi"] == pytest.approx(band["hi"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "reuse, flags",
    [
        ("reference", ()),
        ("reference_and_policy", ()),
        ("reference_and_policy", ("--ld_wpo", "--rule", "lossdiff_irm_auto")),
    ],
    ids=["reference", "reference_and_policy", "reference_and_policy-ld-wpo-auto"],
)
def test_ddp_selection_matches_the_single_process_run(tmp_path, reuse, flags):
    # 96 pairs: 2 ranks x 16 per step sees exactly the rows of 1 process x 32 per step (fp32, same seed). The log-probs
    # each rank's training steps recorded are gathered into the same pool-wide ones as the single process's; with
    # `--ld_wpo`, LD-weighted sums and θ's WPO weights, gathered and all-reduced as a third column.
    reuse_args = ("--pool", "96", "--scoring_reuse", reuse, *flags)
    two = _launch(tmp_path / "two", 2, *reuse_args)[0]["history"]
    one = _launch(tmp_path / "one", 1, *reuse_args, "--per_device_batch", "32")[0]["history"]
    assert two[1]["selected_ids"] == one[1]["selected_ids"]
    if "lossdiff_irm_auto" in flags:  # the cuts and their evidence, from the same gathered scores on every rank
        assert two[1]["percentiles"] == one[1]["percentiles"]
        for key, value in one[1]["band_evidence"]["irm"].items():
            assert two[1]["band_evidence"]["irm"][key] == pytest.approx(value, rel=1e-3, abs=1e-3)
    for name, band in one[1]["thresholds"].items():
        assert two[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-4)
        assert two[1]["thresholds"][name]["hi"] == pytest.approx(band["hi"], abs=1e-4)
    # Float summation order differs across 2 ranks, so later epochs may drift at the band edges, a little
    assert overlap_coefficient(two[2]["selected_ids"], one[2]["selected_ids"]) >= 0.9


@pytest.mark.slow
def test_ddp_resume_mid_epoch_continues_every_rank(tmp_path):
    """Resume 2 ranks inside the second shortened epoch: every rank trains the same pairs at the same LR as before."""
    # With the policy log-probs of the training steps reused: the checkpoint carries every rank's records.
    reuse = ("--scoring_reuse", "reference_and_policy")
    full = _launch(tmp_path / "full", 2, "--per_device_batch", "8", "--save_steps", "1", *reuse)
    history = full[0]["history"]
    step = history[2]["global_step"] + 1
    assert step < max(int(s) for s in full[0]["step_ids"])  # inside epoch 2, not at its end
    resumed = _launch(
        tmp_path / "resumed",
        2,
        "--per_device_batch",
        "8",
        *reuse,
        "--resume",
        str(tmp_path / "full" / "run" / f"checkpoint-{step}"),
    )
    for before, after in zip(full, resumed, strict=True):
        expected = {s: ids for s, ids in before["step_ids"].items() if int(s) > step}
        assert expected and after["step_ids"] == expected
        assert after["step_lr"] == {s: lr for s, lr in before["step_lr"].items() if int(s) > step}
    assert resumed[0]["history"] == history


@pytest.mark.slow
def test_in_epoch_selection_on_two_ranks_matches_one_process_and_zero3(tmp_path):
    """One epoch, `steps` strategy: DDP and ZeRO-3 (2 ranks x 16) select what one process (x 32) selects."""
    flags = ("--pool", "192", "--epochs", "1", "--aux_mode", "lora")
    one = _launch(tmp_path / "one", 1, *flags, "--per_device_batch", "32")[0]
    two = _launch(tmp_path / "two", 2, *flags)
    zero3 = _launch(tmp_path / "zero3", 2, *flags, "--deepspeed", str(SCRIPT.parent / "zero3.json"))
    history = one["history"]
    assert [r["event"] for r in history][:2] == ["warmup", "selection"]
    for run in (two, zero3):
        other = run[0]["history"]  # the main process writes it
        assert [r["global_step"] for r in other] == [r["global_step"] for r in history]
        assert other[1]["selected_ids"] == history[1]["selected_ids"]
        for name, band in history[1]["thresholds"].items():
            assert other[1]["thresholds"][name]["lo"] == pytest.approx(band["lo"], abs=1e-4)
        # the ranks train disjoint halves of every step, and never a pair twice in the epoch
        trained = [i for rank in run for ids in rank["step_ids"].values() for i in ids]
        assert len(trained) == len(set(trained))


@pytest.mark.slow
def test_ddp_resume_between_in_epoch_events_continues_every_rank(tmp_path):
    """One epoch on 2 ranks, resumed inside the second event's segment: the same pairs and LR on every rank."""
    flags = ("--pool", "192", "--epochs", "1", "--aux_mode", "lora", "--per_device_batch", "8")
    full = _launch(tmp_path / "full", 2, *flags, "--save_steps", "1")
    history = full[0]["history"]
    events = [r["global_step"] for r in history if r["event"] == "selection"]
    assert len(events) >= 2
    step = events[1] + 1  # inside the second event's segment
    resumed = _launch(
        tmp_path / "resumed", 2, *flags, "--resume", str(tmp_path / "full" / "run" / f"checkpoint-{step}")
    )
    for before, after in zip(full, resumed, strict=True):
        expected = {s: ids for s, ids in before["step_ids"].items() if int(s) > step}
        assert expected and after["step_ids"] == expected
        assert after["step_lr"] == {s: lr for s, lr in before["step_lr"].items() if int(s) > step}
    assert resumed[0]["history"] == history


def test_a_selection_that_differs_across_ranks_fails_loudly():
    class TwoRanks(SimpleNamespace):
        num_processes = 2
        device = torch.device("cpu")

        def gather(self, tensor):  # as if the other rank had hashed a different selection
            return torch.cat([tensor, tensor + 1])

    with pytest.raises(RuntimeError, match="differs across ranks"):
        check_same_on_all_ranks([1, 2, 3], TwoRanks(), "The selection for epoch 1")

    class SameRanks(TwoRanks):
        def gather(self, tensor):
            return torch.cat([tensor, tensor])

    check_same_on_all_ranks([1, 2, 3], SameRanks(), "The selection for epoch 1")  # no error


@pytest.mark.slow
def test_a_rank_one_scoring_batch_short_fails_fast_instead_of_hanging(tmp_path):
    """The broken variant: under ZeRO-3 (every forward a collective), rank 1's scoring loader has one batch fewer.

    Without the batch-count check rank 0 would wait in a parameter all-gather for the 60 s process-group timeout, and
    with a longer timeout for as long as the job is allowed to live; with it both ranks stop before the first forward.
    """
    result = _run(tmp_path, 2, "--deepspeed", str(SCRIPT.parent / "zero3.json"), "--break_rank1_scoring")
    assert result.returncode != 0
    assert "the ranks would run different numbers of batches" in result.stderr
    counts = re.search(r"different numbers of batches \((\[\d+, \d+\])", result.stderr).group(1)
    first, second = json.loads(counts)
    assert first == second + 1
    assert "timed out" not in result.stderr.lower() and "Timeout" not in result.stderr
