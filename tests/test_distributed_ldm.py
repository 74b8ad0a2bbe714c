"""torchrun with 2 CPU processes (gloo) for stage 1: train_ldm.py learns what one process learns,
resumes across process counts, and sample_ldm.py writes what one process writes, byte for byte."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, write_dataset
from generation.data import StepBatchSampler, TrainingImages, load_training_set
from networks.ldm import latent_scaling_factor
from test_distributed import torchrun
from train_ldm import encode_training_set
from generation.run import load_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

# ldm_tiny at 32x32 (latents 4x8x8): a few steps of both stages, the discriminator from step 2
# (two synchronised discriminator steps), the losses of every step recorded
TRAIN = ("--config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--image-size", "32", "--vae-steps", "3",
         "--diffusion-steps", "2", "--disc-weight", "0.1", "--disc-start", "1", "--log-every", "1",
         "--sample-every", "0", "--preview-images", "2", "--device", "cpu", "--no-progress")


def losses(run: Path, stage: str) -> list[dict]:
    with (run / f"losses_{stage}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def state(run: Path, stage: str) -> dict:
    return torch.load(run / f"state_{stage}.pt", weights_only=True)


def test_ranks_slice_each_global_batch_without_overlap():
    whole = StepBatchSampler(7, 4, seed=3, start_step=2, end_step=9)
    ranks = [StepBatchSampler(7, 4, seed=3, start_step=2, end_step=9, rank=r, world_size=2) for r in range(2)]
    for batch, a, b in zip(whole, *ranks):
        assert len(a) == len(b) == 2 and sorted(a + b) == sorted(batch)
        assert a == batch[0::2] and b == batch[1::2]  # the same slices the denoiser's random numbers get
    with pytest.raises(ValueError, match="split evenly"):
        StepBatchSampler(7, 3, seed=3, start_step=0, end_step=1, rank=0, world_size=2)


@pytest.mark.slow
def test_two_process_training_resumes_across_process_counts_and_samples_in_one(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun's processes: two threads on two busy cores crawl
    data = write_dataset(tmp_path / "toy", n=12, size=(64, 80))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script("train_ldm.py", "--data-dir", data, "--out-dir", single, *TRAIN)
    result = torchrun("train_ldm.py", "--data-dir", data, "--out-dir", ddp, *TRAIN)
    assert "on cpu x 2 processes" in result.stdout and result.stdout.count("done:") == 1  # rank 0 alone reports

    # each rank took its own half of every global batch, with that half's random numbers, and the
    # gradients were averaged: the losses are those of one process (up to float rounding)
    for stage in ("vae", "diffusion"):
        one, two = losses(single, stage), losses(ddp, stage)
        assert [r["step"] for r in one] == [r["step"] for r in two] == (["1", "2", "3"] if stage == "vae" else ["1", "2"])
        for a, b in zip(one, two):
            for key in a:
                assert (a[key] == b[key] == "") or float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (stage, key)
    assert float(losses(ddp, "vae")[-1]["discriminator"]) > 0  # the discriminator trained under DDP too

    # the scaling factor is that of one process encoding the training set with the run's autoencoder
    info = json.loads((ddp / "ldm.json").read_text())
    vae = load_model("vae", ddp / "vae", "autoencoder").eval()
    training = load_training_set(data, 1, ["benign", "malignant"])
    means, _ = encode_training_set(vae, TrainingImages(training.paths, training.labels, 32), torch.device("cpu"),
                                   batch_size=8, progress=False)
    assert info["latent_scaling_factor"] == latent_scaling_factor(means)

    # plain weights, one RNG state per rank
    for stage in ("vae", "diffusion"):
        saved = state(ddp, stage)
        assert len(saved["rng"]) == 2 and not any(k.startswith("module.") for k in saved["model"])

    # torchrun continues a single-process run, and one process continues a torchrun run
    torchrun("train_ldm.py", "--out-dir", single, "--resume", "--diffusion-steps", "3", "--no-progress")
    run_script("train_ldm.py", "--out-dir", ddp, "--resume", "--diffusion-steps", "3", "--no-progress")
    for run, ranks in ((single, 2), (ddp, 1)):
        saved = state(run, "diffusion")
        assert saved["step"] == 3 and len(saved["rng"]) == ranks and saved["ema"]["optimization_step"] == 3
        assert [r["step"] for r in losses(run, "diffusion")] == ["1", "2", "3"]

    # 2-process sampling of the torchrun-trained run: exactly the asked images, once each, one
    # manifest, and the very bytes one process writes
    sample = ("--checkpoint", ddp, "--num-images", "5", "--batch-size", "2", "--steps", "3", "--device", "cpu",
              "--no-progress")
    run_script("sample_ldm.py", *sample, "--out-dir", tmp_path / "one")
    result = torchrun("sample_ldm.py", *sample, "--out-dir", tmp_path / "two")
    assert result.stdout.count("wrote 5 images") == 1
    files = {folder: sorted(p.relative_to(tmp_path / folder) for p in (tmp_path / folder).rglob("*") if p.is_file())
             for folder in ("one", "two")}
    assert files["one"] == files["two"] == sorted(
        [Path("closest_pairs.png"), Path("grid.png"), Path("manifest.csv"), Path("memorisation.txt"),
         Path("report.json")]
        + [Path("images") / f"synth_{n:04d}.png" for n in range(5)])
    for name in files["one"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .partial folder left behind
