"""Resumable pipelines of script runs: which stages are done, which resume, which are stale.

A stage is one run of a project script (a subprocess) that writes one folder. The ledger
(``<out>/stages.json``) records for each stage the command that made it, whether it finished, its
wall time, the stages it was made from, and a digest of what it read (``Stage.reads``): its
resolved configuration (the contents, not the path of a config file) and the files it read (split
files, images, masks), each by a SHA-256 of its bytes. On a rerun of the same pipeline a stage is

- ``done``   finished with the same command, from the same inputs: skipped;
- ``resume`` started with the same command but not finished: continued (the script's --resume);
- ``todo``   never started, or its folder was deleted: run from scratch;
- ``stale``  finished or started with another command, another configuration, other file contents,
  or from inputs made again since: an error that names the stage and what changed (the config key,
  the file), never a silent reuse.

Files are compared by content, not by size and modification time: a copy (cp, rsync, a restored
backup) changes the times of unchanged files, and an edit can keep both. Hashing costs little: the
1,294 images and masks of BUSI (34 MB) hash in about 0.3 s, once per run of the pipeline.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from utils.files import atomic_write_text
from utils.config import ConfigError
from utils.locks import exclusive
from utils.runtime import hub_offline

# flags that change how a stage runs or shows progress, not what it makes
PRESENTATION_FLAGS = {"--device": 1, "--progress": 0, "--no-progress": 0, "--overwrite": 0}
# Flags added to a stage's command since, which only add to what it writes (predict.py --trained-ids: the
# same masks and metrics, and the clean subset's beside them): a finished stage made without one is made
# again ("todo"), not refused as stale.
ADDED_OUTPUT_FLAGS = ("--trained-ids",)
# variables torchrun sets for its workers: a stage started from a worker must not inherit them
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@dataclass
class Stage:
    """One script run. ``command`` is the fresh run's argv after the interpreter; ``resume`` (if the
    script can continue an interrupted run in ``folder``) returns the argv that continues it, or None
    when the folder holds nothing to continue from."""
    name: str
    command: list[str]
    folder: Path
    depends: list[str] = field(default_factory=list)
    resume: Callable[[], list[str] | None] | None = None
    launcher: list[str] = field(default_factory=list)  # e.g. torchrun's, before the script
    overwrite_flag: str | None = "--overwrite"  # how the script is told to replace a leftover folder
    estimate: float | None = None  # seconds, filled in by the planner
    estimate_source: str = ""
    # what the stage reads: () -> (resolved configuration as a plain dict or None, {name: path} of the
    # files it reads); recorded when it starts, compared on every rerun
    reads: Callable[[], tuple[dict | None, dict[str, Path]]] | None = None
    # the script's option defaults: a key a recorded configuration lacks (an option added to the script
    # since) counts as unchanged while it is at its default, which keeps the behaviour it was added with
    defaults: dict = field(default_factory=dict)


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256, within this process only


def file_digest(path: Path) -> str | None:
    """SHA-256 (hex, first 32 digits) of a file's bytes; None when it is missing. Cached per process
    by (path, size, mtime): a rerun of the pipeline, a new process, hashes every file again."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()[:32]
    return _DIGESTS[key]


