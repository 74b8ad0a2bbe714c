"""Run folders under careless use (issue 19): a killed pipeline ends its stage, a stage that crashed
before making anything is run again with corrected options, one writer per run folder, and a crashed
run can be rerun into its folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from utils.config import ConfigError
from protocol.ledger import Ledger, Stage, check_plan

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

@pytest.mark.slow
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
        "from protocol.ledger import Ledger, Stage, execute\n"
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


@pytest.mark.slow
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


# --- train.py: crafted and non-finite checkpoints under --resume, folders in the way, a rerun after a crash

TINY = ["--width", "4", "--mixer-depth", "1", "--image-size", "32", "--batch-size", "4", "--labeled-batch-size", "2",
        "--iterations", "2", "--eval-every", "2", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A train.py run stopped after 1 of 2 iterations: its checkpoint_last.pt is what --resume reads."""
    import train
    from conftest import write_dataset

    tmp = tmp_path_factory.mktemp("resume")
    data = write_dataset(tmp / "toy", n=9)
    assert train.main(["--data-dir", str(data), "--out-dir", str(tmp / "run"), *TINY, "--stop-after", "1"]) == 0
    return data, tmp / "run"


def crafted_resume(tmp_path, stopped_run, change):
    import shutil

    import torch

    import train

    _, run = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = torch.load(copy / "checkpoint_last.pt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, copy / "checkpoint_last.pt")
    before = (copy / "checkpoint_last.pt").read_bytes()
    with pytest.raises(Exception) as error:
        train.main(["--out-dir", str(copy), "--resume", "--no-progress"])
    assert (copy / "checkpoint_last.pt").read_bytes() == before
    return error.value


def nan_weights(checkpoint):
    import torch
    checkpoint["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in checkpoint["model"].items()}


def wider(checkpoint):
    """The weights of a width-8 network under the config of the width-4 run."""
    from networks.mgcc import MGCCNet
    checkpoint["model"] = MGCCNet(**{**checkpoint["model_args"], "width": 8}).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (nan_weights, r"checkpoint_last.pt: its weights hold NaN or infinite values in \d+ tensor\(s\)"),
    (lambda c: c.pop("rng"), "checkpoint_last.pt is not a complete checkpoint of this project: rng is missing"),
    (lambda c: c.update(config=[1, 2]), "config is a list, expected a dict"),
    (lambda c: c.update(model=[1, 2]), "model is a list, expected a dict"),
    (wider, r"its weights do not fit the network its config describes \(.*'width': 4.*\): \d+ tensor\(s\), e.g. "),
], ids=["nan", "no rng", "config list", "model list", "other width"])
def test_resume_refuses_a_crafted_or_non_finite_checkpoint(tmp_path, stopped_run, change, message):
    """Each was a traceback; the NaN one trained, diverged and called the NaN file 'the last good checkpoint'."""
    from utils.checkpoint import CheckpointError

    error = crafted_resume(tmp_path, stopped_run, change)
    assert isinstance(error, CheckpointError) and re.search(message, str(error)), error


@pytest.mark.slow
def test_an_out_dir_that_is_a_file_or_read_only_is_named_before_the_data_checks(tmp_path, monkeypatch):
    import train
    from utils.files import WriteError

    (tmp_path / "file").write_text("x")
    missing = str(tmp_path / "no data")  # the data error would come later: the folder's comes first
    with pytest.raises(WriteError, match=r"--out-dir .*file/run: .*file is a file, not a folder"):
        train.main(["--data-dir", missing, "--out-dir", str(tmp_path / "file" / "run"), *TINY])
    with pytest.raises(WriteError, match=r"--out-dir .*file: .*file is a file, not a folder"):
        train.main(["--data-dir", missing, "--out-dir", str(tmp_path / "file"), *TINY])
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode, **kw))  # root may write anywhere: a read-only mount, simulated
    with pytest.raises(WriteError, match="cannot write in .*ro .a read-only file system"):
        train.main(["--data-dir", missing, "--out-dir", str(tmp_path / "ro" / "run"), *TINY])


