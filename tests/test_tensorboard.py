"""TensorBoard logs: what a run writes to <run>/tensorboard, rank 0 only, resume appends without repeats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from utils.tensorboard import LOG_DIR, TensorBoardLog, read_events


def test_scalars_images_and_resume_purge(tmp_path):
    log = TensorBoardLog(tmp_path / LOG_DIR)
    for step in range(10):
        log.scalars(step, {"loss": float(step), "skipped": None}, prefix="train")
    log.image("overlay", 4, np.zeros((8, 10, 3), np.uint8))
    log.image("grid", 4, np.zeros((6, 5), np.uint8))
    log.close()
    # resumed from a checkpoint at step 5: the first run's steps 6..9 (after that checkpoint) are dropped
    log = TensorBoardLog(tmp_path / LOG_DIR, resume_step=5)
    for step in range(6, 8):
        log.scalars(step, {"loss": 100.0 + step}, prefix="train")
    log.close()
    events = read_events(tmp_path / LOG_DIR)
    assert events["train/loss"] == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 8)]
    assert "train/skipped" not in events
    assert events["overlay"] == [(4, (8, 10))] and events["grid"] == [(4, (6, 5))]


def test_disabled_or_not_rank_zero_writes_nothing(tmp_path):
    for log in (TensorBoardLog(tmp_path / LOG_DIR, enabled=False), TensorBoardLog(tmp_path / LOG_DIR, writer=False),
                TensorBoardLog(None)):
        assert not log
        log.scalars(1, {"loss": 1.0})
        log.image("x", 1, np.zeros((4, 4), np.uint8))
        log.close()
    assert not (tmp_path / LOG_DIR).exists()


@pytest.mark.slow
def test_train_py_logs_to_tensorboard_and_a_resumed_run_appends(tmp_path, dataset):
    import shutil

    import train
    from dataloaders.io import read_id_list

    listed = tmp_path / "labeled.txt"
    listed.write_text("\n".join(read_id_list(dataset / "toy_train1.txt")[2:6]) + "\n")
    out = tmp_path / "run"
    args = ["--data-dir", str(dataset), "--out-dir", str(out), "--width", "4", "--image-size", "32", "--batch-size", "4",
            "--labeled-batch-size", "2", "--iterations", "4", "--eval-every", "2", "--log-every", "1",
            "--num-workers", "0", "--no-progress", "--labeled-list", str(listed)]
    assert train.main(args + ["--stop-after", "2"]) == 0
    shutil.copy(out / "checkpoint_last.pt", tmp_path / "at2.pt")
    assert train.main(["--out-dir", str(out), "--resume", "--no-progress"]) == 0
    # as if that run had died after iteration 4 before its checkpoint: resumed at 2 again, 3 and 4 logged again
    shutil.copy(tmp_path / "at2.pt", out / "checkpoint_last.pt")
    assert train.main(["--out-dir", str(out), "--resume", "--no-progress"]) == 0
    events = read_events(out / LOG_DIR)
    for tag in ("train/loss", "train/sup", "train/cons", "train/lr", "train/lambda"):
        assert [step for step, _ in events[tag]] == [1, 2, 3, 4], tag  # each iteration once
    assert [step for step, _ in events["val/iou"]] == [2, 4]
    assert [step for step, _ in events["val/overlays"]] == [2, 4]
    assert events["val/overlays"][0][1] == (2 + 34 * 1, 2 + 34 * 4)  # 4 images of 32 x 32 in a row, padded
    assert {"final_val/hd95", "final_val/asd", "final_val/nsd"} <= set(events)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["labeled"] == 4 and summary["labeled_list"] == str(listed)
    assert (out / "curves.png").is_file()  # the PNGs stay

    # --no-tensorboard: no log folder; --overwrite clears the earlier run's
    assert train.main(args + ["--overwrite", "--no-tensorboard", "--iterations", "2"]) == 0
    assert not (out / LOG_DIR).exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2
def test_train_ldm_logs_each_stage_to_its_own_tensorboard_run(tmp_path):
    import train_ldm
    from conftest import ROOT, write_dataset

    data = write_dataset(tmp_path / "toy", n=8, size=(40, 48))
    run = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--data-dir", str(data), "--out-dir", str(run),
              "--device", "cpu", "--sample-every", "2", "--log-every", "1", "--checkpoint-every", "2",
              "--num-workers", "0", "--no-progress"]
    assert train_ldm.main(common + ["--stage", "vae", "--vae-steps", "2"]) == 0
    assert train_ldm.main(common + ["--stage", "vae", "--vae-steps", "4", "--resume"]) == 0
    assert train_ldm.main(common + ["--stage", "diffusion", "--vae-steps", "4", "--diffusion-steps", "2"]) == 0
    vae, diffusion = read_events(run / LOG_DIR / "vae"), read_events(run / LOG_DIR / "diffusion")
    assert [step for step, _ in vae["autoencoder/loss"]] == [1, 2, 3, 4]  # the resumed run appended
    assert [step for step, _ in vae["autoencoder/lr"]] == [1, 2, 3, 4]
    assert [step for step, _ in vae["autoencoder/reconstructions"]] == [2, 4]
    assert [step for step, _ in vae["autoencoder_val/psnr"]] == [2, 4] and "autoencoder_val/ssim" in vae
    assert [step for step, _ in diffusion["denoiser/loss"]] == [1, 2]
    assert [step for step, _ in diffusion["denoiser/samples"]] == [2]
    assert sorted(p.name for p in (run / "previews").iterdir())[-1] == "vae_step0000004.png"  # the PNGs stay
