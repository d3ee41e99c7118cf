"""Peak host memory of one full-copy DeepSpeed aux build, per rank, on the CPU (host memory is the device's here).

A bf16 Llama of 33.5M parameters is trained by a ZeRO-2 or ZeRO-3 engine on 2 ranks; then `AuxiliaryModel._build_engine`
builds θ_aux from it while a thread samples this process's resident set every 0.5 ms. Two peaks above the RSS before
the build, in MiB: up to the call of `deepspeed.initialize` for the aux (construct + copy: what this module decides),
and up to the engine being ready (DeepSpeed's own engine set-up added). glibc must return large blocks at once, or
freed memory stays resident and hides new allocations, so run it with a fixed mmap threshold:

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu \
        torchrun --nproc_per_node 2 tests/distributed/aux_build_memory.py --stage 3 [--auxiliary OLD_auxiliary.py]

`--auxiliary` measures another version of `trl_select/auxiliary.py` (e.g. `git show f695764:trl_select/auxiliary.py`).
Each rank logs one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import transformers  # noqa: E402

from trl_select.auxiliary import AlignmentSettings, AuxiliaryModel  # noqa: E402


logger = logging.getLogger("aux_build_memory")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class PeakSampler:
    """Samples the resident set every 0.5 ms on a thread (torch releases the GIL in its kernels) and keeps the max."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0005)

    def stop(self) -> int:
        """Stop sampling; the peak resident set, in bytes."""
        self.running = False
        self.thread.join()
        return max(self.peak, resident_bytes())


def load_auxiliary_class(path: str | None) -> type[AuxiliaryModel]:
    """`AuxiliaryModel` from this checkout, or from another version of `auxiliary.py` (imported inside trl_select)."""
    if path is None:
        return AuxiliaryModel
    spec = importlib.util.spec_from_file_location("trl_select._measured_auxiliary", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.AuxiliaryModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=[2, 3], required=True)
    parser.add_argument("--auxiliary", default=None, help="Another version of trl_select/auxiliary.py to measure.")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    zero = {"stage": options.stage, **({"stage3_param_persistence_threshold": 0} if options.stage == 3 else {})}
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
    }
    llama = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if options.stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            model = transformers.LlamaForCausalLM(llama)
    else:
        model = transformers.LlamaForCausalLM(llama).to(torch.bfloat16)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    accelerator = argparse.Namespace(num_processes=world, device=torch.device("cpu"))
    settings = AlignmentSettings(
        beta=0.1,
        loss_type="sigmoid",
        learning_rate=1e-5,
        weight_decay=0.0,
        batch_size=1,
        num_epochs=1.0,
        max_steps=1,
        max_grad_norm=1.0,
        seed=0,
        deepspeed_config=config,
    )
    auxiliary = load_auxiliary_class(options.auxiliary)(engine.module, accelerator, None, None, None, settings)

    gc.collect()
    torch.distributed.barrier()
    before = resident_bytes()
    samplers = {"construct_copy": PeakSampler()}
    initialize = deepspeed.initialize

    def initialize_after_the_construction(*args, **kwargs):
        samplers["construct_copy"] = samplers["construct_copy"].stop()
        samplers["engine"] = PeakSampler()
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_after_the_construction
    start = time.perf_counter()
    build = auxiliary._build_engine()
    next(build)
    seconds = time.perf_counter() - start
    construct_copy = samplers["construct_copy"] - before
    whole = max(construct_copy, samplers["engine"].stop() - before)
    torch.distributed.barrier()
    logger.info(
        json.dumps(
            {
                "stage": options.stage,
                "auxiliary": options.auxiliary or "this checkout",
                "rank": rank,
                "parameters": numel,
                "construct_copy_MiB": round(construct_copy / 2**20, 1),
                "construct_copy_bytes_per_parameter": round(construct_copy / numel, 2),
                "with_engine_MiB": round(whole / 2**20, 1),
                "with_engine_bytes_per_parameter": round(whole / numel, 2),
                "bf16_model_MiB": round(numel * 2 / 2**20, 1),
                "seconds": round(seconds, 2),
            }
        )
    )
    build.close()


if __name__ == "__main__":
    main()
