"""The time each pending stage of a protocol is expected to take, printed with the plan.

From a finished stage of the same kind in --out-dir when there is one (its measured wall time), else
from a model of the stage:

- start-up: the wall time of the benchmark's own process less its timed work (Python, torch and the
  script's imports, building the networks): each stage pays it once;
- training: iterations x the time of a warm step (CPU_WARMUP + CPU_STEPS on a CPU), plus each
  evaluation's forward passes over the selection images (and the final one over the val images),
  timed as the step's time x (forward FLOPs / step FLOPs); the iterations and evaluations are
  train.py's own schedule (utils/schedule.run_schedule);
- stage 1: the autoencoder's and denoiser's steps x their warm step times; sampling: images / the
  sampling rate, plus the C2ST's classifier steps (timed) and nothing for the memorisation report
  (one matrix product);
- predict.py: the val images' forward passes, as evaluations.
Data checks and image decoding are left out (seconds for BUSI's 647 images).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataloaders.io import read_id_list, split_file
from dataloaders.splits import load_run_data
from generation.sampling_config import C2ST_FOLDS, MEMORISATION_SIZE
from utils.config import save_yaml, file_values
from utils.runtime import resolve_device
from utils.schedule import run_schedule
from segmenter.options import resolve_method

from .ledger import Ledger, Stage, child_environment, format_seconds
from .plan import ROOT, SCRIPT_OPTIONS, stage_config, stage_kind

def benchmark(script: str, flags: list[str]) -> tuple[list[dict], float]:
    """(rows of a benchmark script's --json output, the script's wall time in seconds)."""
    print(f"timing the step for the estimate (--no-estimate skips this): benchmarks/{script} {shlex.join(flags)}",
          flush=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags, "--json"], cwd=ROOT,
                            env=child_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks/{script} failed: {result.stderr.strip()[-500:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], time.monotonic() - started


# Warm steps timed per benchmark on a CPU (a GPU: the scripts' own counts, 10 + 50). Three warm-up and
# ten timed steps: the first steps of a process are the slow ones (allocator, caches), and three
# timed steps were one slow outlier away from a wrong estimate (issue 17: 78 min for a 9-minute arm).
CPU_WARMUP, CPU_STEPS = 3, 10


def forward_flops_per_image(cfg) -> float:
    """FLOPs of one eval-mode forward pass of the segmenter on one image (what evaluation and predict.py
    run), counted at 32x32 and scaled by the pixels: every layer is a convolution or pointwise."""
    from torch.utils.flop_counter import FlopCounterMode
    from networks.mgcc import MGCCNet

    model = MGCCNet(in_channels=cfg.in_channels, width=cfg.width, mixer_depth=cfg.mixer_depth,
                    mixer_kernel=cfg.mixer_kernel).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.in_channels, 32, 32))
    return counter.get_total_flops() * (cfg.image_size / 32) ** 2


def c2st_seconds(count: int, device: str) -> float:
    """The C2ST of sample_ldm.py on ``count`` images per set: its classifier's steps, timed here."""
    from generation.image_quality import C2ST_EPOCHS, TwoSampleClassifier

    if count < C2ST_FOLDS:
        return 0.0
    classifier = TwoSampleClassifier()
    optimizer = torch.optim.Adam(classifier.parameters())
    images, labels = torch.zeros(32, 1, MEMORISATION_SIZE, MEMORISATION_SIZE), torch.zeros(32)
    for k in range(CPU_WARMUP + CPU_STEPS):
        if k == CPU_WARMUP:
            started = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_image = (time.perf_counter() - started) / (CPU_STEPS * 32)
    folds = C2ST_FOLDS  # each fold trains on (folds - 1) / folds of the 2 x count images
    return folds * C2ST_EPOCHS * 2 * count * (folds - 1) / folds * per_image


