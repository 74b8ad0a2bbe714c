"""One command that measures this code base on a GPU within a time budget: one table, as JSON and Markdown.

    python benchmarks/gpu_check.py --out-dir runs/gpu_check                        # on a CUDA GPU: 540 s at most
    python benchmarks/gpu_check.py --data-dir inputs/BUSI --out-dir runs/gpu_check # the loop and accuracy on BUSI
    python benchmarks/gpu_check.py --parts 3 4 --out-dir runs/gpu_check_34         # a second slot: the other parts
    python benchmarks/gpu_check.py --device cpu --size tiny --compile-backend eager --out-dir /tmp/gpu_check  # CI
    bash benchmarks/gpu_run.sh     # on a bare GPU image: installs the carried wheels (.whl/), then this command

Parts, in priority order (--parts chooses, e.g. --parts smoke,1 or --parts smoke 1 2):
  smoke  every script end to end at a tiny size on the device, as a user calls it (benchmarks/smoke.py):
     train_ldm.py (both stages), sample_ldm.py with its report, train.py for every method on both
     networks with --precision auto --data-on-device auto (MGCC on its own network only), one run
     stopped by SIGTERM and resumed, predict.py, torchrun over every visible GPU, reproduce.py --jobs
     <GPUs> on a tiny protocol; each row ok, or failed with the first error line, or cut, and its time;
     up to --smoke-jobs rows at once, on its own phantom data (32x32) whatever --size and --data-dir;
  1  stage 2, MGCC: train.py's step on synthetic inputs (benchmarks/bench_train.py) and train.py's own
     loop (bench_train.py --loop: data, step, read-backs, evaluation, checkpoints) for the variants fp32
     eager, bf16 + channels_last, bf16 + channels_last + compile, and the compiled whole step replayed as
     CUDA graphs: it/s, ms per iteration, peak memory, compile time, and the ratio to the official
     loop's 3.55 it/s (H100, fp32, ../shared/reference/README.md);
  2  the same for the supervised baseline and for each comparison method of train.py (the registry
     methods.METHODS where the code base has one; else train.py's --mode supervised alone);
  3  stage 1 (benchmarks/bench_ldm.py): the measured step time of both training stages and the DDIM 50
     sampling throughput of configs/ldm_busi.yaml and configs/ldm_medfusion.yaml in train_ldm.py's
     precision on the device (bf16 on CUDA: bench_ldm.py's "bf16 + channels_last"; fp32 on CPU), and
     from them the whole schedule's time beside the FLOP prediction (bench_ldm.py --what schedule);
  4  accuracy, if time is left: benchmarks/check_bf16.py's one-step check (loss terms, gradient cosine),
     then train.py for 300 iterations (evaluated every 50) at its default precision and in fp32 with the
     same seed on the data folder; the mean training losses between evaluations must agree within
     --loss-tolerance.

Sizes (--size): published (width 64, batch 4 + 4, 256x256, the official loop's setting; stage 1 at
its configurations' own sizes) or tiny (width 4, batch 2 + 2, 32x32, 2 timed steps, 4 training
iterations, stage 1 on configs/ldm_tiny.yaml at 32x32: every part within minutes on a 2-core CPU,
the CI test's run).

Data: the loops and the accuracy runs train on --data-dir (train.py's layout, split files included,
e.g. inputs/BUSI); without it on a phantom dataset made by ``python -m dataloaders.phantom`` and
split.py in a temporary folder (its own images: the speed rows hold, the accuracy rows are on
phantoms). Nothing else outside the working tree is read. Before part 3, diffusers, huggingface_hub
and safetensors are imported here (no CUDA context): where one cannot be, part 3 is skipped naming it.

Budget (--budget-s, default 540 s of wall time): the parts smoke, 1, 2, 3, 4 may run until their cumulative
share of the budget (35, 65, 80, 92, 100 %) is spent, so the time a part leaves unused goes to the next. Each
benchmark runs in its own process (the benchmark script's --json command, written in the log), killed
when its part's time runs out: its rows measured by then are kept, the rest are marked "cut", the
rows of benchmarks not started "skipped", each with its reason; nothing is left out silently.
Compilation is cold: the run has its own inductor and Triton caches (TORCHINDUCTOR_CACHE_DIR,
TRITON_CACHE_DIR), so a loop row's compile time (its start-up beyond the eager bf16 loop's) is a
first compilation, as a user's first train.py run has it; the step rows after it reuse that cache.

Writes to --out-dir: gpu_check.json (environment, every row, the recommendation), gpu_check.md
(Markdown ready to paste into benchmarks/RESULTS.md) and logs/ (each benchmark's command and its
stderr); both tables are rewritten (atomically) after every benchmark, so a kill at a command limit
keeps every row done by then. The recommendation is the fastest real-loop variant of part 1 that
compiled within --compile-limit-s (a compiled loop's start-up beyond the eager bf16 loop's), among the
loop rows measured: the candidate for train.py's CUDA default, with its train.py flags (the defaults of
train.py's options precision, channels_last, compile, compile_scope and compile_mode). Where the
budget cut or a failure lost a loop variant, it says which, and calls itself provisional.

--device auto is the first CUDA GPU; without a usable one it refuses (exit 2, saying what torch and
nvidia-smi see): a CPU run is asked for with --device cpu. A missing dependency (OpenCV, kornia,
MONAI, diffusers, huggingface_hub, safetensors, ...) fails the rows that need it, "missing <module>",
and the others run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import smoke  # benchmarks/smoke.py: the smoke part's commands (this folder is on sys.path: the script's own)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))  # the library modules (methods/: train.py's methods, where present)

# bench_train.py's variants (its --variants names), in the order of the table
VARIANTS = ("fp32 eager", "bf16 + channels_last", "bf16 + channels_last + compile",
            "bf16 + channels_last + compiled step + CUDA graphs")
# the official training loop as published, on an H100 at the published size (../shared/reference/README.md)
OFFICIAL_H100_IT_PER_S = 3.55
# the end of each part's time, as cumulative fractions of --budget-s (the priority order)
PART_ENDS = {0: 0.35, 1: 0.65, 2: 0.8, 3: 0.92, 4: 1.0}
SMOKE = 0  # the smoke part's number in the rows ("smoke" on the command line and in the tables)
PART_TITLES = {0: "every script end to end at a tiny size", 1: "stage 2, MGCC: the step and train.py's loop", 2: "stage 2: supervised and the comparison methods",
               3: "stage 1: latent diffusion training and sampling", 4: "accuracy: default precision against fp32"}
MIN_START_S = 5.0  # a benchmark with less of its part's time left is not started (it could not finish)
STATUSES = ("measured", "ok", "cut", "skipped", "failed")
# the modules the scripts import beyond torch, numpy and pillow (module: distribution), reported in the
# environment; the stage-1 part needs the last three
DEPENDENCIES = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "tqdm": "tqdm", "scipy": "scipy",
                "sklearn": "scikit-learn", "matplotlib": "matplotlib", "monai": "monai", "kornia": "kornia",
                "tensorboard": "tensorboard", "submitit": "submitit", "diffusers": "diffusers",
                "huggingface_hub": "huggingface-hub", "safetensors": "safetensors"}
STAGE1_MODULES = ("diffusers", "huggingface_hub", "safetensors")


@dataclass(frozen=True)
class Size:
    width: int
    image_size: int
    batch_size: int
    labeled_batch_size: int
    steps: int            # timed steps of the synthetic step
    warmup: int           # its untimed steps (compilation falls in them)
    eval_every: int       # the loop's train.py --eval-every; its warm-up and timed iterations are multiples
    loop_warmup: int
    loop_steps: int
    phantom_images: int
    ldm_configs: tuple[str, ...]
    ldm_overrides: tuple[str, ...]  # bench_ldm.py flags that shrink the configuration
    ldm_steps: int
    ldm_warmup: int
    sampling_batches: int
    accuracy_iterations: int
    accuracy_eval_every: int


SIZES = {
    "published": Size(64, 256, 8, 4, steps=20, warmup=5, eval_every=50, loop_warmup=50, loop_steps=100,
                      phantom_images=80, ldm_configs=("ldm_busi.yaml", "ldm_medfusion.yaml"), ldm_overrides=(),
                      ldm_steps=10, ldm_warmup=3, sampling_batches=2, accuracy_iterations=300,
                      accuracy_eval_every=50),
    "tiny": Size(4, 32, 4, 2, steps=2, warmup=1, eval_every=2, loop_warmup=2, loop_steps=2, phantom_images=16,
                 ldm_configs=("ldm_tiny.yaml",), ldm_overrides=("--image-size", "32", "--batch-size", "2",
                                                               "--sampling-batch-size", "2"),
                 ldm_steps=2, ldm_warmup=1, sampling_batches=1, accuracy_iterations=4, accuracy_eval_every=2),
}


# ----------------------------------------------------------------------------------------------
# what runs: benchmark processes and the rows they fill
# ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One benchmark process: its command, the rows it fills (matched by ``key`` fields of its JSON
    lines), and optionally JSON read from files after it ends (``collect``)."""
    part: int
    name: str
    command: list[str]
    rows: list[dict]
    key: tuple[str, ...] = ("variant",)
    collect: object = None  # callable() -> list[dict], run after the process, even a killed one
    open_ended: bool = False  # rows not known in advance (schedule): whatever comes is a row
    needs_data: bool = False  # trains on the data folder (made first when it is the phantom one)
    unrun: list = field(default_factory=list)  # its rows that are not run on this device, with the reason
    env: dict = field(default_factory=dict)


