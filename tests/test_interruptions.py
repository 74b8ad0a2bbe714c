"""Fault injection on train.py with real processes: signals, kill -9, divergence, crashes while saving."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_train import TINY
import train
from utils.checkpoint import atomic_save, load_checkpoint


def start_training(dataset, out_dir, *extra, new_session=False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-dir", str(dataset), "--out-dir",
                             str(out_dir), *TINY, *extra], cwd=ROOT, env=env, start_new_session=new_session,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, dataset, signum):
    out = tmp_path / "run"
    process = start_training(dataset, out, "--iterations", "100000", "--eval-every", "100000", "--checkpoint-every", "1")
    # the first step's checkpoint: in the training loop, its signal handler installed (a fixed sleep
    # after config.yaml came too early on a loaded machine)
    wait_for(out / "checkpoint_last.pt", process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--resume" in stderr
    checkpoint = load_checkpoint(out / "checkpoint_last.pt", "mgcc-segmenter")
    assert 0 < checkpoint["iteration"] < 100000


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(tmp_path, dataset):
    """scancel, preemption and timeout signal every process of the job, the data-loader workers
    included: the run must still finish its step, save, exit 143 without a traceback, and resume exactly."""
    args = ["--iterations", "24", "--eval-every", "24", "--checkpoint-every", "1", "--seed", "5"]
    out = tmp_path / "killed"
    process = start_training(dataset, out, *args, "--num-workers", "2", new_session=True)  # its own group
    wait_for(out / "checkpoint_last.pt", process)  # in the training loop, the workers serving batches
    os.killpg(process.pid, signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"no exit after SIGTERM:\n{process.communicate()[1][-3000:]}") from None
    if process.returncode == 0:
        pytest.skip("the run finished before the signal landed")
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    stopped_at = load_checkpoint(out / "checkpoint_last.pt", "mgcc-segmenter")["iteration"]
    assert 0 < stopped_at < 24
    assert train.main(["--out-dir", str(out), "--resume", "--no-progress"]) == 0
    # the batches are a function of (seed, step) whatever the workers: the straight run loads in-process
    assert train.main(["--data-dir", str(dataset), "--out-dir", str(tmp_path / "straight"), *TINY, *args]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(out / "checkpoint_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, dataset):
    args = ["--iterations", "8", "--eval-every", "4", "--checkpoint-every", "2", "--seed", "3"]
    assert train.main(["--data-dir", str(dataset), "--out-dir", str(tmp_path / "straight"), *TINY, *args]) == 0
    out = tmp_path / "killed"
    process = start_training(dataset, out, *args)
    wait_for(out / "checkpoint_last.pt", process)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before the kill landed")
    assert load_checkpoint(out / "checkpoint_last.pt")["iteration"] in (2, 4, 6)  # a whole, readable checkpoint
    assert train.main(["--out-dir", str(out), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    """A learning rate of 1e30 poisons the weights after the first step: the run must stop with the
    iteration named, exit status 3, and leave the checkpoint written before the divergence intact."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(dataset), "--out-dir",
                             str(tmp_path / "run"), *TINY, "--iterations", "50", "--lr", "1e30", "--log-every", "1",
                             "--checkpoint-every", "1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    match = re.search(r"non-finite (loss|weights) at iteration (\d+)", result.stderr)
    assert match, result.stderr
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt", "mgcc-segmenter")
    assert saved["iteration"] <= int(match[2]) < 50
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    atomic_save({"kind": "x", "iteration": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"kind": "x", "iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path, "x")["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temporary file left behind