class Rates:
    """The benchmarked rates of one device, each benchmark run once per distinct setting."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = resolve_device(device).type == "cuda"
        self.variant = "bf16 + channels_last" if self.cuda else "fp32 eager"  # train.py's and train_ldm.py's defaults there
        self.counts = [] if self.cuda else ["--steps", str(CPU_STEPS), "--warmup", str(CPU_WARMUP)]
        self.cache: dict[tuple, dict] = {}

    def train(self, cfg) -> dict:
        """{step, startup, image} seconds of a train.py stage: a warm step, the start-up, one image's forward pass."""
        resolve_method(cfg)  # each arm's own method and network
        key = ("train", cfg.method, cfg.network, cfg.width, cfg.image_size, cfg.batch_size, cfg.labeled_batch_size,
               cfg.in_channels)
        if key not in self.cache:
            flags = ["--device", self.device, "--method", cfg.method, "--network", cfg.network, "--width",
                     str(cfg.width), "--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size),
                     "--labeled-batch-size", str(cfg.labeled_batch_size), "--variants", self.variant, *self.counts]
            (row,), wall = benchmark("bench_train.py", flags)
            step = 1 / row["it_per_s"]
            timed = (CPU_WARMUP + CPU_STEPS + 1) * step if not self.cuda else 61 * step
            self.cache[key] = {"step": step, "startup": max(wall - timed, 0.0),
                               "image": step * forward_flops_per_image(cfg) / (row["tflop_per_step"] * 1e12)}
        return self.cache[key]

    def ldm(self, ldm_cfg, sampling_steps: int | None) -> dict:
        """Steps/s of the autoencoder and the denoiser (sampling_steps None), or images/s of sampling."""
        key = ("ldm", sampling_steps)
        if key not in self.cache:
            with tempfile.TemporaryDirectory() as tmp:
                save_yaml(file_values(ldm_cfg, SCRIPT_OPTIONS["train_ldm.py"]), Path(tmp) / "ldm.yaml")
                common = ["--config", str(Path(tmp) / "ldm.yaml"), "--device", self.device, "--variants", self.variant,
                          "--no-progress"]
                if sampling_steps is None:
                    rows, wall = benchmark("bench_ldm.py", [*common, "--what", "all", "--ddim-steps", "0",
                                                            "--dpmsolver-steps", "0", *self.counts])
                    rates = {row["benchmark"].split()[0]: row["it_per_s"] for row in rows}
                    warm = CPU_WARMUP + CPU_STEPS + 1 if not self.cuda else 61  # + the step whose FLOPs are counted
                    timed = sum(warm / rates[k] for k in ("autoencoder", "denoiser"))
                else:  # one warm-up batch, one timed, one counted (bench_ldm.py's own counts on a CPU)
                    rows, wall = benchmark("bench_ldm.py", [*common, "--what", "sampling", "--ddim-steps",
                                                            str(sampling_steps), "--dpmsolver-steps", "0"])
                    rates = {"sampling": rows[0]["it_per_s"]}
                    timed = (3 if not self.cuda else 7) * 16 / rates["sampling"]
                rates["startup"] = max(wall - timed, 0.0)
            self.cache[key] = rates
        return self.cache[key]


def stage_run_data(cfg):
    """The labeled, selection and report images a train.py stage will have (no file is read but the lists)."""
    return load_run_data(cfg.data_dir, cfg.split, cfg.labeled_fraction, cfg.holdout, [], False,
                         need_unlabeled=False, check_files=False, split_name=cfg.split_name,
                         labeled_list=getattr(cfg, "labeled_list", None))


def training_seconds(stage: Stage, rates: Rates) -> float:
    """train.py: start-up + its schedule's iterations x a warm step + its evaluations' forward passes."""
    cfg = stage_config(stage)
    data = stage_run_data(cfg)
    schedule = run_schedule(cfg, data)
    rate = rates.train(cfg)
    evaluations = math.ceil(schedule.iterations / schedule.eval_every)
    return (rate["startup"] + schedule.iterations * rate["step"]
            + (evaluations * len(data.selection) + len(data.report or data.selection)) * rate["image"])


