"""What a CUDA machine meets, checked on the CPU: the install check (a stand-in nvidia-smi), the RNG state
of the training device across GPU counts (a mocked torch.cuda), the host-to-device copies of each method's
step, the checkpoint interval."""
from __future__ import annotations

import contextlib
import os
import stat

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import utils.training
from conftest import run_script
from methods import METHODS
from segmenter.options import OPTIONS
from segmenter.training import MethodTraining
from utils.config import ConfigError, parse_config
from utils.distributed import Context
from utils.runtime import resolve_device, rng_state, set_rng_state
from utils.training import Trainer, TrainingState


def stand_in_nvidia_smi(folder, listing: str, status: int = 0):
    """An executable nvidia-smi in ``folder`` that prints ``listing`` and exits with ``status``."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'LIST'\n{listing}\nLIST\nexit {status}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return folder


H200 = "GPU 0: NVIDIA H200 (UUID: GPU-0000)\nGPU 1: NVIDIA H200 (UUID: GPU-0001)"


def test_auto_device_refuses_gpus_that_torch_cannot_use(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", f"{stand_in_nvidia_smi(tmp_path / 'bin', H200)}:{os.environ['PATH']}")
    with pytest.raises(ConfigError, match=r"nvidia-smi lists 2 GPU\(s\) but torch .* cannot use them.*--device cpu"):
        resolve_device("auto")
    with pytest.raises(ConfigError, match="nvidia-smi lists 2 GPU"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: no check


@pytest.mark.parametrize("listing, status", [("No devices were found", 6), ("", 0)], ids=["fails", "empty"])
def test_auto_device_is_the_cpu_where_the_driver_sees_no_gpu(tmp_path, monkeypatch, listing, status):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", f"{stand_in_nvidia_smi(tmp_path / 'bin', listing, status)}:{os.environ['PATH']}")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no nvidia-smi at all
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.slow
def test_train_says_so_in_one_error_line(tmp_path, dataset):
    bin_dir = stand_in_nvidia_smi(tmp_path / "bin", H200)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{path}"
    try:
        result = run_script("train.py", "--data-dir", dataset, "--out-dir", tmp_path / "run", "--iterations", "2",
                            check=False, timeout=300)
    finally:
        os.environ["PATH"] = path
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --device auto: nvidia-smi lists 2 GPU(s)") and "Traceback" not in result.stderr


class FakeCudaGenerators:
    """torch.cuda's RNG functions over ``count`` visible GPUs, each state a distinct tensor."""

    def __init__(self, count: int):
        self.states = [torch.full((8,), 10 + k, dtype=torch.uint8) for k in range(count)]

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device("cuda", device).index if isinstance(device, int) else device.index].clone()

    def set_rng_state(self, state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index
        self.states[index] = state.clone()  # IndexError past the visible GPUs, as torch's

    def install(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("every GPU's state is neither saved nor restored")
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return self


def test_rng_state_is_the_training_device_s_own(monkeypatch):
    four = FakeCudaGenerators(4).install(monkeypatch)
    saved = rng_state(torch.device("cuda", 3))  # rank 3 of a torchrun stage on four GPUs
    assert torch.equal(saved["cuda_device"], four.states[3]) and "cuda" not in saved
    one = FakeCudaGenerators(1).install(monkeypatch)  # resumed in one process, one GPU visible
    set_rng_state(saved, torch.device("cuda"))
    assert torch.equal(one.states[0], torch.full((8,), 13, dtype=torch.uint8))
    assert "cuda_device" not in rng_state(torch.device("cpu"))


def test_rng_state_of_older_checkpoints_restores_with_fewer_gpus(monkeypatch):
    older = {"torch": torch.get_rng_state(), "cuda": [torch.full((8,), 20 + k, dtype=torch.uint8) for k in range(4)]}
    two = FakeCudaGenerators(2).install(monkeypatch)
    set_rng_state(older, torch.device("cuda", 1))  # its own index where the list has it
    assert torch.equal(two.states[1], older["cuda"][1]) and torch.equal(two.states[0], torch.full((8,), 10, dtype=torch.uint8))
    six = FakeCudaGenerators(6).install(monkeypatch)
    set_rng_state(older, torch.device("cuda", 5))  # past the list: the first
    assert torch.equal(six.states[5], older["cuda"][0])


def test_cpu_rng_state_round_trips():
    saved = rng_state(torch.device("cpu"))
    first = torch.rand(5)
    set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)


# -- host-to-device copies of a training step ---------------------------------------------------------

class DeviceCopies(TorchDispatchMode):
    """Records every operation that takes a CPU tensor and gives a tensor on the stand-in device (meta):
    on a GPU each is a blocking host-to-device copy (a CPU constant made or moved per call)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type == "meta" for t in outputs):
            self.copies.append(f"{func}{[tuple(t.shape) for t in inputs if t.device.type == 'cpu']}")
        return out


def meta_autocast(monkeypatch):
    """torch.autocast has no meta device type: a no-op there (the copies counted do not depend on it)."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: contextlib.nullcontext()
                        if device_type == "meta" else real(device_type, *args, **kwargs))


