"""The runner both benchmarks share (benchmarks/bench_train.py: stage 2; benchmarks/bench_ldm.py:
stage 1), after diffusers' ``benchmarks/benchmarking_utils.py``: the variants, the device's name
and peak, FLOP counting, and the timing of a step between device synchronisations.

A benchmark script is then a scenario: it builds the step of its variant from the library modules
the training scripts use (segmenter.training, networks.ldm, generation.losses) and hands it here.
"""
from __future__ import annotations

import platform
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 peak (TFLOP/s) of devices this project is measured on, for the fraction column
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# compile: None, or train.py's (compile_scope, compile_mode); --compile-mode replaces "default"
VARIANTS = {
    "fp32 eager": dict(dtype=None, channels_last=False, compile=None),
    "bf16 + channels_last": dict(dtype=torch.bfloat16, channels_last=True, compile=None),
    "bf16 + channels_last + compile": dict(dtype=torch.bfloat16, channels_last=True, compile=("model", "default")),
    "bf16 + channels_last + compiled step + CUDA graphs": dict(dtype=torch.bfloat16, channels_last=True,
                                                               compile=("step", "reduce-overhead")),
}


def default_variants(device: torch.device, on_cuda: list[str]) -> list[str]:
    """What a benchmark runs unless told: ``on_cuda`` on CUDA; on a CPU what the training scripts
    train with there (--precision auto is fp32 and --channels-last auto is off on a CPU: on the
    2-core CPU this project is measured on, bf16 + channels_last ran 6.5 x slower than fp32)."""
    return on_cuda if device.type == "cuda" else ["fp32 eager"]


def memory_format(spec: dict) -> torch.memory_format:
    return torch.channels_last if spec["channels_last"] else torch.contiguous_format


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bf16_peak(name: str) -> float | None:
    """The dense bf16 peak TFLOP/s of a device by its name, when known."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def counted_flops(work: Callable[[], object]) -> int:
    """FLOPs of ``work()`` as torch.utils.flop_counter counts them: 2 per multiply-add of every
    matrix product and convolution, forward and (when ``work`` runs one) backward; elementwise
    operations, normalisations and optimizer updates count 0."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> dict:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones between device
    synchronisations: seconds per step, peak memory (GiB, CUDA only; NaN elsewhere) and the warm-up's
    wall time (warmup_s)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started  # compilation falls in the first calls
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "ms_per_step": 1000 * seconds, "peak_mem_gib": peak, "warmup_s": warmup_s}