def row(part: int, benchmark: str, **identity) -> dict:
    return {"part": part, "benchmark": benchmark, **identity, "status": "skipped", "reason": ""}


def python(script: str, *args: str) -> list[str]:
    """The command of a benchmark script (benchmarks/<script>) in this interpreter."""
    return [sys.executable, str(BENCHMARKS / script), *args]


def method_flags(method: str) -> list[str]:
    """bench_train.py's flags for a method: --mode for the two it always had, --method for the others."""
    return ["--mode", method] if method in ("mgcc", "supervised") else ["--method", method]


def comparison_methods() -> list[str]:
    """train.py's methods beside MGCC: the registry methods.METHODS where it exists, else the
    supervised baseline (train.py's --mode); where the registry cannot be imported (a dependency
    missing: kornia), the names smoke.py lists, whose rows then fail saying what is missing."""
    if importlib.util.find_spec("methods") is None:
        return ["supervised"]
    try:
        from methods import METHODS
    except ImportError:
        METHODS = smoke.METHODS
    return [name for name in METHODS if name != "mgcc"]


def stage2_jobs(part: int, methods: list[str], args, size: Size, data: "DataFolder") -> list[Job]:
    """The step and the loop of each method, every variant (one process each: all variants). On a CPU
    the CUDA-graph variant is reported as not run: it is a CUDA feature, and capturing the whole step
    took minutes on the 2-core CPU even with the eager backend."""
    cuda = args.device.startswith("cuda")
    variants = [v for v in args.variants if cuda or v != VARIANTS[3]]
    common = ["--device", args.device, "--width", str(size.width), "--image-size", str(size.image_size),
              "--batch-size", str(size.batch_size), "--labeled-batch-size", str(size.labeled_batch_size),
              "--json", "--variants", *variants]

    def rows(benchmark, method):
        return ([row(part, benchmark, method=method, variant=v) for v in variants],
                mark([row(part, benchmark, method=method, variant=v) for v in args.variants if v not in variants],
                     "skipped", "CUDA graphs: a CUDA device only"))

    jobs = []
    for method in methods:  # the real loop first: the figure the speed goal is set on
        measured, unrun = rows("loop", method)
        jobs.append(Job(part, f"loop_{method}", python(
            "bench_train.py", *common, *method_flags(method), "--loop", "--data-dir", str(data.path),
            "--eval-every", str(size.eval_every), "--warmup", str(size.loop_warmup), "--steps", str(size.loop_steps),
            # every other train.py option at its default, the checkpoint interval included: its cost is in the rows
            "--train-args", "--num-workers 2"),
            measured, needs_data=True, unrun=unrun))
        measured, unrun = rows("step", method)
        jobs.append(Job(part, f"step_{method}", python("bench_train.py", *common, *method_flags(method),
                                                       "--steps", str(size.steps), "--warmup", str(size.warmup)),
                        measured, unrun=unrun))
    return jobs