def plain(value):
    """A configuration value as JSON keeps it (tuples as lists, paths as text), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def describe_read_change(old_config: dict | None, new_config: dict | None, old_files: dict[str, str | None] | None,
                         new_files: dict[str, str | None], limit: int = 5) -> str:
    """'config lr 0.01 -> 0.5; file images/a.png changed' for two digests of what a stage read ('' if equal).
    ``old_files`` None: the ledger no longer holds the old file list, only that it differed."""
    parts = []
    old_config, new_config = old_config or {}, new_config or {}
    keys = [k for k in new_config if k in old_config and old_config[k] != new_config[k]]
    keys += [k for k in new_config if k not in old_config] + [k for k in old_config if k not in new_config]
    for key in keys:
        parts.append(f"config {key} {old_config.get(key, '(unset)')} -> {new_config.get(key, '(unset)')}")
    if old_files is None:
        parts.append("the files it read changed")
    else:
        files = [(name, "changed" if name in old_files and new_files[name] is not None
                  else "removed" if name in old_files else "added")
                 for name in new_files if old_files.get(name) != new_files[name]]
        files += [(name, "no longer read") for name in old_files if name not in new_files]
        parts += [f"file {name} {how}" for name, how in files[:limit]]
        if len(files) > limit:
            parts.append(f"and {len(files) - limit} more files")
    return "; ".join(parts)


def experiment_args(command: Sequence[str]) -> list[str]:
    """The command without the flags that do not change what a stage makes."""
    kept, skip = [], 0
    for token in command:
        if skip:
            skip -= 1
        elif token in PRESENTATION_FLAGS:
            skip = PRESENTATION_FLAGS[token]
        else:
            kept.append(token)
    return kept


def without_flags(command: Sequence[str], flags: Sequence[str]) -> list[str]:
    """The command without ``flags`` and their values."""
    kept, dropping = [], False
    for token in command:
        if token.startswith("--"):
            dropping = token in flags
        if not dropping:
            kept.append(token)
    return kept


def describe_change(old: Sequence[str], new: Sequence[str]) -> str:
    """'--iterations 600 -> 800, --seed added' for two commands of one script."""
    def flags(command):
        out, key = {}, None
        for token in command:
            if token.startswith("--"):
                key = token
                out[key] = []
            elif key is not None:
                out[key].append(token)
            else:
                out.setdefault("", []).append(token)
        return {k: " ".join(v) for k, v in out.items()}
    a, b = flags(old), flags(new)
    parts = []
    for key in [k for k in a if k in b and a[k] != b[k]]:
        parts.append(f"{key or 'script'} {a[key] or '(set)'} -> {b[key] or '(set)'}")
    parts += [" ".join(filter(None, (k, b[k], "added"))) for k in b if k not in a]
    parts += [" ".join(filter(None, (k, a[k], "removed"))) for k in a if k not in b]
    return ", ".join(parts) or "the command"


class Ledger:
    """``stages.json``: what each stage was made with, and the cluster job that runs it, if any.

    Every change is one transaction under an exclusive lock of ``.stages.json.lock``: read the file
    afresh, change one stage's entry, write it atomically. Stages that run side by side (``--jobs``, or
    SLURM jobs on other nodes, each updating the ledger as it starts and ends) therefore never lose one
    another's entries, and a reader never sees half a file. (The lock is ``flock``: on a network file
    system it holds where the file system supports it, as NFSv4 and Lustre mounted with flock do.)
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.stages: dict[str, dict] = {}
        # file lists shared by the stages that read the same files: digest of the list -> {name: SHA-256}
        self.file_sets: dict[str, dict[str, str | None]] = {}
        # stage name -> the cluster job submitted for it: {"launcher", "id", "folder", "host", "state"}
        self.jobs: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self.stages, self.file_sets, self.jobs = data["stages"], data.get("file_sets", {}), data.get("jobs", {})
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{self.path} is not a stage ledger ({error}); move it away to start over") from None

    @contextmanager
    def transaction(self):
        """``with ledger.transaction(): ledger.stages[name] = ...``: the change is made to the ledger as
        it is on disk now, under its lock, and written back before the lock is released."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_path):
            self.reload()
            yield
            self.save()

    def save(self) -> None:
        used = {entry.get("reads", {}).get("files") for entry in self.stages.values()}
        self.file_sets = {key: files for key, files in self.file_sets.items() if key in used}
        atomic_write_text(self.path, json.dumps({"stages": self.stages, "file_sets": self.file_sets,
                                                 **({"jobs": self.jobs} if self.jobs else {})}, indent=1))

    @staticmethod
    def read_now(stage: Stage) -> tuple[dict | None, dict[str, str | None]] | None:
        """(configuration, {file name: SHA-256}) of what the stage reads now; None if it declares nothing."""
        if stage.reads is None:
            return None
        config, files = stage.reads()
        return (plain(config) if config is not None else None,
                {name: file_digest(Path(path)) for name, path in sorted(files.items())})

    def read_change(self, stage: Stage, entry: dict) -> str:
        """What changed in what the stage reads since the ledger recorded it ('' if nothing)."""
        now = self.read_now(stage)
        if now is None or "reads" not in entry:  # a stage that declares nothing, or a ledger from before
            return ""
        config, files = now
        recorded = entry["reads"]
        recorded_config = recorded["config"]
        if recorded_config is not None and config is not None:  # options added since, at their defaults
            added = {k: plain(stage.defaults[k]) for k in config if k not in recorded_config and k in stage.defaults}
            recorded_config = {**added, **recorded_config}
        if recorded_config == config and recorded["files"] == files_key(files):
            return ""
        return describe_read_change(recorded_config, config, self.file_sets.get(recorded["files"]), files)

    def status(self, stage: Stage, pending: set[str]) -> tuple[str, str]:
        """(done | resume | todo | stale, why). ``pending``: stages of this pipeline that will run."""
        entry = self.stages.get(stage.name)
        if entry is None or not stage.folder.exists():
            return "todo", ""
        if experiment_args(entry["command"]) != experiment_args(stage.command):
            if not entry["finished"] and not (stage.resume and stage.resume() is not None):
                return "todo", ""  # it failed before its first checkpoint: nothing made, nothing to lose
            if experiment_args(entry["command"]) == without_flags(experiment_args(stage.command), ADDED_OUTPUT_FLAGS):
                return "todo", ""  # made before a flag that only adds outputs: made again, with them
            return "stale", f"made with other options: {describe_change(entry['command'], stage.command)}"
        if change := self.read_change(stage, entry):
            if not entry["finished"] and not (stage.resume and stage.resume() is not None):
                return "todo", ""  # it stopped before its first checkpoint: nothing made, nothing to lose
            return "stale", f"what it read has changed: {change}"
        for dep in stage.depends:
            if dep in pending or self.stages.get(dep, {}).get("finished") != entry["inputs"].get(dep):
                return "stale", f"made from an earlier {dep}, which has been made again or will be"
        if entry["finished"]:
            return "done", ""
        return ("resume", "") if stage.resume and stage.resume() is not None else ("todo", "")

    def start(self, stage: Stage) -> None:
        now = self.read_now(stage)  # hashed before the lock is taken: it can take a while
        with self.transaction():
            self.stages[stage.name] = {
                "command": stage.command, "finished": None, "seconds": 0.0,
                "inputs": {dep: self.stages[dep]["finished"] for dep in stage.depends}}
            if now is not None:
                config, files = now
                self.file_sets[files_key(files)] = files
                self.stages[stage.name]["reads"] = {"config": config, "files": files_key(files)}

    def add_time(self, stage: Stage, seconds: float, finished: bool) -> None:
        with self.transaction():
            entry = self.stages[stage.name]
            entry["seconds"] += seconds
            if finished:
                entry["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def set_job(self, name: str, **fields) -> None:
        """Record (or update) the cluster job of stage ``name``: its id when submitted, its state as it runs."""
        with self.transaction():
            self.jobs[name] = {**self.jobs.get(name, {}), **fields}

    def seconds(self, name: str) -> float | None:
        entry = self.stages.get(name)
        return entry["seconds"] if entry and entry["finished"] else None


def files_key(files: dict[str, str | None]) -> str:
    """One digest of a whole {name: SHA-256} file list."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


