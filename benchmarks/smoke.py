"""gpu_check's smoke part: every script of the code base end to end at a tiny size, as a user calls it.

Nothing here is timed for speed: each row says whether a command ran (ok), or failed with the first
error line of its output, or was cut by the budget, with its wall time. A failure does not stop the
other rows; a row that needs an earlier one's output (sample_ldm.py after train_ldm.py, predict.py
after train.py, the resume after the SIGTERM) is skipped with that reason when the earlier one failed.

The rows (on --device D, the smoke data being phantom images made in a temporary folder):
  train_ldm.py --stage vae, then --stage diffusion (configs/ldm_tiny.yaml at 32x32), then
  sample_ldm.py with its report (memorisation and the classifier two-sample test);
  train.py for every method on both networks with --precision auto --data-on-device auto (15 runs:
  MGCC needs its own network);
  train.py stopped by SIGTERM to its process group once its first checkpoint is written (exit 143),
  then resumed with --resume to its end;
  predict.py on a train.py checkpoint, scored against the masks;
  torchrun --nproc_per_node <the visible GPUs, 1 on a CPU> train.py for MGCC;
  reproduce.py --jobs <the visible GPUs, 1 on a CPU> on a tiny protocol (split 1, supervised and MGCC on
  the real unlabeled images, no generator: stage 1 has its own rows).
Chains of rows (a row and those needing it) run one after another; up to --smoke-jobs chains at once.
This module imports nothing of the project: gpu_check.py gives it the data folder and the device.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# train.py's methods and networks (methods.METHODS, networks.unet.build_network); written out so that this
# list stands when a dependency of the methods package (kornia) is missing: those rows then fail, saying so
METHODS = ("supervised", "mgcc", "mean-teacher", "cct", "cps", "fixmatch", "unimatch", "bcp")
NETWORKS = ("mgcc", "unet")
# train.py refuses these (method, network) pairs: MGCC perturbs the ConvMixer stages the U-Net lacks
INVALID = {("mgcc", "unet")}
# train.py at the smallest size it runs: 32x32, width 4, 2 iterations evaluated once
TRAIN_TINY = ("--width", "4", "--image-size", "32", "--eval-batch-size", "4", "--num-workers", "0", "--no-progress")
LDM_TINY = ("--config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--image-size", "32", "--num-workers", "0",
            "--no-progress", "--preview-images", "2", "--preview-steps", "2", "--log-every", "1",
            "--sample-every", "0", "--disc-weight", "0.1", "--disc-start", "1")
SIGTERM_ITERATIONS = 12  # the interrupted run: long enough that the signal lands before its end
SIGNAL_POLL_S = 0.02
# gpu_check's SIGTERM (a command limit): every command running is killed, the rows say so
STOPPED = threading.Event()
STOP_REASON = "stopped: gpu_check got SIGTERM"
LIVE: set[int] = set()  # the process groups running now


def stop_all() -> None:
    STOPPED.set()
    for group in list(LIVE):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Step:
    """One command of the smoke part. ``expect``: files it must have written (else the row fails);
    ``interrupt``: SIGTERM its process group once this file exists, and expect exit 143."""
    name: str
    command: list[str]
    expect: tuple[Path, ...] = ()
    interrupt: Path | None = None
    row: dict = field(default_factory=dict)


def first_error(text: str) -> str:
    """The line that says what went wrong: the project's one-line ``error:``, else the first exception
    line (a traceback's cause before what it led to; under torchrun a rank's error before the agent's
    ChildFailedError), else the last line; a missing module is named as such ("missing kornia")."""
    # torchrun prefixes each rank's lines with "[rank<N>]:"
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in text.splitlines()
             if line.strip() and not line.startswith("$ ")]
    missing = next((m for m in (re.search(r"No module named '([\w.]+)'", line) for line in lines) if m), None)
    if missing:
        return f"missing {missing.group(1).split('.')[0]} (No module named '{missing.group(1)}')"
    found = next((line for line in lines if line.startswith("error:")), None)
    if found is None:
        exceptions = [line for line in lines if re.match(r"^([\w.]+(Error|Exception|Interrupt)|\w+Error)\b", line)]
        found = exceptions[0] if exceptions else (lines[-1] if lines else "no output")
    return found[:300]


def python(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def torchrun(nproc: int, script: str, *args) -> list[str]:
    """torchrun as the tests call it: a free port found by the c10d rendezvous (several on one machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(ROOT / script), *map(str, args)]