def ldm_variant(device: str) -> str:
    """bench_ldm.py's variant nearest train_ldm.py's default precision (auto: bf16 on CUDA, fp32 on a CPU;
    train_ldm.py keeps the default memory layout, bench_ldm.py's bf16 variant uses channels_last)."""
    return VARIANTS[1] if device.startswith("cuda") else VARIANTS[0]


def stage1_jobs(args, size: Size) -> list[Job]:
    variant = ldm_variant(args.device)
    configs = [str(ROOT / "configs" / name) for name in size.ldm_configs]
    common = ["--device", args.device, "--json", "--no-progress", "--variants", variant, *size.ldm_overrides]
    jobs = []
    for config, name in zip(configs, size.ldm_configs):
        for what, title, steps, warmup in (
                ("vae", "autoencoder training", size.ldm_steps, size.ldm_warmup),
                ("diffusion", "denoiser training", size.ldm_steps, size.ldm_warmup),
                ("sampling", "sampling DDIM 50", size.sampling_batches, 1)):
            jobs.append(Job(3, f"ldm_{Path(name).stem}_{what}", python(
                "bench_ldm.py", "--config", config, "--what", what, "--ddim-steps", "50", "--dpmsolver-steps", "0",
                "--steps", str(steps), "--warmup", str(warmup), *common),
                [row(3, title, config=name, variant=variant)], key=("benchmark", "variant")))
    # FLOPs on the meta device, nothing timed: the prediction the measured rows are set beside
    jobs.append(Job(3, "ldm_schedule", python("bench_ldm.py", "--what", "schedule", "--config", *configs, "--json",
                                              "--no-progress", *size.ldm_overrides),
                    [], key=("config", "part_name"), open_ended=True))
    return jobs


def accuracy_jobs(args, size: Size, data: "DataFolder", work: Path) -> list[Job]:
    """check_bf16.py's step check, then train.py at its default precision and in fp32 (same seed)."""
    cuda = args.device.startswith("cuda")
    jobs = [Job(4, "check_bf16", python("check_bf16.py", "--device", args.device, "--width", str(size.width),
                                        "--image-size", str(size.image_size), "--json"),
                [row(4, "one step, bf16 + channels_last against fp32", check="step")], key=("check",))]
    # train.py's default on a CUDA GPU is bf16 autocast; on a CPU its default is fp32, so bf16 is compared there
    runs = {"default": [] if cuda else ["--precision", "bf16"], "fp32": ["--precision", "fp32", "--channels-last", "off"]}
    for name, flags in runs.items():
        out = work / f"accuracy_{name}"
        command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data.path), "--out-dir", str(out),
                   "--width", str(size.width), "--image-size", str(size.image_size), "--batch-size", str(size.batch_size),
                   "--labeled-batch-size", str(size.labeled_batch_size), "--iterations", str(size.accuracy_iterations),
                   "--eval-every", str(size.accuracy_eval_every), "--checkpoint-every", str(size.accuracy_iterations),
                   "--seed", "1337", "--device", args.device, "--no-progress", "--num-workers", "2", *flags]
        jobs.append(Job(4, f"accuracy_{name}", command, [row(4, "train.py loss curve", run=name)], key=("run",),
                        collect=lambda out=out, name=name: loss_curve(out, name), needs_data=True))
    return jobs