def check_plan(stages: Sequence[Stage], ledger: Ledger) -> dict[str, str]:
    """Each stage's status; every stale stage together in one ConfigError."""
    statuses, stale, pending = {}, [], set()
    for stage in stages:
        status, why = ledger.status(stage, pending)
        statuses[stage.name] = status
        if status == "stale":
            stale.append(f"{stage.name} ({stage.folder}): {why}")
        if status != "done":
            pending.add(stage.name)
    if stale:
        raise ConfigError("finished work would be stale with these options:\n  " + "\n  ".join(stale) +
                          "\nUse another --out-dir, or delete the folders named to make them again "
                          "(with the stages made from them).")
    return statuses


def child_environment() -> dict[str, str]:
    return hub_offline({k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES})


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send the child SIGTERM when this process dies (Linux's
    PR_SET_PDEATHSIG), or None where there is no prctl.

    Why this and not only the run folder's lock: a ``kill -9`` of this process cannot be caught, and
    the stage, in its own session, would go on writing its folder with nobody watching; with the death
    signal it gets the SIGTERM it would get from here, finishes its step and checkpoints, and the rerun
    resumes from there. (The lock still refuses a second writer should one be alive, e.g. elsewhere.)
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, called after it
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig = os.getpid(), 1

    def end_with_parent() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
    return end_with_parent


def run_stage(stage: Stage, argv: list[str], cwd: Path) -> int:
    """Run one stage in its own session, passing on the first SIGINT/SIGTERM this process gets.

    In its own session the script sees a signal once, from here, whether the user pressed Ctrl-C,
    killed this process, or its process group: it then finishes its step and checkpoints (a second
    signal would stop it at once). If this process is killed outright (``kill -9``), the stage gets
    SIGTERM from the kernel (see :func:`parent_death_signal`). Returns the script's exit status.
    """
    command = [sys.executable, *stage.launcher, *argv]
    print(f"\n=== {stage.name}\n$ {shlex.join(['python', *stage.launcher, *argv])}", flush=True)
    child = subprocess.Popen(command, cwd=cwd, env=child_environment(), start_new_session=True,
                             preexec_fn=parent_death_signal())
    received: list[int] = []

    def forward(signum, frame):
        if not received:
            received.append(signum)
            print(f"\n{signal.Signals(signum).name} received: the running stage finishes its step and saves "
                  "a checkpoint; rerun the same command to continue", file=sys.stderr, flush=True)
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and code == 0:  # the stage had just finished when the signal came
        return 0
    return code if code >= 0 else 128 - code


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def begin(stage: Stage, ledger: Ledger, status: str) -> list[str]:
    """The argv that runs ``stage`` now: its resume command, or its fresh command (with the overwrite
    flag over a leftover folder), the ledger then recording it as started."""
    if status == "resume":
        return stage.resume()
    leftover = stage.folder.exists() and stage.overwrite_flag
    ledger.start(stage)
    return stage.command + ([stage.overwrite_flag] if leftover else [])


def execute(stages: Sequence[Stage], ledger: Ledger, statuses: dict[str, str], cwd: Path) -> int:
    """Run every stage that is not done, in order; stop at the first that fails or is interrupted."""
    for stage in stages:
        if statuses[stage.name] == "done":
            print(f"=== {stage.name}: done, skipped ({stage.folder})", flush=True)
            continue
        argv = begin(stage, ledger, statuses[stage.name])
        started = time.monotonic()
        code = run_stage(stage, argv, cwd)
        ledger.add_time(stage, time.monotonic() - started, finished=code == 0)
        if code != 0:
            how = "was interrupted" if code > 128 else f"failed with exit status {code}"
            print(f"\n{stage.name} {how}. Rerun the same command to continue from there.", file=sys.stderr)
            return code
        statuses[stage.name] = "done"
    return 0