@pytest.mark.slow  # training steps (on the meta device)
@pytest.mark.parametrize("name", list(METHODS))
def test_a_training_step_copies_nothing_from_the_host(name, monkeypatch):
    """Every method's whole step (forward, backward, SGD, EMA, lambda, scheduler) on the meta device standing
    for a GPU: after the first step no CPU constant reaches the device (the official normalisation's constants
    and lambda included), and nothing is read back (a meta tensor cannot be: .item() or .cpu() would raise).
    What does reach it: kornia's per-image random factors, drawn on the CPU by design (methods/augment.py),
    five small copies per strong view."""
    meta_autocast(monkeypatch)
    network = "mgcc" if name == "mgcc" else "unet"
    cfg = parse_config(OPTIONS, "", ["--method", name, "--network", network, "--width", "4", "--mixer-depth", "1",
                                     "--precision", "fp32", "--channels-last", "off"])
    device = torch.device("meta")
    method = MethodTraining(cfg, Context(), device, iterations=100)
    method.begin()
    images = torch.randn(8 if method.semi else 4, 3, 32, 32, device=device)
    masks = (torch.rand(4, 1, 32, 32, device=device) > 0.5).float()
    method.train_step(images, masks, 0)  # the first step may set things up
    with DeviceCopies() as seen:
        for it in (1, 2, 3):
            losses = method.train_step(images, masks, it)
    assert all(v.device == device for v in losses.values())
    kornia_factors = ["(4,)", "(4,)", "(4, 1, 1, 1)", "(4, 2)", "(4, 1, 1, 1)"]  # brightness, contrast, their
    # broadcast forms, the blur's sigmas: one call of jitter and blur on the 4 unlabeled images
    views = getattr(method.module, "strong_views", 0)
    assert [c.split("[")[1].rstrip("]") for c in seen.copies] == kornia_factors * views * 3, seen.copies


# -- the checkpoint interval ------------------------------------------------------------------------------

class CountingRun(Trainer):
    """A loop of a one-weight model whose clock advances ``seconds_per_step`` each step."""

    def __init__(self, tmp_path, clock, seconds_per_step, **kwargs):
        self.model = torch.nn.Linear(1, 1)
        super().__init__(20, 0, Context(), torch.device("cpu"), stop=False, state=TrainingState(model=self.model),
                         kind="test", checkpoint_path=tmp_path / "last.pt", progress=False, **kwargs)
        self.clock, self.seconds_per_step = clock, seconds_per_step
        self.saved, self.evaluated = [], []

    def train_step(self, step):
        self.clock[0] += self.seconds_per_step
        return {"loss": self.model.weight.sum().detach()}

    def on_eval(self, done):
        self.evaluated.append(done)

    def on_checkpoint(self, done):
        self.saved.append(done)