def loss_curve(run_dir: Path, name: str) -> list[dict]:
    """The run's mean training loss between evaluations, from its metrics.jsonl (partial if it was cut)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return []
    return [{"run": name, "curve": [[r["iteration"], r["train_loss"]] for r in records],
             "final_iou": records[-1].get("iou")}]


# ----------------------------------------------------------------------------------------------
# running a job within its part's time
# ----------------------------------------------------------------------------------------------

class DataFolder:
    """--data-dir, or a phantom dataset made on first use (python -m dataloaders.phantom, split.py)."""

    def __init__(self, given: str | None, work: Path, size: Size, logs: Path, name: str = "phantom"):
        self.path = Path(given) if given else work / name
        self.name = name
        self.ready = given is not None
        self.error = ""
        self.size, self.logs = size, logs

    def make(self, deadline: float, env: dict) -> tuple[bool, str]:
        """(ready, why not); a failure is final, a cut by the budget is retried by a later part."""
        if self.ready or self.error:
            return self.ready, self.error
        side = str(max(self.size.image_size, 32))  # phantom's smallest side
        for name, command in (
                ("phantom", [sys.executable, "-m", "dataloaders.phantom", "--out-dir", str(self.path), "--num-images",
                             str(self.size.phantom_images), "--height", side, "--width", side, "--preview-count", "0",
                             "--overwrite"]),
                ("split", [sys.executable, str(ROOT / "split.py"), "--data-dir", str(self.path), "--overwrite"])):
            code, _, reason = run_process(command, deadline, self.logs / f"{self.name}_{name}.log", env)
            if code is None:
                return False, f"phantom data: {reason}"
            if code != 0:
                self.error = f"phantom data: {reason}"
                return False, self.error
        self.ready = True
        return True, ""


def run_process(command: list[str], deadline: float, log: Path, env: dict) -> tuple[int | None, list[str], str]:
    """Run ``command`` from the repository root until ``deadline`` (time.monotonic()); its stderr goes
    to ``log``. Returns (exit status or None if killed at the deadline, stdout lines, reason)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        err.write("$ " + shlex.join(command) + "\n")
        err.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                   start_new_session=True)  # its own process group: workers are ended with it
        smoke.LIVE.add(process.pid)  # killed by gpu_check's SIGTERM handler
        try:
            out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.0))
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            code = None
        finally:
            smoke.LIVE.discard(process.pid)
    lines = out.splitlines()
    if smoke.STOPPED.is_set():
        return None, lines, smoke.STOP_REASON
    if code is None:
        return None, lines, "budget: its part's time ran out"
    if code != 0:  # the line that says what went wrong ("missing kornia", "error: ...", the exception)
        return code, lines, f"exit {code}: {smoke.first_error(log.read_text(errors='replace'))[:200]}"
    return 0, lines, ""


def parse_json_lines(lines: list[str]) -> list[dict]:
    objects = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return objects


def run_job(job: Job, deadline: float, logs: Path, env: dict, data: DataFolder) -> list[dict]:
    """Run one job (or skip it), fill its rows and return them."""
    left = deadline - time.monotonic()
    if smoke.STOPPED.is_set():
        return mark(job.rows or [row(job.part, job.name)], "skipped", smoke.STOP_REASON)
    if left < MIN_START_S:
        return mark(job.rows or [row(job.part, job.name)], "skipped",
                    f"budget: {max(left, 0):.0f} s left of part {job.part}'s time")
    if job.needs_data:
        ready, why = data.make(deadline, env)
        if not ready:
            return mark(job.rows, "failed" if data.error else "cut", why)
    code, lines, reason = run_process(job.command, deadline, logs / f"{job.name}.log", {**env, **job.env})
    objects = parse_json_lines(lines) + (job.collect() if job.collect else [])
    # bench_ldm.py's schedule rows name their part of the schedule "part": ours is the gpu_check part
    objects = [{("part_name" if k == "part" else k): v for k, v in obj.items()} for obj in objects]
    rows = list(job.rows)
    for obj in objects:
        found = next((r for r in rows if all(r.get(k) == obj.get(k) for k in job.key)), None)
        if found is None and job.open_ended:
            found = row(job.part, job.name)
            rows.append(found)
        if found is not None:
            found.update({k: v for k, v in obj.items() if k not in ("status", "reason")}, status="measured", reason="")
    missing = [r for r in rows if r["status"] != "measured"]
    if job.open_ended and not rows:
        missing = [row(job.part, job.name)]
        rows = missing
    if missing:
        status = "cut" if code is None else "failed"
        mark(missing, status, reason or "the benchmark ended without this row")
    return rows


def mark(rows: list[dict], status: str, reason: str) -> list[dict]:
    for r in rows:
        r["status"], r["reason"] = status, reason
    return rows


# ----------------------------------------------------------------------------------------------
# derived figures: compile time, ratio, stage-1 predictions, accuracy verdict, recommendation
# ----------------------------------------------------------------------------------------------

def finish_stage2(rows: list[dict], size: Size) -> None:
    for r in rows:
        if r["status"] != "measured":
            continue
        r["ratio_to_official"] = r["it_per_s"] / OFFICIAL_H100_IT_PER_S
        if r["benchmark"] == "step" and "warmup_s" in r:
            # the warm-up's time beyond what its steps take at the timed rate: compilation, autotuning
            r["compile_s"] = max(r["warmup_s"] - size.warmup * r["ms_per_step"] / 1000, 0.0)
        if r["benchmark"] == "loop":
            r["startup_s"] = r.get("warmup_s")
    for r in rows:  # a compiled loop's compilation: its start-up beyond the eager bf16 loop's (same data, warm-up)
        eager = next((e for e in rows if e["benchmark"] == "loop" and e.get("method") == r.get("method")
                      and e["variant"] == VARIANTS[1] and e["status"] == "measured"), None)
        if r["benchmark"] == "loop" and "compile" in r["variant"] and r["status"] == "measured" and eager:
            r["compile_s"] = max(r["startup_s"] - eager["startup_s"], 0.0)


