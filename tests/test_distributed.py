"""torchrun with 2 CPU processes (gloo): train.py runs, resumes, and its checkpoints serve single-process scripts."""
from __future__ import annotations

import json
from itertools import islice
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from dataloaders.datasets import SegmentationDataset
from dataloaders.samplers import StreamBatchSampler
from dataloaders.splits import load_run_data
from networks.mgcc import MGCCNet
from test_train import TINY
from torch.utils.data import DataLoader
from segmenter.evaluation import evaluate


def torchrun(script: str, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                             str(ROOT / script), *map(str, args)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result


def test_ranks_split_each_global_batch_without_overlap():
    whole = StreamBatchSampler(10, 4, seed=2, stream=0, whole_epochs=True, start_step=3)
    parts = [StreamBatchSampler(10, 4, seed=2, stream=0, whole_epochs=True, start_step=3, rank=r, world_size=2)
             for r in range(2)]
    for batch, a, b in islice(zip(iter(whole), *map(iter, parts)), 6):
        assert sorted(a + b) == sorted(batch) and not set(a) & set(b) and len(a) == len(b) == 2


@pytest.mark.slow
def test_two_process_training_resume_and_single_process_use(tmp_path, dataset):
    out = tmp_path / "ddp"
    args = ["--data-dir", dataset, "--out-dir", out, *TINY, "--iterations", "6"]
    first = torchrun("train.py", *args, "--stop-after", "3")
    assert "x 2 |" in first.stdout and "continue with" in first.stdout.lower()
    checkpoint = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["iteration"] == 3 and len(checkpoint["rng"]) == 2
    torchrun("train.py", "--out-dir", out, "--resume", "--no-progress")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [3, 6]

    # the DDP checkpoint has the plain names: it loads in a single process ...
    best = torch.load(out / "checkpoint_best.pt", weights_only=True)
    model = MGCCNet(**best["model_args"])
    model.load_state_dict(best["model"])
    # ... where evaluating it gives what rank 0 logged under torchrun
    run_data = load_run_data(dataset, 1, need_unlabeled=False)
    loader = DataLoader(SegmentationDataset(run_data.selection, 32, 3, "official"), batch_size=4)
    single = evaluate(model, loader, torch.device("cpu"))
    logged = next(r for r in lines if r["iteration"] == best["iteration"])
    assert set(single) - set(logged) == {"hd95", "asd", "nsd"}  # surface metrics only in the final evaluation
    for name in logged.keys() & single.keys():
        assert single[name] == pytest.approx(logged[name], abs=1e-9), name
    run_script("predict.py", "--checkpoint", out / "checkpoint_best.pt", "--input-dir", dataset, "--output-dir",
               tmp_path / "pred", "--num-workers", "0", "--no-overlays")
    assert len(list((tmp_path / "pred" / "masks").iterdir())) == 12

    # and the reverse: a single-process run resumes under torchrun
    single_out = tmp_path / "single"
    run_script("train.py", "--data-dir", dataset, "--out-dir", single_out, *TINY, "--iterations", "4",
               "--stop-after", "2", "--mode", "supervised")
    torchrun("train.py", "--out-dir", single_out, "--resume", "--no-progress")
    assert json.loads((single_out / "metrics.json").read_text())["iterations"] == 4


@pytest.mark.slow
def test_sigterm_to_the_process_group_under_torchrun_checkpoints(tmp_path, dataset):
    """The group's SIGTERM reaches each rank twice (directly, and forwarded by torchrun's agent) and
    their data-loader workers: every rank must still finish the step and the checkpoint be written."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                                str(ROOT / "train.py"), "--data-dir", str(dataset), "--out-dir", str(out), *TINY,
                                "--iterations", "100000", "--eval-every", "100000", "--log-every", "1",
                                "--checkpoint-every", "1", "--num-workers", "2"], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint_last.pt").exists():  # in the training loop
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert stderr.count("SIGTERM received") == 2 and "stopped by SIGTERM" in stderr, stderr[-5000:]
    assert "killed by signal" not in stderr and "Error" not in stderr.replace("SignalException", ""), stderr[-5000:]
    checkpoint = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["iteration"] > 0 and len(checkpoint["rng"]) == 2
