"""Run folders under careless use (issue 19): a killed pipeline ends its stage, a stage that crashed
before making anything is run again with corrected options, one writer per run folder, and a crashed
run can be rerun into its folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from utils.config import ConfigError
from utils.stages import Ledger, Stage, check_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (ended, not yet reaped by init) counts as ended
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- 4. kill -9 of reproduce.py ends its stage ----------------------------------------------------------

def test_a_stage_ends_when_its_runner_is_killed_outright(tmp_path):
    """The stage runs in its own session, so a signal to the runner's group never reached it; after
    `kill -9` of the runner it went on writing its folder. Now the kernel sends it SIGTERM."""
    script = tmp_path / "stage.py"
    marks = tmp_path / "marks"
    script.write_text(
        "import os, signal, sys, time\n"
        f"marks = open({str(marks)!r}, 'a')\n"
        "def handle(signum, frame):\n"
        "    marks.write('signal\\n'); marks.flush(); sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, handle)\n"
        "marks.write(f'started {os.getpid()}\\n'); marks.flush()\n"
        "time.sleep(120)\n")
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from pathlib import Path\n"
        "from utils.stages import Ledger, Stage, execute\n"
        f"stage = Stage('s', [{str(script)!r}], Path({str(tmp_path / 'out')!r}))\n"
        f"ledger = Ledger(Path({str(tmp_path / 'stages.json')!r}))\n"
        "sys.exit(execute([stage], ledger, {'s': 'todo'}, Path('.')))\n")
    process = subprocess.Popen([sys.executable, str(runner)], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: marks.exists() and "started" in marks.read_text(), "the stage to start")
    stage_pid = int(marks.read_text().split()[1])
    process.kill()
    process.wait(timeout=60)
    wait_for(lambda: not alive(stage_pid), "the stage to end")
    assert "signal" in marks.read_text()  # it ended by the SIGTERM, through its handler (it checkpoints there)


# --- 9. a stage that crashed before making anything is not stale ---------------------------------------

def test_a_stage_that_crashed_before_its_first_checkpoint_runs_again_with_other_options(tmp_path):
    def stage(width):
        return Stage("a", ["train.py", "--width", str(width)], tmp_path / "a",
                     resume=lambda: ["train.py", "--resume"] if (tmp_path / "a" / "last.pt").exists() else None)
    ledger = Ledger(tmp_path / "stages.json")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("width: 0\n")  # what the crash with --width 0 left
    ledger.start(stage(0))
    assert check_plan([stage(4)], Ledger(tmp_path / "stages.json")) == {"a": "todo"}  # was: stale
    # once it wrote a checkpoint, other options would throw that work away: stale, as before
    (tmp_path / "a" / "last.pt").write_text("x")
    with pytest.raises(ConfigError, match="--width 0 -> 4"):
        check_plan([stage(4)], Ledger(tmp_path / "stages.json"))


# --- 4. one writer per folder: a lock that a killed writer does not leave held ---------------------------

def hold_lock(folder, marks):
    """A process that takes the folder's lock and sleeps (the first writer)."""
    code = ("import sys, time\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from utils.locks import FolderLock\n"
            f"FolderLock({str(folder)!r}, 'run folder').acquire()\n"
            f"open({str(marks)!r}, 'w').write('locked')\n"
            "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: marks.exists(), "the first writer to lock the folder")
    return process


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    from utils.locks import FolderInUseError, FolderLock

    process = hold_lock(tmp_path / "run", tmp_path / "marks")
    with pytest.raises(FolderInUseError, match=rf"run folder {tmp_path / 'run'} is being written by another process "
                                               rf"\(pid {process.pid} on .*, since .*-c\): one writer per folder"):
        FolderLock(tmp_path / "run", "run folder").acquire()
    process.kill()
    process.wait(timeout=60)
    with FolderLock(tmp_path / "run", "run folder"):  # the kernel released the killed writer's lock
        with pytest.raises(FolderInUseError):  # and this process's own lock holds against a second taker
            FolderLock(tmp_path / "run").acquire()
    FolderLock(tmp_path / "run").acquire().release()