def finish_stage1(rows: list[dict]) -> list[dict]:
    """Beside each schedule row (FLOP prediction) the minutes predicted from the measured rows."""
    measured = {(r["config"], r["benchmark"]): r for r in rows if r["part"] == 3 and r["status"] == "measured"
                and "config" in r and r["benchmark"] != "ldm_schedule"}
    for r in rows:
        if r["benchmark"] != "ldm_schedule" or r["status"] != "measured":
            continue
        part, source = r.get("part_name"), None
        if part in ("autoencoder training", "autoencoder + discriminator"):
            source = measured.get((r["config"], "autoencoder training"))
        elif part == "denoiser training":
            source = measured.get((r["config"], "denoiser training"))
        elif part and part.startswith("sampling DDIM"):
            source = measured.get((r["config"], "sampling DDIM 50"))
        if source is not None:
            per_unit = (1 / source["it_per_s"]) if source["unit"] == "images/s" else source["ms_per_step"] / 1000
            r["measured_minutes"] = r["count"] * per_unit / 60
        elif part == "total":
            parts = [x for x in rows if x.get("benchmark") == "ldm_schedule" and x.get("config") == r["config"]
                     and x.get("part_name") not in ("total", None) and x["status"] == "measured"]
            # encoding the training set is not timed: its FLOP prediction stands in (well under a second)
            known = [x.get("measured_minutes", x["minutes"] if x["part_name"].startswith("encoding") else None)
                     for x in parts]
            r["measured_minutes"] = sum(known) if known and None not in known else None
    return rows


def finish_accuracy(rows: list[dict], tolerance: float) -> list[dict]:
    """Window by window: |default - fp32| / fp32 of the mean training loss, within ``tolerance``."""
    curves = {r["run"]: dict(map(tuple, r["curve"])) for r in rows if r["part"] == 4 and r.get("curve")
              and r["status"] == "measured"}
    if not {"default", "fp32"} <= set(curves):
        why = next((f"{r['run']} run {r['status']}: {r['reason']}" for r in rows if r["part"] == 4 and "run" in r
                    and r["status"] != "measured"), "a run gave no evaluation")
        return [{**row(4, "loss curves agree", check="curves"), "status": "skipped", "reason": why}]
    common = sorted(set(curves["default"]) & set(curves["fp32"]))
    out = []
    for it in common:
        a, b = curves["fp32"][it], curves["default"][it]
        difference = abs(b - a) / abs(a) if a else math.inf
        out.append({**row(4, "loss window", check=f"iteration {it}"), "status": "measured", "iteration": it,
                    "fp32_loss": a, "default_loss": b, "relative_difference": difference,
                    "within_tolerance": difference <= tolerance})
    ok = bool(out) and all(r["within_tolerance"] for r in out)
    out.append({**row(4, "loss curves agree", check="curves"), "status": "measured", "windows": len(out),
                "max_relative_difference": max((r["relative_difference"] for r in out), default=None),
                "tolerance": tolerance, "within_tolerance": ok})
    return out


def recommendation(rows: list[dict], compile_limit_s: float) -> dict | None:
    """The fastest part-1 loop variant that compiled within the limit (eager variants: no compile). A
    loop's compile time is its start-up beyond the eager bf16 loop's (the first, cold compilation);
    without that row, its step's."""
    steps = {r["variant"]: r for r in rows if r["part"] == 1 and r["benchmark"] == "step" and r["status"] == "measured"}
    candidates = []
    for r in rows:
        if r["part"] != 1 or r["benchmark"] != "loop" or r["status"] != "measured":
            continue
        compile_s = r.get("compile_s", steps.get(r["variant"], {}).get("compile_s"))
        if "compile" in r["variant"] and (compile_s is None or compile_s > compile_limit_s):
            continue
        candidates.append((r, compile_s))
    # the loop variants not measured (cut by the budget, failed, skipped): the choice is among the others only
    unmeasured = [{"variant": r["variant"], "status": r["status"], "reason": r["reason"]} for r in rows
                  if r["part"] == 1 and r["benchmark"] == "loop" and r["status"] != "measured"
                  and not (r["status"] == "skipped" and "CUDA graphs" in r["reason"])]
    if not candidates:
        return None
    best, compile_s = max(candidates, key=lambda c: c[0]["it_per_s"])
    return {"variant": best["variant"], "loop_it_per_s": best["it_per_s"], "peak_mem_gib": best.get("peak_mem_gib"),
            "compile_s": compile_s, "train_flags": best.get("train_flags"), "compile_limit_s": compile_limit_s,
            "compared": [r["variant"] for r, _ in candidates], "not_measured": unmeasured,
            "provisional": bool(unmeasured)}


# ----------------------------------------------------------------------------------------------
# environment, tables
# ----------------------------------------------------------------------------------------------

def diffusers_version() -> str | None:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return None


def dependencies() -> dict:
    """Each module the scripts import beyond torch: its distribution's version, or None where it is missing."""
    found = {}
    for module, distribution in DEPENDENCIES.items():
        try:
            found[module] = importlib.metadata.version(distribution) if importlib.util.find_spec(module) else None
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            found[module] = "present" if importlib.util.find_spec(module) else None
    return found