def predict_seconds(stage: Stage, stages: list[Stage], rates: Rates) -> float:
    """predict.py: start-up + the val images' forward passes, at its training stage's rates. A fidelity stage
    (issue 31: the supervised arm's checkpoint on the split's pairs or samples, named <images' stage>/predict):
    start-up + those images' forward passes."""
    named = next(s for s in stages if s.name == stage.name.rsplit("/", 1)[0])
    if named.command[0] == "sample_ldm.py":
        checkpoint = Path(stage.command[stage.command.index("--checkpoint") + 1])
        train_stage = next(s for s in stages if s.command[0] == "train.py" and s.folder == checkpoint.parent)
        rate = rates.train(stage_config(train_stage))
        return rate["startup"] + stage_config(named).num_images * rate["image"]
    cfg = stage_config(named)
    data = stage_run_data(cfg)
    rate = rates.train(cfg)
    return rate["startup"] + len(data.report or data.selection) * rate["image"]


# stage 1's kinds of stage and the generator each belongs to (issue 31: the pairs' mask-conditioned one)
GENERATOR_OF = {"ldm": "ldm", "samples": "ldm", "ldm-pairs": "ldm-pairs", "pairs": "ldm-pairs"}


def generator_seconds(stage: Stage, kind: str, stages: list[Stage], rates: Rates) -> float:
    """train_ldm.py: its autoencoder's and denoiser's steps; sample_ldm.py: its images and its C2ST."""
    cfg = stage_config(stage)
    generator = GENERATOR_OF[kind]
    ldm_cfg = stage_config(next(s for s in stages if s.name == stage.name[:-len(kind)] + generator))
    rate = rates.ldm(ldm_cfg, cfg.steps if kind != generator else None)
    if kind == generator:
        return rate["startup"] + ldm_cfg.vae_steps / rate["autoencoder"] + ldm_cfg.diffusion_steps / rate["denoiser"]
    train_ids = len(read_id_list(split_file(ldm_cfg.data_dir, "train", ldm_cfg.split, ldm_cfg.split_name)))
    return (rate["startup"] + cfg.num_images / rate["sampling"]
            + (c2st_seconds(min(cfg.num_images, train_ids), rates.device) if cfg.c2st else 0))


def warn_if_busy(cuda: bool) -> None:
    if not cuda and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: this machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): the "
              "steps timed now run slower than on an idle machine, and the estimate can be off by more than 2x "
              "either way (the other work may end)", flush=True)


def estimate(stages: list[Stage], statuses: dict[str, str], ledger: Ledger, device: str, nproc: int) -> None:
    """Fill in each pending stage's estimated seconds (the module's docstring says how)."""
    rates = Rates(device)
    measured = {}
    for stage in stages:
        seconds = ledger.seconds(stage.name)
        if seconds is not None:
            measured.setdefault(stage_kind(stage.name), seconds)
    warn_if_busy(rates.cuda)
    for stage in stages:
        if statuses[stage.name] == "done":
            continue
        kind = stage_kind(stage.name)
        if kind in measured:
            stage.estimate, stage.estimate_source = measured[kind], "a finished stage of this kind"
        elif kind.endswith("predict"):
            stage.estimate = predict_seconds(stage, stages, rates)
            stage.estimate_source = "model: start-up + forward passes"
        else:
            seconds = (generator_seconds(stage, kind, stages, rates) if kind in GENERATOR_OF
                       else training_seconds(stage, rates))
            stage.estimate = seconds / nproc
            stage.estimate_source = "model: start-up + warm steps" + (f", / {nproc} processes" if nproc > 1 else "")


def print_plan(stages: list[Stage], statuses: dict[str, str]) -> None:
    print(f"\n{'stage':32s} {'status':8s} {'estimate':>10s}  from")
    for stage in stages:
        print(f"{stage.name:32s} {statuses[stage.name]:8s} {format_seconds(stage.estimate):>10s}  "
              f"{stage.estimate_source}")
    pending = [s.estimate for s in stages if statuses[s.name] != "done" and s.estimate is not None]
    if pending:
        print(f"estimated time of what remains: {format_seconds(sum(pending))} (start-up, steps, evaluations and "
              "sampling; data checks and image decoding come on top)", flush=True)