@pytest.mark.parametrize("minutes, every, expected", [
    # 25 s a step; losses read every 2 steps and at each evaluation (5, 15): the first reading 60 s or more
    # after the last checkpoint writes one
    (1.0, 0, [4, 8, 12, 15, 18, 20]),
    (1.0, 6, [4, 6, 10, 12, 15, 18, 20]),  # with an iteration interval too: each checkpoint restarts the clock
    (0.0, 0, [20]),                 # neither: the end only
    (0.0, 5, [5, 10, 15, 20]),
])
def test_checkpoints_follow_wall_time_not_evaluations(tmp_path, monkeypatch, minutes, every, expected):
    clock = [1000.0]
    monkeypatch.setattr(utils.training.time, "monotonic", lambda: clock[0])
    run = CountingRun(tmp_path, clock, 25.0, log_every=2, checkpoint_every=every, eval_every=5,
                      checkpoint_minutes=minutes)
    assert run.run("test") and run.saved == expected and run.evaluated == [5, 10, 15, 20]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 20


def test_train_writes_checkpoint_last_by_time_by_default():
    option = next(o for o in OPTIONS if o.name == "checkpoint_minutes")
    assert option.default == 10.0 and next(o for o in OPTIONS if o.name == "checkpoint_every").default is None


# -- SLURM from a login node without a GPU ----------------------------------------------------------------

def test_slurm_jobs_ask_for_gpus_whatever_the_submitting_host_has(monkeypatch):
    from protocol.cluster import job_gpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a login node
    monkeypatch.setenv("PATH", "/nonexistent")  # and no nvidia-smi there
    assert job_gpus("slurm", "auto", None, 2) == 2 and job_gpus("slurm", "cuda", None, 1) == 1
    assert job_gpus("slurm", "cpu", None, 2) == 0 and job_gpus("slurm", "auto", 4, 1) == 4
    assert job_gpus("submitit-local", "auto", None, 2) == 0  # its jobs run here: this host's device


@pytest.mark.slow
def test_slurm_scripts_from_a_cpu_host_request_gpus_and_resolve_the_device_in_the_job(tmp_path):
    """reproduce.py --launcher slurm --device auto on this CPU machine, against stand-ins for sbatch and sacct:
    each job asks for a GPU and passes --device auto on, to be resolved on its node."""
    import subprocess
    import sys
    from conftest import ROOT, fake_sbatch, write_dataset
    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    bin_dir = tmp_path / "bin"
    fake_sbatch(bin_dir)
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'JobID|State|NodeList'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE=str(tmp_path))
    command = [sys.executable, str(ROOT / "reproduce.py"), "--data-dir", str(data), "--out-dir", str(tmp_path / "out"),
               "--preset", "demo", "--no-generator", "--arms", "supervised", "--labeled-fraction", "0.5",
               "--launcher", "slurm", "--device", "auto", "--no-progress", "--no-estimate"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for job in ("job101.sh", "job102.sh"):
        script = (tmp_path / job).read_text()
        assert "#SBATCH --gpus-per-node=1" in script, script
    pickled = list((tmp_path / "out" / "submitit").rglob("*_submitted.pkl"))
    assert pickled and all(b"--device" in p.read_bytes() and b"auto" in p.read_bytes() for p in pickled)


def test_the_denoiser_s_batch_reaches_the_device_in_one_copy():
    from generation.losses import batch_on_device
    batch = [(5, True), (2, False), (7, True)]
    with DeviceCopies() as seen:
        index, flip = batch_on_device(batch, torch.device("meta"))
    assert len(seen.copies) == 1 and index.shape == flip.shape == (3,) and index.device.type == "meta"
    index, flip = batch_on_device(batch, torch.device("cpu"))
    assert index.tolist() == [5, 2, 7] and flip.tolist() == [1, 0, 1]


def test_peak_memory_is_the_training_device_s(tmp_path, monkeypatch):
    from segmenter.run import RunRecord
    asked = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 3 * 2 ** 30)
    record = RunRecord(tmp_path, "val", writer=False, device=torch.device("cuda", 1))
    record.add(10, {"iou": 0.5, "dice": 0.6}, {"loss": 1.0}, 0.01)
    assert asked == [torch.device("cuda", 1)] and record.history[-1]["peak_mem_gib"] == 3.0
    record = RunRecord(tmp_path, "val", writer=False, device=torch.device("cpu"))
    record.add(10, {"iou": 0.5, "dice": 0.6}, {"loss": 1.0}, 0.01)
    assert "peak_mem_gib" not in record.history[-1] and len(asked) == 1