def train_args(data: Path, out: Path, device: str, method: str, network: str, iterations: int = 2,
               gpus: int = 1) -> list[str]:
    """train.py as a user runs it on this device: --precision auto and --data-on-device auto, every other
    option at its default except the tiny size (the batch split evenly over ``gpus`` processes)."""
    return ["--data-dir", data, "--out-dir", out, "--method", method, "--network", network, "--device", device,
            "--precision", "auto", "--data-on-device", "auto", "--iterations", iterations,
            "--eval-every", iterations, "--batch-size", 4 * gpus, "--labeled-batch-size", 2 * gpus, *TRAIN_TINY]


def chains(data: Path, work: Path, device: str, gpus: int) -> list[list[Step]]:
    """The smoke part's commands, in chains: each row after the rows whose output it needs."""
    ldm = work / "ldm"
    samples = work / "samples"
    ldm_chain = [
        Step("train_ldm.py --stage vae", python("train_ldm.py", *LDM_TINY, "--data-dir", data, "--out-dir", ldm,
                                                "--device", device, "--stage", "vae", "--vae-steps", 2),
             expect=(ldm / "vae",)),
        Step("train_ldm.py --stage diffusion", python("train_ldm.py", *LDM_TINY, "--data-dir", data, "--out-dir", ldm,
                                                      "--device", device, "--stage", "diffusion", "--vae-steps", 2,
                                                      "--diffusion-steps", 2),
             expect=(ldm / "unet_ema",)),
        Step("sample_ldm.py with its report", python("sample_ldm.py", "--checkpoint", ldm, "--num-images", 4,
                                                     "--batch-size", 2, "--steps", 4, "--out-dir", samples,
                                                     "--device", device, "--no-progress"),
             expect=(samples / "report.json", samples / "manifest.csv")),
    ]
    first = work / "train_mgcc_mgcc"
    predicted = work / "predict"
    train_rows = []
    for method in METHODS:
        for network in (n for n in NETWORKS if (method, n) not in INVALID):
            out = work / f"train_{method}_{network}"
            step = Step(f"train.py --method {method} --network {network}",
                        python("train.py", *train_args(data, out, device, method, network)),
                        expect=(out / "metrics.json", out / "checkpoint_best.pt"))
            train_rows.append([step])
    train_rows[METHODS.index("mgcc") * len(NETWORKS)].append(
        Step("predict.py on a checkpoint", python("predict.py", "--checkpoint", first / "checkpoint_best.pt",
                                                  "--input-dir", data / "images", "--masks-dir", data / "masks" / "0",
                                                  "--output-dir", predicted, "--num-workers", 0, "--device", device,
                                                  "--no-progress"),
             expect=(predicted,)))
    stopped = work / "train_sigterm"
    resume_chain = [
        Step("train.py stopped by SIGTERM", python("train.py", *train_args(data, stopped, device, "mgcc", "mgcc",
                                                                           iterations=SIGTERM_ITERATIONS),
                                                   "--checkpoint-every", 1),
             interrupt=stopped / "checkpoint_last.pt"),
        Step("train.py --resume after SIGTERM", python("train.py", "--out-dir", stopped, "--resume", "--no-progress",
                                                       "--device", device),
             expect=(stopped / "metrics.json",)),
    ]
    ddp = work / "torchrun"
    every = "cuda" if device.startswith("cuda") else device  # every visible GPU: each rank its own, each job its own
    torchrun_step = Step(f"torchrun --nproc_per_node {gpus} train.py", torchrun(
        gpus, "train.py", *train_args(data, ddp, every, "mgcc", "mgcc", gpus=gpus)), expect=(ddp / "metrics.json",))
    protocol = work / "reproduce"
    tiny = "--iterations 2 --eval-every 2 --batch-size 4 --labeled-batch-size 2 " + " ".join(TRAIN_TINY)
    reproduce_step = Step(f"reproduce.py --jobs {gpus}", python(
        "reproduce.py", "--data-dir", data, "--out-dir", protocol, "--preset", "demo", "--no-generator", "--splits", 1,
        "--labeled-fraction", 0.5,  # 5 of the 11 training images: a labeled batch of 2
        "--arms", "supervised", "mgcc-real", "--train-args", tiny, "--jobs", gpus, "--device", every, "--no-progress",
        "--no-estimate"), expect=(protocol / "results.md",))
    # the longest chains first, so that they start while the others fill the remaining slots
    return [ldm_chain, resume_chain, [reproduce_step], [torchrun_step], *train_rows]


