"""Fault injection on stage 1 (train_ldm.py, sample_ldm.py) with real processes and real files:
signals, kill -9, a corrupt image, a diverging run, truncated and foreign state files and models."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, write_dataset
import sample_ldm
import train_ldm
from generation.run import save_model
from utils.checkpoint import atomic_save, load_checkpoint
from utils.cli import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

# ldm_tiny at 32x32: seconds per run on a CPU
TINY = ("--config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--image-size", "32", "--device", "cpu",
        "--no-progress", "--num-workers", "0", "--preview-images", "2")
RUN = ("--vae-steps", "4", "--diffusion-steps", "4", "--checkpoint-every", "2", "--log-every", "1",
       "--sample-every", "0", "--disc-weight", "0.1", "--disc-start", "1")
NETWORKS = ("vae", "unet", "unet_ema")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Every run of a test in the same conditions (the weights are compared bit for bit), and two
    # threads per process crawl on two busy cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ldm_faults") / "toy", n=12, size=(64, 80))


@pytest.fixture(scope="module")
def straight(data: Path) -> Path:
    """An uninterrupted run (both stages), in a subprocess like the runs it is compared with."""
    run = data.parent / "straight"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # (module scope: before one_thread)
    result = subprocess.run([sys.executable, str(ROOT / "train_ldm.py"), "--data-dir", str(data), "--out-dir",
                             str(run), *TINY, *RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return run


def start(script: str, *args, new_session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            start_new_session=new_session, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(found, process: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll until ``found()`` is true; fail with the process's output if it ends first."""
    deadline = time.time() + timeout
    while not found():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def exit_status(main, args: list) -> int:
    """A script's ``main`` run in this process as its command line runs it (utils.cli.run_cli)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main([str(a) for a in args]))
    return exit_.value.code


def fails(capsys, main, args: list, *expected: str) -> None:
    assert exit_status(main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and all(e in err for e in expected), err


# ----------------------------------------------------------------------------------------------
# train_ldm.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigterm_finishes_the_step_saves_and_the_run_resumes(data: Path, tmp_path: Path, group: bool):
    """SIGTERM to the process alone, or to its whole group (scancel, timeout), data-loader workers included."""
    run = tmp_path / "run"
    # no checkpoint before step 100000: the one found afterwards is written because of the signal
    process = start("train_ldm.py", "--data-dir", data, "--out-dir", run, *TINY, "--vae-steps", "100000",
                    "--checkpoint-every", "100000", "--sample-every", "1", "--num-workers", "2" if group else "0",
                    new_session=group)
    wait_for(lambda: (run / "previews").is_dir() and any((run / "previews").iterdir()), process)  # in the loop
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    match = re.search(r"autoencoder: stopped by SIGTERM at step (\d+); checkpoint written", stderr)
    assert match and f"train_ldm.py --out-dir {run} --stage all --resume" in stderr, stderr
    assert "Traceback" not in stderr
    step = int(match[1])
    assert load_checkpoint(run / "state_vae.pt", "mgcc-ldm-vae-state")["step"] == step
    assert json.loads((run / "ldm.json").read_text())["vae_step"] == step
    # the state is whole: the run continues from it (for one more step of each stage here)
    run_script("train_ldm.py", "--out-dir", run, "--resume", "--vae-steps", step + 1, "--diffusion-steps", "1",
               "--no-progress")
    assert load_checkpoint(run / "state_vae.pt")["step"] == step + 1
    assert load_checkpoint(run / "state_diffusion.pt")["step"] == 1


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(data: Path, straight: Path, tmp_path: Path):
    run = tmp_path / "killed"
    process = start("train_ldm.py", "--data-dir", data, "--out-dir", run, *TINY, *RUN)
    wait_for(lambda: (run / "state_vae.pt").exists(), process)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    info = json.loads((run / "ldm.json").read_text())
    assert info["diffusion_step"] < 4, "the run finished before the kill landed"
    assert load_checkpoint(run / "state_vae.pt")["step"] in (2, 4)  # a whole, readable checkpoint
    run_script("train_ldm.py", "--out-dir", run, "--resume", "--no-progress")
    for name in NETWORKS:
        a = load_file(straight / name / "diffusion_pytorch_model.safetensors")
        b = load_file(run / name / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (torch.load(r / "state_vae.pt", weights_only=True)["disc"] for r in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_saving_a_network_keeps_its_previous_files(tmp_path: Path):
    class Network:
        def __init__(self, weights: bytes):
            self.weights = weights

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "config.json").write_text("{}")
            (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(self.weights)
            if self.weights == b"new":
                raise OSError("disk full")

    folder = tmp_path / "unet"
    save_model(Network(b"old"), folder)
    with pytest.raises(OSError, match="disk full"):
        save_model(Network(b"new"), folder)
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # no temporary folder left behind


@pytest.mark.slow
def test_a_corrupt_training_image_is_one_error_before_training(tmp_path: Path):
    data = write_dataset(tmp_path / "toy", n=9)
    victim = data / "images" / "malignant (2).png"  # a training image
    raw = bytearray(victim.read_bytes())
    raw[60:] = bytes(len(raw) - 60)  # the header survives, the pixel data is zeros (CRC errors)
    victim.write_bytes(raw)
    result = run_script("train_ldm.py", "--data-dir", data, "--out-dir", tmp_path / "run", *TINY, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # one error naming the file (libpng may print its own diagnosis on a line before it)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: unreadable images (1):"], result.stderr
    assert f"cannot read {victim}: not a readable image" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_status_3_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path):
    """A discriminator weight beyond float32 turns the loss infinite once the discriminator starts
    (step 3): the run must stop there, name the step, and keep the checkpoint of step 2."""
    run = tmp_path / "run"
    result = run_script("train_ldm.py", "--data-dir", data, "--out-dir", run, *TINY, "--vae-steps", "6",
                        "--checkpoint-every", "2", "--log-every", "1", "--disc-weight", "1e39", "--disc-start", "2",
                        check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"^error: non-finite autoencoder loss at step 3 .*its last checkpoint .*state_vae.pt is "
                     r"untouched", result.stderr), result.stderr
    saved = load_checkpoint(run / "state_vae.pt", "mgcc-ldm-vae-state")
    assert saved["step"] == 2 and json.loads((run / "ldm.json").read_text())["vae_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


@pytest.mark.slow
def test_unusable_state_files_for_resume_say_what_was_expected(straight: Path, tmp_path: Path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(straight, truncated)
    state = truncated / "state_diffusion.pt"
    state.write_bytes(state.read_bytes()[:1000])
    fails(capsys, train_ldm.main, ["--out-dir", truncated, "--resume", "--diffusion-steps", "6", "--no-progress"],
          f"cannot read checkpoint {state}", "truncated", "expected the denoiser training state that train_ldm.py "
          "writes there (kind 'mgcc-ldm-diffusion-state')", "--overwrite")

    foreign = tmp_path / "foreign"
    shutil.copytree(straight, foreign)
    atomic_save({"kind": "mgcc-segmenter", "model": {}}, foreign / "state_vae.pt")
    fails(capsys, train_ldm.main, ["--out-dir", foreign, "--resume", "--no-progress"],
          "is not a mgcc-ldm-vae-state checkpoint (found kind='mgcc-segmenter')",
          "expected the autoencoder training state")

    segmenter_run = tmp_path / "segmenter_run"
    segmenter_run.mkdir()
    atomic_save({"kind": "mgcc-segmenter", "model": {}}, segmenter_run / "checkpoint_last.pt")
    fails(capsys, train_ldm.main, ["--out-dir", segmenter_run, "--resume", "--no-progress"],
          "not a train_ldm.py run folder (no ldm.json)", "a segmenter run of train.py?")


# ----------------------------------------------------------------------------------------------
# sample_ldm.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_unusable_models_for_sampling_say_what_was_expected(straight: Path, tmp_path: Path, capsys):
    def broken(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(straight, run)
        return run

    def sample_fails(run: Path, *expected: str) -> None:
        fails(capsys, sample_ldm.main, ["--checkpoint", run, "--out-dir", tmp_path / "out", "--device", "cpu"],
              *expected)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()

    run = broken("truncated_unet")
    weights = run / "unet_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    sample_fails(run, f"cannot read {weights}", "truncated", "expected the EMA denoiser that train_ldm.py saves")

    run = broken("foreign_vae")  # the denoiser's weights where the autoencoder's belong
    shutil.copy(run / "unet_ema" / "diffusion_pytorch_model.safetensors", run / "vae")
    sample_fails(run, "does not fit the network of", "another architecture or width", "expected the autoencoder")

    run = broken("truncated_info")
    (run / "ldm.json").write_text((run / "ldm.json").read_text()[:100])
    sample_fails(run, "cannot read", "ldm.json", "expected the JSON run description that train_ldm.py writes")

    checkpoint = tmp_path / "truncated.pt"
    atomic_save({"kind": "mgcc-segmenter", "model": {}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:50])
    sample_fails(checkpoint, "is a file, not a latent diffusion model", "expected the run folder written by "
                 "train_ldm.py")


@pytest.mark.slow
def test_kill_9_sigint_or_group_sigterm_while_sampling_leaves_no_output_folder(straight: Path, tmp_path: Path):
    out = tmp_path / "synth"
    partial = tmp_path / ".synth.partial"
    many = ("--checkpoint", straight, "--out-dir", out, "--num-images", "1000", "--batch-size", "1", "--steps", "2",
            "--device", "cpu", "--no-progress", "--no-check-memorisation")

    def sampling_started(process):
        wait_for(lambda: (partial / "images").is_dir() and any((partial / "images").iterdir()), process)

    process = start("sample_ldm.py", *many)
    sampling_started(process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert f"stopped by SIGINT: nothing was written to {out}" in stderr
    assert not out.exists() and not partial.exists()

    process = start("sample_ldm.py", *many, new_session=True)  # SIGTERM to its whole group: the same
    sampling_started(process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert not out.exists() and not partial.exists()

    process = start("sample_ldm.py", *many)
    sampling_started(process)
    process.kill()
    process.wait()
    assert not out.exists() and partial.is_dir()  # only the hidden work folder, which the next run clears

    run_script("sample_ldm.py", *many[:4], "--num-images", "3", "--steps", "2", "--device", "cpu", "--no-progress")
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"synth_{n:04d}.png" for n in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
