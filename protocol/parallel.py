"""Stages side by side on one node: ``reproduce.py --jobs N``.

The stages of a protocol depend on one another only along their inputs (a split's generator before its
samples, the samples before the synthetic arms, an arm before its predict stage), so up to N of them
can run at once, each as soon as the stages it is made from are done, in the plan's order. Each runs in
a *slot*: on GPUs, its own device (``CUDA_VISIBLE_DEVICES``, or several for a torchrun stage); on the
CPU, an equal share of the cores (``OMP_NUM_THREADS``), so that N processes do not oversubscribe them.

Why the results equal a sequential run's: every stage is the same command with the same seed, and
reads only the finished outputs of the stages before it. On the CPU the figures are bit for bit those
of a sequential run *with the same threads per stage*: PyTorch's CPU kernels (a convolution's weight
gradient) sum in an order that depends on the thread count, so one thread and two give runs that
differ in the last bits and, after a few hundred steps, slightly different weights.

A stage's output goes to its log, ``<folder>.log`` beside its folder (the folder itself may be replaced
as a whole by its script); the terminal shows which stages run and, on a terminal with progress on,
each one's last line. Ctrl-C or SIGTERM is passed to every running stage, which finishes its step and
checkpoints; a rerun continues each. If this process is killed outright, each stage gets SIGTERM
from the kernel (:func:`protocol.ledger.parent_death_signal`) and does the same.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Sequence

from utils.config import ConfigError
from .ledger import Ledger, Stage, begin, child_environment, format_seconds, parent_death_signal

POLL_SECONDS = 0.2
REDRAW_SECONDS = 1.0


@dataclass(frozen=True)
class Slot:
    """Where one stage runs: a name for the display and the environment that pins it there."""
    name: str
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by the ids a child's CUDA_VISIBLE_DEVICES must name: those of
    this process's CUDA_VISIBLE_DEVICES when it is set (so --gpus 0 is the first of them), else 0..n-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch
    return [str(k) for k in range(torch.cuda.device_count())]


def node_slots(jobs: int, device: str, gpus: Sequence[int] | None = None, gpus_per_job: int = 1) -> list[Slot]:
    """``jobs`` slots of this node for ``device`` ('cpu', 'cuda', 'auto'). On CUDA each slot gets
    ``gpus_per_job`` GPUs of ``gpus`` (indices into the visible GPUs; default: all of them) and none is
    shared; on the CPU each gets ``cores // (jobs x gpus_per_job)`` threads, cores being this process's
    OMP_NUM_THREADS when set, else the cores it may run on."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    from utils.runtime import resolve_device

    if resolve_device(device).type == "cuda":
        if device not in ("cuda", "auto"):
            raise ConfigError(f"--device {device} with --jobs {jobs}: each job gets its own GPU; use --device cuda "
                              "and choose the GPUs with --gpus")
        visible = visible_gpus()
        chosen = list(range(len(visible))) if gpus is None else list(gpus)
        bad = [g for g in chosen if not 0 <= g < len(visible)]
        if bad or len(set(chosen)) != len(chosen):
            raise ConfigError(f"--gpus {','.join(map(str, chosen))}: each must be one of the {len(visible)} visible "
                              f"GPUs (0 to {len(visible) - 1}), none twice")
        need = jobs * gpus_per_job
        if need > len(chosen):
            raise ConfigError(f"--jobs {jobs} x {gpus_per_job} GPU{'s' if gpus_per_job > 1 else ''} per stage needs "
                              f"{need} GPUs; {len(chosen)} {'is' if len(chosen) == 1 else 'are'} given "
                              f"(--gpus, CUDA_VISIBLE_DEVICES): lower --jobs")
        groups = [[visible[g] for g in chosen[k * gpus_per_job:(k + 1) * gpus_per_job]] for k in range(jobs)]
        return [Slot(f"GPU {','.join(group)}", {"CUDA_VISIBLE_DEVICES": ",".join(group)}) for group in groups]
    if gpus is not None:
        raise ConfigError("--gpus needs --device cuda")
    cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    threads = max(1, cores // (jobs * gpus_per_job))
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return [Slot(f"CPU {k}, {threads} thread{'s' if threads > 1 else ''}", env) for k in range(jobs)]


def log_path(stage: Stage) -> Path:
    """``<folder>.log``: beside the stage's folder, which its script may replace as a whole."""
    return stage.folder.with_name(stage.folder.name + ".log")


def last_line(path: Path, size: int = 4096) -> str:
    """The last line a stage wrote to its log, a progress bar's latest state included (tqdm ends those
    with a carriage return, not a newline)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1] if lines else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([line for line in text.split("\n") if line.strip()][-lines:])


@dataclass
class Running:
    stage: Stage
    slot: Slot
    process: subprocess.Popen
    log: IO[bytes]
    started: float


class Display:
    """What runs now. On a terminal with progress on: a block of one line per running stage (its slot,
    its time, its log's last line), redrawn in place; otherwise a line per stage started or ended."""

    def __init__(self, live: bool, total: int):
        self.live, self.total, self.drawn = live, total, 0
        self.last_draw = 0.0

    def event(self, text: str) -> None:
        self.clear()
        print(text, flush=True)

    def clear(self) -> None:
        if self.live and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self, running: dict[str, Running], finished: int) -> None:
        if not self.live or time.monotonic() - self.last_draw < REDRAW_SECONDS:
            return
        self.clear()
        width = os.get_terminal_size().columns if sys.stdout.isatty() else 120
        lines = [f"{finished}/{self.total} stages done, {len(running)} running:"]
        for name, run in running.items():
            line = (f"  {name}  [{run.slot.name}]  {format_seconds(time.monotonic() - run.started)}  "
                    f"{last_line(log_path(run.stage))}")
            lines.append(line[:width - 1])
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn, self.last_draw = len(lines), time.monotonic()


def start(stage: Stage, ledger: Ledger, statuses: dict[str, str], slot: Slot, cwd: Path) -> Running:
    """Start one stage in ``slot``, its output appended to its log (a header per attempt)."""
    argv = begin(stage, ledger, statuses[stage.name])
    shown = shlex.join(["python", *stage.launcher, *argv])
    path = log_path(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "ab")
    log.write(f"\n=== {stage.name} [{slot.name}] {datetime.now().isoformat(timespec='seconds')}\n$ {shown}\n".encode())
    log.flush()
    process = subprocess.Popen([sys.executable, *stage.launcher, *argv], cwd=cwd,
                               env={**child_environment(), **slot.env, "PYTHONUNBUFFERED": "1"},
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, preexec_fn=parent_death_signal())
    return Running(stage, slot, process, log, time.monotonic())


def run_side_by_side(stages: Sequence[Stage], ledger: Ledger, statuses: dict[str, str], cwd: Path,
                     slots: Sequence[Slot], live: bool = False) -> int:
    """Run every stage that is not done, up to ``len(slots)`` at once, each as soon as the stages it
    depends on are done (the first ready in the plan's order first). After a stage fails no other
    starts, the running ones finish, and its status is returned; after Ctrl-C or SIGTERM every running
    stage is passed the signal, and this returns once all have checkpointed. 0: every stage done."""
    for stage in stages:
        if statuses[stage.name] == "done":
            print(f"=== {stage.name}: done, skipped ({stage.folder})", flush=True)
    waiting = [stage for stage in stages if statuses[stage.name] != "done"]
    free, running = list(slots), {}
    display = Display(live, len(stages))
    finished = len(stages) - len(waiting)
    failed: list[tuple[str, int]] = []
    received: list[int] = []

    def forward(signum, frame):
        first = not received
        received.append(signum)
        display.event(f"\n{signal.Signals(signum).name} received: " + (
            f"the {len(running)} running stages finish their step and save a checkpoint; rerun the same "
            "command to continue" if first else "passed on again: the running stages stop at once"))
        for run in running.values():
            run.process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    display.event(f"running up to {len(slots)} stages at once: " + ", ".join(slot.name for slot in slots))
    try:
        while True:
            while waiting and free and not failed and not received:
                # a dependency outside the plan (none in reproduce.py's) counts as done
                ready = next((s for s in waiting if all(statuses.get(d, "done") == "done" for d in s.depends)), None)
                if ready is None:
                    break
                waiting.remove(ready)
                run = start(ready, ledger, statuses, free.pop(0), cwd)
                running[ready.name] = run
                display.event(f"=== {ready.name}: started [{run.slot.name}], log {log_path(ready)}")
            if not running:
                break
            for name, run in list(running.items()):
                code = run.process.poll()
                if code is None:
                    continue
                run.log.close()
                del running[name]
                free.append(run.slot)
                seconds = time.monotonic() - run.started
                code = code if code >= 0 else 128 - code
                ledger.add_time(run.stage, seconds, finished=code == 0)
                if code == 0:
                    statuses[name] = "done"
                    finished += 1
                    display.event(f"=== {name}: done in {format_seconds(seconds)} ({finished}/{len(stages)})")
                else:
                    failed.append((name, code))
                    how = "was interrupted" if code > 128 or received else f"failed with exit status {code}"
                    display.event(f"=== {name} {how} after {format_seconds(seconds)}; the end of its log "
                                  f"{log_path(run.stage)}:\n{tail(log_path(run.stage))}")
            display.draw(running, finished)
            time.sleep(POLL_SECONDS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        display.clear()
    if failed or received:
        stopped = [name for name, _ in failed]
        print(f"\n{len(stopped)} stage{'s' if len(stopped) != 1 else ''} did not finish ({', '.join(stopped) or 'none'}"
              f"), {len(waiting)} not started. Rerun the same command to continue from there.", file=sys.stderr)
        if failed:
            code = next((c for _, c in failed if c <= 128 and not received), failed[0][1])
            return code
        return 128 + received[0]
    if waiting:  # cannot happen with a plan whose dependencies are in it: said plainly rather than hung
        raise ConfigError(f"stages {', '.join(s.name for s in waiting)} wait for stages that never ran")
    return 0