def run_step(step: Step, deadline: float, log: Path, env: dict) -> tuple[str, str]:
    """(status, reason) of one command run from the repository root until ``deadline``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + shlex.join(step.command) + "\n")
        out.flush()
        process = subprocess.Popen(step.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # its own process group: workers, torchrun's ranks
        LIVE.add(process.pid)
        try:
            code, signalled = wait(process, step.interrupt, deadline)
        finally:
            LIVE.discard(process.pid)
    if code is None or STOPPED.is_set():
        return "cut", STOP_REASON if STOPPED.is_set() else "budget: the smoke part's time ran out"
    text = log.read_text(errors="replace")
    if step.interrupt is not None:
        if not signalled and code == 0:
            return "failed", "finished before its first checkpoint was seen: no SIGTERM sent (more iterations needed)"
        if not signalled:
            return "failed", f"exit {code} before its first checkpoint: {first_error(text)}"
        if code != 128 + signal.SIGTERM:
            return "failed", f"exit {code} after SIGTERM (143 expected): {first_error(text)}"
        if "stopped by SIGTERM" not in text or "Traceback" in text:
            return "failed", f"SIGTERM: no clean stop: {first_error(text)}"
        return "ok", ""
    if code != 0:
        return "failed", f"exit {code}: {first_error(text)}"
    missing = [str(p) for p in step.expect if not p.exists()]
    return ("failed", f"exit 0 but {', '.join(missing)} not written") if missing else ("ok", "")


def wait(process: subprocess.Popen, interrupt: Path | None, deadline: float) -> tuple[int | None, bool]:
    """(exit status or None when killed at the deadline, whether SIGTERM was sent)."""
    signalled = False
    while process.poll() is None:
        if time.monotonic() >= deadline or STOPPED.is_set():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None, signalled
        if interrupt is not None and not signalled and interrupt.exists():
            os.killpg(process.pid, signal.SIGTERM)  # as scancel and preemption do: the whole group
            signalled = True
        time.sleep(SIGNAL_POLL_S)
    return process.returncode, signalled


def run_chain(chain: list[Step], deadline: float, logs: Path, env: dict) -> None:
    failed = None
    for step in chain:
        started = time.monotonic()
        if STOPPED.is_set():
            status, reason = "skipped", STOP_REASON
        elif failed is not None:
            status, reason = "skipped", f"needs the row {failed!r}, which did not run"
        elif deadline - time.monotonic() < 1:
            status, reason = "skipped", "budget: the smoke part's time ran out"
        else:
            log = logs / (re.sub(r"[^\w.-]+", "_", step.name).strip("_") + ".log")
            status, reason = run_step(step, deadline, log, env)
            step.row["log"] = str(log)
        step.row.update(status=status, reason=reason, seconds=round(time.monotonic() - started, 1))
        if status != "ok":
            failed = failed or step.name


def smoke_rows(data: Path, work: Path, device: str, gpus: int, deadline: float, logs: Path, env: dict,
               jobs: int, on_row=None) -> list[dict]:
    """Run the smoke part; its rows, one per command, in the order of chains(). ``on_row(rows)`` is
    called before the first and after each chain (gpu_check writes its table then)."""
    all_chains = chains(data, work, device, gpus)
    rows = []
    for chain in all_chains:
        for step in chain:
            step.row.update(part=0, benchmark="smoke", step=step.name, command=shlex.join(step.command),
                            status="skipped", reason="not started")
            rows.append(step.row)

    lock = threading.Lock()
    if on_row is not None:
        on_row(rows)

    def run(chain):
        run_chain(chain, deadline, logs, env)
        if on_row is not None:
            with lock:  # one writer of the table at a time
                on_row(rows)

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(run, all_chains))
    return rows