def test_loader_batches_are_joined_on_the_device():
    """Each (pinned) part is copied, then concatenated on the device; a host torch.cat would copy an unpinned
    tensor."""
    from types import SimpleNamespace
    from dataloaders.training_batches import TrainingBatches
    labeled = iter([{"image": torch.ones(2, 3, 4, 4), "mask": torch.ones(2, 1, 4, 4)}])
    unlabeled = iter([{"image": torch.zeros(3, 3, 4, 4)}])
    fake = SimpleNamespace(on_device=False, loaders=[labeled, unlabeled], labeled_loaders=1,
                           device=torch.device("meta"))
    with DeviceCopies() as seen:
        images, masks = TrainingBatches.batch(fake, 0)
    assert images.shape == (5, 3, 4, 4) and images.device.type == "meta" and masks.device.type == "meta"
    assert sorted(seen.copies) == sorted(["aten._to_copy.default[(2, 3, 4, 4)]", "aten._to_copy.default[(3, 3, 4, 4)]",
                                          "aten._to_copy.default[(2, 1, 4, 4)]"])
    # with synthetic pairs (train.py --synthetic-pairs): real labeled, pairs, unlabeled; the masks of both labeled parts
    labeled = iter([{"image": torch.ones(2, 3, 4, 4), "mask": torch.ones(2, 1, 4, 4)}])
    pairs = iter([{"image": torch.ones(1, 3, 4, 4), "mask": torch.zeros(1, 1, 4, 4)}])
    unlabeled = iter([{"image": torch.zeros(3, 3, 4, 4)}])
    fake = SimpleNamespace(on_device=False, loaders=[labeled, pairs, unlabeled], labeled_loaders=2,
                           device=torch.device("meta"))
    with DeviceCopies() as seen:
        images, masks = TrainingBatches.batch(fake, 0)
    assert images.shape == (6, 3, 4, 4) and masks.shape == (3, 1, 4, 4) and masks.device.type == "meta"
    assert len(seen.copies) == 5  # each part's image and mask copied as it is: no host concatenation


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), bool(), float()): on a GPU each waits for it."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_checkpoint_checks_its_weights_with_one_read_and_copies_with_one_wait(tmp_path, monkeypatch):
    from utils.checkpoint import to_host
    from utils.training import check_finite_weights
    modules = [torch.nn.Sequential(*[torch.nn.Conv2d(2, 2, 3) for _ in range(40)]), torch.nn.BatchNorm2d(4)]
    with HostReads() as seen:
        check_finite_weights(modules, "at step 1", tmp_path / "last.pt", torch.device("cpu"))
    assert seen.reads == 1
    with torch.no_grad():
        modules[0][7].bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite weights at step 1"):
        check_finite_weights(modules, "at step 1", tmp_path / "last.pt", torch.device("cpu"))
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    state = {"model": modules[1].state_dict(), "steps": [1, 2], "lr": torch.tensor(0.1)}
    moved = to_host(state, torch.device("cuda", 1))
    assert waits == [torch.device("cuda", 1)] and torch.equal(moved["model"]["weight"], state["model"]["weight"])
    assert moved["steps"] == [1, 2] and to_host(state, torch.device("cpu")) is state


def test_dropout_and_noise_draw_the_same_numbers_in_channels_last():
    """check_bf16's 'same draw' rows compare contiguous fp32 with channels_last: the perturbations must draw
    the same mask there (F.dropout draws in memory order); on a contiguous fp32 batch, F.dropout's numbers."""
    import torch.nn.functional as F
    from networks.perturbations import AlwaysOnDropout
    x = torch.randn(2, 3, 5, 7)
    drop = AlwaysOnDropout(0.3)
    torch.manual_seed(4)
    plain = drop(x)
    torch.manual_seed(4)
    last = drop(x.contiguous(memory_format=torch.channels_last))
    torch.manual_seed(4)
    reference = F.dropout(x, 0.3, training=True)
    assert torch.equal(plain, last) and torch.equal(plain, reference)
    from methods import build_method, network_args
    teacher = build_method("mean-teacher", "unet", network_args("unet", "mean-teacher", 3, 2, 1, 3))
    torch.manual_seed(5)
    a = teacher.noised(x)
    torch.manual_seed(5)
    b = teacher.noised(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
