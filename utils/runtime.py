"""Devices, precision, reproducibility and clean stops: what every training script needs."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from .config import ConfigError


def hub_offline(env=None):
    """Hugging Face Hub offline in ``env`` (default: this process's environment), unless set there:
    the project's networks are built from its configurations or read from its run folders, never
    downloaded. Returns ``env``."""
    env = os.environ if env is None else env
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def visible_gpus() -> int:
    """GPUs that ``nvidia-smi -L`` lists here (0 without nvidia-smi, or when it fails): the driver's view,
    independent of whether this torch build can use them."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def unusable_gpus_message(name: str) -> str | None:
    """Why torch cannot use the GPUs the driver sees, or None when it sees none (a CPU-only machine)."""
    gpus = visible_gpus()
    if not gpus:
        return None
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (f"--device {name}: nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} ({build}) cannot use "
            "them: install a torch built for this driver's CUDA (docs/gpu-and-clusters.md: pip install torch "
            "--index-url https://download.pytorch.org/whl/cu126, or the cuXYZ index nvidia-smi's 'CUDA Version' "
            "allows), or pass --device cpu to train on the CPU")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error, not a silent CPU run.

    'auto' on a machine whose driver lists GPUs that torch cannot use (a CPU build, or a CUDA build newer
    than the driver) is an error too: a silent CPU run would take days where the GPU takes hours."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        unusable = unusable_gpus_message(name)
        if unusable:
            raise ConfigError(unusable)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(unusable_gpus_message(name) or
                          f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision option: 'auto' is bf16 on a CUDA GPU that has it, else fp32.

    On CPUs bf16 is fast only where the cores have bf16 instructions, so 'auto' keeps fp32 there. On GPUs
    'auto' asks for compute capability 8.0 (Ampere) or newer: ``torch.cuda.is_bf16_supported()`` also answers
    True on older GPUs (a V100, a T4), where bf16 is emulated and slower than fp32.
    """
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def native_bf16(device: torch.device) -> bool:
    """Bf16 tensor cores on CUDA device ``device``: compute capability 8.0 or newer."""
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (bf16), or full precision for None (see :func:`autocast_dtype`)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (seed, step, stream...) with numpy's SeedSequence: seeds
    made from different keys share nothing (unlike seed + n, where seeds 0 and 4 overlap)."""
    low, high = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(high) << 31 ^ int(low)) & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """The generator of one training step's random stream: a pure function of (seed, step, stream)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step, stream))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict:
    """The CPU generator's state and, when ``device`` is a GPU, that GPU's alone ("cuda_device"): a run
    resumed where fewer GPUs are visible (or in one process after torchrun) restores it to its own device."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(cuda_index(device))
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s ``state``: the GPU's state goes to ``device`` (when a GPU). Older
    checkpoints hold every visible GPU's state ("cuda", a list): ``device``'s own index is taken when the
    list has it, else the first (the list is never restored whole: fewer GPUs may be visible now)."""
    torch.set_rng_state(state["torch"])
    if device is None or device.type != "cuda":
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], cuda_index(device))
    elif state.get("cuda"):
        index = cuda_index(device)
        torch.cuda.set_rng_state(state["cuda"][index if index < len(state["cuda"]) else 0], index)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of every DataLoader: its workers ignore SIGINT and SIGTERM.

    Ctrl-C, ``timeout``, SLURM's scancel and preemption signal every process of the job, the
    data-loader workers included. A worker killed by the signal makes the main process fail with
    "DataLoader worker ... is killed by signal" before it can save; ignoring it, the workers go on
    serving batches while the main process (:class:`StopRequest`) finishes its step and saves, and
    they end with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step.

    The loop then writes its checkpoint and exits cleanly; a second signal stops at once. A repeat
    within REPEAT_SECONDS is the same request delivered twice, not a second one: a signal to the
    process group under torchrun reaches each rank directly and again forwarded by torchrun's agent.
    """
    REPEAT_SECONDS = 2.0

    def __init__(self):
        self.signal_name: str | None = None
        self.signal_number = 0
        self._received_at = 0.0

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            if time.monotonic() - self._received_at < self.REPEAT_SECONDS:
                return
            sys.exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.signal_number = signum
        self._received_at = time.monotonic()
        print(f"\n{self.signal_name} received: finishing the current step, then saving a checkpoint "
              "(signal again to stop at once)", file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.signal_name is not None
