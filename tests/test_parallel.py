"""reproduce.py past one process: --jobs N on one node, and the stages as submitit jobs (issue 22).

One tiny protocol (the generator, its samples, a supervised and an mgcc-synthetic arm, each arm's
predict stage) is run once one stage after another; every other way of running it must give the same
results.csv, byte for byte, and the same weights. On the CPU that holds at the same threads per stage
(protocol/parallel.py says why), so the sequential run has one thread and --jobs 2 two cores' worth.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, fake_sbatch, run_script, write_dataset
from protocol.ledger import Ledger, Stage

ARMS = ("supervised", "mgcc-synthetic")
# 200 iterations, a checkpoint every 10: long enough to be stopped in the middle, a few seconds a run
TRAIN = "--iterations 200 --eval-every 50 --checkpoint-every 10 --width 4 --image-size 32 --num-workers 0 --schedule-scale 1"


def protocol(data: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--arms", *ARMS,
            "--labeled-fraction", "0.5", "--seed", "3", "--ldm-config", "configs/ldm_tiny.yaml",
            "--ldm-args", "--vae-steps 2 --diffusion-steps 2 --image-size 32", "--num-samples", "8",
            "--sample-args", "--steps 5 --no-c2st", "--train-args", TRAIN, "--device", "cpu", "--no-progress",
            "--no-estimate", *extra]


def run(command: list, threads: int, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def start(command: list, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def weights(out: Path, arm: str) -> dict:
    return torch.load(out / "split1" / arm / "checkpoint_best.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_results(out: Path, reference: Path) -> None:
    assert (out / "results.csv").read_bytes() == (reference / "results.csv").read_bytes()
    for arm in ARMS:
        a, b = weights(out, arm), weights(reference, arm)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """(data folder, the sequential run's folder): one stage after another, one thread."""
    root = tmp_path_factory.mktemp("parallel")
    data = write_dataset(root / "toy", n=15, size=(40, 48))
    out = root / "sequential"
    run(protocol(data, out), threads=1)
    with open(out / "results.csv") as f:
        assert f.read().count("\n") == 1 + len(ARMS)
    return data, out


@pytest.mark.slow
def test_jobs_2_equals_the_sequential_run(sequential, tmp_path):
    data, reference = sequential
    out = tmp_path / "jobs2"
    result = run(protocol(data, out, "--jobs", "2"), threads=2)
    assert "running up to 2 stages at once: CPU 0, 1 thread, CPU 1, 1 thread" in result.stdout
    # stages without a dependency between them ran side by side: the baseline beside the generator
    lines = result.stdout.splitlines()
    assert lines.index("=== split1/supervised: started [CPU 1, 1 thread], log "
                       f"{out / 'split1' / 'supervised.log'}") < next(
        k for k, line in enumerate(lines) if line.startswith("=== split1/ldm: done"))
    assert_same_results(out, reference)
    log = (out / "split1" / "mgcc-synthetic.log").read_text()
    assert "$ python train.py" in log and "iteration 200" in log  # each stage's output in its own log
    assert (out / "times.csv").is_file() and "train_seconds" not in (out / "results.csv").read_text()


@pytest.mark.slow
def test_a_killed_parallel_run_resumes_every_stage(sequential, tmp_path):
    """kill -9 of reproduce.py while two stages train: each gets SIGTERM from the kernel, checkpoints,
    and the rerun resumes both and gives the uninterrupted run's results."""
    data, reference = sequential
    out = tmp_path / "killed"
    driver = start(protocol(data, out, "--jobs", "2", "--no-generator", "--arms", "supervised", "mgcc-real"), 2)
    # a baseline beside mgcc-real (no generator: both train at once from the start)
    try:
        wait_for(lambda: all((out / "split1" / arm / "checkpoint_last.pt").is_file() for arm in ("supervised",
                                                                                                  "mgcc-real")),
                 "both stages' first checkpoint")
    finally:
        driver.kill()
        driver.wait()
    wait_for(lambda: not any((out / "split1" / arm / ".writer.lock").exists() for arm in ("supervised", "mgcc-real")),
             "the stages to checkpoint and end", timeout=120)
    ledger = Ledger(out / "stages.json")
    assert [ledger.stages[f"split1/{arm}"]["finished"] for arm in ("supervised", "mgcc-real")] == [None, None]
    for arm in ("supervised", "mgcc-real"):
        assert "stopped by SIGTERM" in (out / "split1" / f"{arm}.log").read_text()
    result = run(protocol(data, out, "--jobs", "2", "--no-generator", "--arms", "supervised", "mgcc-real"), 2)
    for arm in ("supervised", "mgcc-real"):
        assert f"{'split1/' + arm:32s} resume" in result.stdout
    # the same protocol run sequentially, without interruption, at one thread per stage
    plain = tmp_path / "plain"
    run(protocol(data, plain, "--no-generator", "--arms", "supervised", "mgcc-real"), threads=1)
    assert (out / "results.csv").read_bytes() == (plain / "results.csv").read_bytes()
    for arm in ("supervised", "mgcc-real"):
        a = torch.load(out / "split1" / arm / "checkpoint_best.pt", weights_only=False)["model"]
        b = torch.load(plain / "split1" / arm / "checkpoint_best.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), arm


@pytest.mark.slow
def test_submitit_local_runs_the_protocol_with_dependencies_and_a_preemption(sequential, tmp_path):
    """--launcher submitit-local: every stage a job, submitted at once; mgcc-synthetic waits for the
    samples, which wait for the generator. Its job is preempted (SIGUSR2, as SLURM sends it) once it
    has a checkpoint: the stage checkpoints, the job is requeued and resumes it. A rerun while jobs run
    reports them and submits nothing; once they have ended it collects the same results."""
    data, reference = sequential
    out = tmp_path / "submitit"
    command = protocol(data, out, "--launcher", "submitit-local")
    result = run(command, threads=1)
    assert "6 jobs submitted, 0 queued or running before" in result.stdout
    ledger = Ledger(out / "stages.json")
    jobs = ledger.jobs
    assert jobs["split1/samples"]["after"] == [jobs["split1/ldm"]["id"]]
    assert jobs["split1/mgcc-synthetic"]["after"] == [jobs["split1/samples"]["id"]]
    assert jobs["split1/mgcc-synthetic/predict"]["after"] == [jobs["split1/mgcc-synthetic"]["id"]]

    train = out / "split1" / "mgcc-synthetic"
    wait_for(lambda: (train / "checkpoint_last.pt").is_file(), "mgcc-synthetic's first checkpoint")
    ledger.reload()
    os.kill(ledger.jobs["split1/mgcc-synthetic"]["pid"], signal.SIGUSR2)
    rerun = run(command, threads=1)
    if "results.csv" not in rerun.stdout:  # jobs still running: reported, none submitted again
        assert "0 jobs submitted" in rerun.stdout and "SUBMITTED" not in rerun.stdout
    wait_for(lambda: Ledger(out / "stages.json").stages.get("split1/mgcc-synthetic/predict", {}).get("finished"),
             "the last job", timeout=300)
    final = run(command, threads=1)
    assert "wrote " in final.stdout
    ledger.reload()
    assert ledger.jobs["split1/mgcc-synthetic"].get("requeues") == 1
    assert "train.py --out-dir " in (log := (out / "split1" / "mgcc-synthetic.log").read_text()) and " --resume" in log
    # each stage started after the stages it reads had finished
    for name, entry in ledger.stages.items():
        for dep, finished in entry["inputs"].items():
            assert finished and finished == ledger.stages[dep]["finished"], (name, dep)
    assert_same_results(out, reference)


@pytest.mark.slow
def test_slurm_jobs_carry_the_stages_dependencies_and_are_never_submitted_twice(tmp_path):
    """--launcher slurm against stand-ins for sbatch and sacct: each job's script names its partition,
    time limit, the USR2 warning and afterok on the jobs of its inputs; a rerun while sacct says they
    run submits nothing; once one has failed, that stage alone is submitted again."""
    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    bin_dir = tmp_path / "bin"
    fake_sbatch(bin_dir)
    (bin_dir / "sacct").write_text(  # every job asked about: the state in $FAKE/state.<id>, else RUNNING
        "#!/bin/sh\nids=$(echo \"$@\" | grep -o -- '-j [0-9,]*' | sed 's/-j //' | tr ',' ' ')\n"
        "echo 'JobID|State|NodeList'\n"
        "for i in $ids; do s=RUNNING; [ -f \"$FAKE/state.$i\" ] && s=$(cat \"$FAKE/state.$i\"); echo \"$i|$s|node1\"; done\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; the jobs never run here
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod(0o755 | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE=str(tmp_path))
    command = [sys.executable, str(ROOT / "reproduce.py"), "--data-dir", str(data), "--out-dir", str(tmp_path / "out"),
               "--preset", "demo", "--no-generator", "--arms", "supervised", "--labeled-fraction", "0.5",
               "--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", "90", "--device", "cpu",
               "--no-progress", "--no-estimate"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 jobs submitted" in result.stdout
    train, predict = (tmp_path / "job101.sh").read_text(), (tmp_path / "job102.sh").read_text()
    for script in (train, predict):
        assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=90" in script
        assert "#SBATCH --signal=USR2@120" in script
    assert "#SBATCH --job-name=mgcc:split1/supervised" in train and "dependency" not in train
    assert "#SBATCH --dependency=afterok:101" in predict and "#SBATCH --kill-on-invalid-dep=yes" in predict

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "0 jobs submitted, 2 queued or running before" in result.stdout
    assert not (tmp_path / "job103.sh").exists()
    local = subprocess.run([a for a in command if a not in ("--launcher", "slurm")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 2 and "2 cluster jobs of" in local.stderr  # no local run over running jobs

    (tmp_path / "state.102").write_text("CANCELLED by 0")
    (tmp_path / "state.101").write_text("FAILED")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "2 jobs submitted, 0 queued" in result.stdout
    assert "#SBATCH --dependency=afterok:103" in (tmp_path / "job104.sh").read_text()


def _write_entries(path: str, worker: int, count: int) -> None:
    ledger = Ledger(Path(path))
    for k in range(count):
        stage = Stage(f"w{worker}/s{k}", ["script.py", str(k)], Path(path).parent / f"w{worker}s{k}")
        ledger.start(stage)
        ledger.add_time(stage, 1.0, finished=True)
        ledger.set_job(stage.name, state="ended")


@pytest.mark.slow
def test_the_ledger_keeps_every_concurrent_writer_s_entries(tmp_path):
    """Four processes each recording 15 stages in one ledger at once: all 60 are there, finished."""
    path = tmp_path / "stages.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_entries, args=(str(path), w, 15)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    ledger = Ledger(path)
    assert len(ledger.stages) == 60 and all(e["finished"] and e["seconds"] == 1.0 for e in ledger.stages.values())
    assert len(ledger.jobs) == 60
    json.loads(path.read_text())  # whole, never half written


@pytest.mark.slow
def test_bad_parallel_options_are_one_clear_error(tmp_path):
    data = write_dataset(tmp_path / "toy", n=6)
    for flags, message in ((["--jobs", "0"], "--jobs must be at least 1"),
                           (["--jobs", "2", "--launcher", "slurm"], "--jobs 2 is for --launcher local"),
                           (["--gpus", "a,b"], "--gpus a,b: a comma-separated list"),
                           (["--jobs", "2", "--gpus", "0"], "--gpus needs --device cuda"),
                           (["--stage", "split1/nothing"], "--stage split1/nothing: no such stage")):
        result = run_script("reproduce.py", "--data-dir", data, "--out-dir", tmp_path / "out", "--no-generator",
                            "--device", "cpu", "--no-estimate", *flags, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, flags


def test_each_job_gets_its_own_gpus_and_the_cpu_is_shared_out(monkeypatch):
    """node_slots on a (pretended) 4-GPU node whose CUDA_VISIBLE_DEVICES is 4,5,6,7: --gpus indexes
    those, a torchrun stage gets several, none is shared; on the CPU the threads are divided."""
    import utils.runtime
    from utils.config import ConfigError
    from protocol.parallel import node_slots

    monkeypatch.setattr(utils.runtime, "resolve_device", lambda name: torch.device("cuda" if name != "cpu" else "cpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in node_slots(4, "cuda")] == ["4", "5", "6", "7"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in node_slots(2, "cuda", gpus=[3, 1])] == ["7", "5"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in node_slots(2, "auto", gpus_per_job=2)] == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match="--jobs 3 x 2 GPUs per stage needs 6 GPUs; 4 are given"):
        node_slots(3, "cuda", gpus_per_job=2)
    with pytest.raises(ConfigError, match="--gpus 0,4: each must be one of the 4 visible"):
        node_slots(2, "cuda", gpus=[0, 4])
    with pytest.raises(ConfigError, match="use --device cuda and choose the GPUs with --gpus"):
        node_slots(2, "cuda:1")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert [s.env["OMP_NUM_THREADS"] for s in node_slots(3, "cpu")] == ["2", "2", "2"]


def test_a_job_pickled_before_the_move_to_protocol_still_unpickles():
    """submitit pickled a queued job's callable by its import path, utils.cluster.StageJob before issue 27:
    that name still resolves (utils/cluster.py's lazy shim), to the class protocol/cluster.py defines."""
    import pickle
    from protocol.cluster import StageJob

    job = StageJob("split1/ldm", ["python", "reproduce.py"], "/tmp", "/tmp/stages.json", "/tmp/log", ["a"])
    old = pickle.dumps(job, protocol=2).replace(b"protocol.cluster", b"utils.cluster")
    assert b"utils.cluster" in old
    restored = pickle.loads(old)
    assert isinstance(restored, StageJob) and restored.name == "split1/ldm" and restored.depends == ["a"]