@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun_into_its_folder(tmp_path, capsys):
    import train
    from conftest import write_dataset

    data = write_dataset(tmp_path / "toy", n=9)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("width: 0\n")  # what a crash in its first steps leaves
    assert train.main(["--data-dir", str(data), "--out-dir", str(run), *TINY]) == 0  # was: "already holds a run"
    assert f"note: {run}: replacing config.yaml of a run that stopped before its first checkpoint" in \
        capsys.readouterr().err
    assert (run / "checkpoint_best.pt").is_file() and "width: 4" in (run / "config.yaml").read_text()
    # a run with a checkpoint is still never replaced without --overwrite
    with pytest.raises(ConfigError, match="already holds a run"):
        train.main(["--data-dir", str(data), "--out-dir", str(run), *TINY])


@pytest.mark.slow
def test_a_second_train_py_into_a_folder_being_written_is_refused(tmp_path):
    import train
    from conftest import write_dataset
    from utils.locks import FolderInUseError

    data = write_dataset(tmp_path / "toy", n=9)
    process = hold_lock(tmp_path / "run", tmp_path / "marks")
    try:
        with pytest.raises(FolderInUseError, match=rf"run folder {tmp_path / 'run'} is being written by another "
                                                   rf"process \(pid {process.pid} "):
            train.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY])
        # nothing of the second run was written: the folder holds the first writer's lock alone
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".writer.lock"]
    finally:
        process.kill()
        process.wait(timeout=60)
    assert train.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY]) == 0
    assert not (tmp_path / "run" / ".writer.lock").exists()  # a writer that ends removes its lock file
    assert not (tmp_path / ".run.lock").exists()  # and takes none beside its folder (issue 33)


@pytest.mark.slow
def test_a_second_sample_ldm_py_into_a_folder_being_written_is_refused(tmp_path):
    import sample_ldm
    from utils.locks import FolderInUseError

    process = hold_lock(tmp_path / "synth", tmp_path / "marks")
    try:
        with pytest.raises(FolderInUseError, match=rf"sample folder {tmp_path / 'synth'} is being written by "
                                                   rf"another process \(pid {process.pid} "):
            sample_ldm.main(["--checkpoint", str(tmp_path / "no run"), "--out-dir", str(tmp_path / "synth"),
                             "--no-progress"])
    finally:
        process.kill()
        process.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("train_ids, found", [(None, "NoneType"), ([["benign (1)"]], "a list holding non-strings")])
def test_sample_ldm_names_an_ldm_json_with_unreadable_train_ids(tmp_path, train_ids, found):
    """Was a traceback (an unhashable list, or None, where the training ids are looked up)."""
    import json

    import sample_ldm
    from utils.checkpoint import CheckpointError

    run = tmp_path / "ldm"
    run.mkdir()
    (run / "ldm.json").write_text(json.dumps({"kind": "mgcc-ldm", "train_ids": train_ids, "vae_step": 1}))
    with pytest.raises(CheckpointError, match=f"ldm.json: train_ids is {re.escape(found)}, where train_ldm.py writes"):
        sample_ldm.main(["--checkpoint", str(run), "--out-dir", str(tmp_path / "synth"), "--no-progress"])


@pytest.mark.slow
def test_a_second_train_ldm_py_into_a_folder_being_written_is_refused(tmp_path):
    import train_ldm
    from utils.locks import FolderInUseError

    process = hold_lock(tmp_path / "ldm", tmp_path / "marks")
    try:
        with pytest.raises(FolderInUseError, match=rf"run folder {tmp_path / 'ldm'} is being written by another "
                                                   rf"process \(pid {process.pid} "):
            train_ldm.main(["--data-dir", str(tmp_path / "no data"), "--out-dir", str(tmp_path / "ldm"),
                            "--no-progress"])
    finally:
        process.kill()
        process.wait(timeout=60)
    assert [p.name for p in (tmp_path / "ldm").iterdir()] == [".writer.lock"]  # the killed first writer's