def missing_modules(names) -> list[str]:
    """The modules that cannot be imported here, each with why ("huggingface_hub", or "diffusers: ImportError:
    ..." where it is present but broken). Imported in this process: they load no CUDA context."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing.append(name if error.name in (None, name) else f"{name} (needs {error.name})")
        except Exception as error:  # present but broken (an incompatible version): the row says so
            missing.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
    return missing


def nvidia_smi(query: str) -> str | None:
    """nvidia-smi's first answer line to --query-gpu=QUERY (no CUDA context in this process), None without it."""
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, date: str, final: bool = True) -> dict:
    """The machine and software. With ``final`` (after the benchmarks, so that this process holds no CUDA
    context while they run) the device's properties from torch; before, nvidia-smi's name for it."""
    import torch

    from utils.runtime import native_bf16  # bf16 as train.py's precision auto decides it (CC >= 8.0)

    info = {"date": date, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "diffusers": diffusers_version(), "dependencies": dependencies()}
    if device.startswith("cuda") and not final:
        info["device"] = nvidia_smi("name") or device
    elif device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cudnn=torch.backends.cudnn.version(), bf16=native_bf16(torch.device(device)))
        info["driver"] = nvidia_smi("driver_version")
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def plain_json(value):
    """Strict JSON: NaN (not measured, e.g. peak memory on a CPU) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


def number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def status_cell(r: dict) -> str:
    return r["status"] if r["status"] == "measured" else f"{r['status']}: {r['reason']}"


# per part: (column header, function of the row)
COLUMNS = {
    0: [("row", lambda r: r["step"]), ("status", lambda r: r["status"]), ("s", lambda r: number(r.get("seconds"), 1)),
        ("first error line / reason", lambda r: r["reason"])],
    1: [("benchmark", lambda r: r["benchmark"]), ("method", lambda r: r.get("method", "")),
        ("variant", lambda r: r["variant"]), ("it/s", lambda r: number(r.get("it_per_s"))),
        ("ms/it", lambda r: number(r.get("ms_per_step"), 1)), ("peak GiB", lambda r: number(r.get("peak_mem_gib"))),
        ("compile s", lambda r: number(r.get("compile_s"), 1)), ("start-up s", lambda r: number(r.get("startup_s"), 1)),
        ("x official 3.55 it/s", lambda r: number(r.get("ratio_to_official"))), ("status", status_cell)],
    3: [("config", lambda r: r.get("config", "")), ("part", lambda r: r.get("part_name") or r["benchmark"]),
        ("variant", lambda r: r.get("variant", "")),
        ("rate", lambda r: f"{number(r.get('it_per_s'))} {r.get('unit', '')}".strip() if "it_per_s" in r else "–"),
        ("ms/step", lambda r: number(r.get("ms_per_step"), 1)), ("peak GiB", lambda r: number(r.get("peak_mem_gib"))),
        ("count", lambda r: f"{r['count']} {r['unit']}" if r.get("count") is not None else ""),
        ("minutes from measured", lambda r: number(r.get("measured_minutes"))),
        ("minutes from FLOPs", lambda r: number(r.get("minutes"))), ("status", status_cell)],
    4: [("check", lambda r: r.get("check") or r.get("run", "")), ("what", lambda r: r["benchmark"]),
        ("fp32", lambda r: number(r.get("fp32_loss", r.get("loss_fp32")), 4)),
        ("default precision", lambda r: number(r.get("default_loss", r.get("loss_bf16")), 4)),
        ("relative difference / cosine", lambda r: number(r.get("relative_difference",
                                                                r.get("max_relative_difference",
                                                                      r.get("cosine_network"))), 4)),
        ("within tolerance", lambda r: number(r.get("within_tolerance"))), ("status", status_cell)],
}
COLUMNS[2] = COLUMNS[1]


def part_name(part: int) -> str:
    return "smoke" if part == SMOKE else str(part)


def table_rows(part: int, rows: list[dict]) -> list[list[str]]:
    shown = [r for r in rows if r["part"] == part and not (part == 4 and r.get("curve") and r["status"] == "measured")]
    return [[cell(r) for _, cell in COLUMNS[part]] for r in shown]


def markdown(env: dict, args, rows: list[dict], advice: dict | None) -> str:
    lines = [f"### GPU check: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}", "",
             f"`python benchmarks/gpu_check.py {shlex.join(args.argv)}` (commit {env.get('commit')}, "
             f"size {args.size}, budget {args.budget_s:g} s, data {args.data_dir or 'phantom'}; diffusers "
             f"{env.get('diffusers')})", ""]
    for part in args.parts:
        lines += [f"**Part {part_name(part)}: {PART_TITLES[part]}**", ""]
        headers = [h for h, _ in COLUMNS[part]]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("| " + " | ".join("---" for _ in headers) + " |")
        for cells in table_rows(part, rows):
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")
    if SMOKE in args.parts:
        smoke_rows = [r for r in rows if r["part"] == SMOKE]
        ok = sum(r["status"] == "ok" for r in smoke_rows)
        lines += [f"Smoke: {ok} of {len(smoke_rows)} rows ok.", ""]
    if 1 in args.parts:
        lines.append(describe(advice))
    return "\n".join(lines) + "\n"


def describe(advice: dict | None) -> str:
    if advice is None:
        return "Recommended CUDA default: none (no part-1 loop row was measured within the compile limit)."
    text = (f"Recommended CUDA default (fastest part-1 loop variant that compiled within "
            f"{advice['compile_limit_s']:g} s): {advice['variant']}, {advice['loop_it_per_s']:.2f} it/s, peak "
            f"{number(advice['peak_mem_gib'])} GiB, compile {number(advice['compile_s'], 1)} s; train.py flags: "
            f"{advice.get('train_flags') or 'see bench_train.py'}.")
    if advice.get("provisional"):
        lost = "; ".join(f"{r['variant']} ({r['status']}: {r['reason']})" for r in advice["not_measured"])
        text = (f"PROVISIONAL, not a default to set: chosen among {', '.join(advice['compared'])} only; not "
                f"measured: {lost}. Rerun with --parts 1 and a larger --budget-s. " + text)
    return text


def print_table(env: dict, args, rows: list[dict], advice: dict | None) -> None:
    print(f"\nGPU check on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, {env['date']}, size {args.size}")
    for part in args.parts:
        headers = [h for h, _ in COLUMNS[part]]
        body = table_rows(part, rows)
        widths = [max([len(h)] + [len(c) for c in column]) for h, column in zip(headers, zip(*body))] if body \
            else [len(h) for h in headers]
        print(f"\npart {part_name(part)}: {PART_TITLES[part]}")
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for cells in body:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if 1 in args.parts:
        print("\n" + describe(advice))


# ----------------------------------------------------------------------------------------------

def parse_parts(parser, given: list[str]) -> list[int]:
    """--parts smoke 1 2, or smoke,1,2: the part numbers (smoke is 0), in priority order."""
    names = {"smoke": SMOKE, **{str(k): k for k in PART_TITLES}}
    parts = set()
    for name in (n.strip() for item in given for n in item.split(",") if n.strip()):
        if name not in names:
            parser.error(f"--parts: {name!r} is not a part (smoke, 1, 2, 3, 4)")
        parts.add(names[name])
    return sorted(parts)


def no_cuda_reason() -> str:
    """Why torch cannot use a GPU here, in one line: its build, and what nvidia-smi sees."""
    import torch

    build = f"torch {torch.__version__} " + (f"(CUDA {torch.version.cuda} build)" if torch.version.cuda
                                           else "(a CPU-only build)")
    gpus = nvidia_smi("name")
    if gpus:
        return (f"nvidia-smi sees a GPU ({gpus}, driver {nvidia_smi('driver_version')}) but {build} cannot use it "
                "(a CPU-only torch, or a CUDA build newer than the driver)")
    return f"{build} sees no CUDA GPU and nvidia-smi finds none"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto",
                        help="auto (the first CUDA GPU; refused where torch sees none: a CPU run needs --device "
                             "cpu), cpu or cuda[:N] (default: auto)")
    parser.add_argument("--size", choices=list(SIZES), default="published",
                        help="published (width 64, batch 4 + 4, 256x256; stage 1 at its configurations' sizes) or "
                             "tiny (width 4, batch 2 + 2, 32x32, 2 steps: minutes on a CPU) (default: published)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-time budget in seconds; the parts smoke, 1, 2, 3, 4 may run until 35/65/80/92/100 %% of it are "
                             "spent "
                             "(default: 540, 9 minutes)")
    parser.add_argument("--parts", nargs="+", default=["smoke", "1", "2", "3", "4"], metavar="PART",
                        help="parts to run, in priority order: smoke, 1, 2, 3, 4, separated by spaces or commas "
                             "(default: smoke 1 2 3 4)")
    parser.add_argument("--smoke-jobs", type=int, default=None,
                        help="the smoke part's commands run at once (default: on CUDA half the CPU cores, at most "
                             "8; on a CPU 1)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="part 2's methods (default: supervised and every comparison method train.py has)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="NAME",
                        help="parts 1 and 2: the variants to run, by bench_train.py's names (" + "; ".join(VARIANTS)
                        + ") (default: all four; on a CPU the CUDA-graph variant is reported as not run)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder for the loops and the accuracy runs (train.py's --data-dir, split "
                             "files included); default: phantom images made in a temporary folder")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "gpu_check",
                        help="folder for gpu_check.json, gpu_check.md and logs/ (default: runs/gpu_check)")
    parser.add_argument("--logs-dir", type=Path, default=None,
                        help="folder for each benchmark's command and output (default: <out-dir>/logs)")
    parser.add_argument("--compile-backend", choices=("inductor", "eager"), default="inductor",
                        help="torch.compile backend of the compiled variants: inductor (what train.py uses), or "
                             "eager (dynamo's graph capture alone, through TORCH_COMPILE_OVERRIDE_BACKENDS: the "
                             "compiled rows' plumbing in seconds on a CPU, not their speed) (default: inductor)")
    parser.add_argument("--compile-limit-s", type=float, default=120.0,
                        help="the recommendation's limit on a variant's compile time (default: 120)")
    parser.add_argument("--loss-tolerance", type=float, default=0.1,
                        help="part 4: largest relative difference of the mean training loss between two "
                             "evaluations, default precision against fp32 (default: 0.1)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.parts = parse_parts(parser, args.parts)
    if args.device == "auto":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device auto: {no_cuda_reason()}; a CPU run is --device cpu")
        args.device = "cuda"
    elif args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    elif args.device != "cpu":
        parser.error(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    if args.compile_backend == "eager":
        import torch._dynamo.config as dynamo_config

        if not hasattr(dynamo_config, "debug_backend_override"):
            parser.error("--compile-backend eager needs a torch with TORCH_COMPILE_OVERRIDE_BACKENDS (2.13 or newer)")
    if args.smoke_jobs is None:
        args.smoke_jobs = min(8, max(1, (os.cpu_count() or 2) // 2)) if args.device.startswith("cuda") else 1
    elif args.smoke_jobs < 1:
        parser.error(f"--smoke-jobs must be at least 1, got {args.smoke_jobs}")
    args.variants = [v for v in VARIANTS if v in args.variants]
    if args.methods is not None:
        known = comparison_methods()
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            parser.error(f"--methods: {', '.join(unknown)} not among train.py's methods here ({', '.join(known)})")
    return args


class Report:
    """The rows so far, written as gpu_check.json and gpu_check.md after every benchmark (atomically: a
    kill at any moment leaves the last complete table), and printed at the end."""

    def __init__(self, args, methods: list[str], date: str):
        self.args, self.methods, self.date = args, methods, date
        self.start = time.monotonic()
        self.rows: list[dict] = []
        self.env = environment(args.device, date, final=False)

    def save(self, final: bool = False) -> dict | None:
        from utils.files import atomic_write_text

        advice = recommendation(self.rows, self.args.compile_limit_s)
        if final:
            self.env = environment(self.args.device, self.date)
        self.env["wall_s"] = round(time.monotonic() - self.start, 1)
        self.env["finished"] = final
        report = {"environment": self.env, "size": self.args.size, "budget_s": self.args.budget_s,
                  "parts": [part_name(p) for p in self.args.parts], "methods": self.methods,
                  "data_dir": self.args.data_dir, "command": ["benchmarks/gpu_check.py", *self.args.argv],
                  "rows": self.rows, "recommendation": advice}
        atomic_write_text(self.args.out_dir / "gpu_check.json", json.dumps(plain_json(report), indent=1))
        atomic_write_text(self.args.out_dir / "gpu_check.md", markdown(self.env, self.args, self.rows, advice))
        return advice


def child_environment(args, work: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_cache"), "TRITON_CACHE_DIR": str(work / "triton_cache")}
    if args.compile_backend == "eager":
        env["TORCH_COMPILE_OVERRIDE_BACKENDS"] = ">=0:eager"
    return env


def run_smoke(args, report: Report, work: Path, env: dict, deadline: float, logs: Path) -> None:
    """The smoke part on its own tiny phantom data (whatever --size and --data-dir say)."""
    data = DataFolder(None, work, SIZES["tiny"], logs, name="smoke_phantom")
    cuda = args.device.startswith("cuda")
    gpus = 1
    if cuda:
        import torch

        gpus = max(torch.cuda.device_count(), 1)  # no CUDA context: the count alone
    env = dict(env)
    if args.smoke_jobs > 1 and "OMP_NUM_THREADS" not in env:  # the cores shared out among the commands
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.smoke_jobs))
    others = list(report.rows)

    def show(rows):
        report.rows = others + rows
        report.save()

    ready, why = data.make(deadline, env)
    rows = smoke.smoke_rows(data.path, work / "smoke", args.device, gpus, deadline if ready else time.monotonic(),
                            logs / "smoke", env, args.smoke_jobs, on_row=show)
    if not ready:
        mark(rows, "failed" if data.error else "cut", why)
    show(rows)
    print(f"part smoke: {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} rows ok at "
          f"{time.monotonic() - report.start:.0f} s", file=sys.stderr, flush=True)


def run_part(part: int, args, report: Report, plan: dict, deadline: float, logs: Path, env: dict, data) -> None:
    jobs = plan[part]()
    if part == 3:
        missing = missing_modules(STAGE1_MODULES)
        if missing:
            for job in jobs:
                report.rows += mark(job.rows or [row(3, job.name)], "skipped",
                                    f"missing {', '.join(missing)} (install the carried wheels: benchmarks/gpu_run.sh)")
            report.save()
            return
    others, part_rows = list(report.rows), []
    for job in jobs:
        part_rows += run_job(job, deadline, logs, env, data) + job.unrun
        report.rows = others + part_rows
        report.save()
        print(f"part {part}: {job.name} done at {time.monotonic() - report.start:.0f} s", file=sys.stderr, flush=True)
    if part in (1, 2):
        finish_stage2(part_rows, SIZES[args.size])
    if part == 3:
        finish_stage1(part_rows)
    if part == 4:
        part_rows = [r for r in part_rows if r.get("check") != "curves"] + finish_accuracy(part_rows,
                                                                                            args.loss_tolerance)
    report.rows = others + part_rows
    report.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logs = args.logs_dir or args.out_dir / "logs"
    methods = args.methods or comparison_methods()
    report = Report(args, methods, date)
    report.save()
    # a command limit's SIGTERM (gpu_run.sh's timeout): end the running benchmark, keep the table, finish
    signal.signal(signal.SIGTERM, lambda signum, frame: smoke.stop_all())
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        env = child_environment(args, work)
        data = DataFolder(args.data_dir, work, size, logs)
        plan = {1: lambda: stage2_jobs(1, ["mgcc"], args, size, data),
                2: lambda: stage2_jobs(2, methods, args, size, data),
                3: lambda: stage1_jobs(args, size),
                4: lambda: accuracy_jobs(args, size, data, work)}
        for part in args.parts:
            deadline = report.start + PART_ENDS[part] * args.budget_s
            if part == SMOKE:
                run_smoke(args, report, work, env, deadline, logs)
            else:
                run_part(part, args, report, plan, deadline, logs, env, data)
    advice = report.save(final=True)
    print_table(report.env, args, report.rows, advice)
    print(f"\nwrote {args.out_dir / 'gpu_check.json'} and {args.out_dir / 'gpu_check.md'} "
          f"({report.env['wall_s']:.0f} s of the {args.budget_s:g} s budget)")
    return 128 + signal.SIGTERM if smoke.STOPPED.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
