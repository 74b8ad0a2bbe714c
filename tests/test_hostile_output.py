"""Outputs that must not destroy anything (issue 19): predict.py never writes into its inputs or through
links, every write is checked (a full disk is one error, never empty files), and weights or checkpoints
that cannot be trusted are refused where they are loaded."""
from __future__ import annotations

import errno
import os

import cv2
import pytest
import torch

import predict
from conftest import write_dataset
from networks.mgcc import MGCCNet
from utils.checkpoint import CheckpointError, atomic_save
from utils.files import WriteError

MODEL_ARGS = {"in_channels": 3, "width": 4, "mixer_depth": 1, "mixer_kernel": 3}


def segmenter_checkpoint(path, poison=False, **override):
    """A checkpoint as train.py writes it (the fields predict.py reads), of an untrained width-4 network."""
    torch.manual_seed(0)
    state = MGCCNet(**MODEL_ARGS).state_dict()
    if poison:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    checkpoint = {"kind": predict.SEGMENTER_KIND, "model": state, "model_args": MODEL_ARGS, "iteration": 1,
                  "config": {"image_size": 32, "in_channels": 3, "normalization": "official", "mode": "mgcc"}}
    checkpoint.update(override)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def case(tmp_path):
    """(data folder, checkpoint) with the ground truth in data/gt/masks as in the issue's command."""
    data = write_dataset(tmp_path / "pe", n=3, splits=False)
    (data / "gt").mkdir()
    (data / "masks" / "0").rename(data / "gt" / "masks")
    return data, segmenter_checkpoint(tmp_path / "model.pt")


def run_predict(data, checkpoint, out, *extra):
    return predict.main(["--checkpoint", str(checkpoint), "--input-dir", str(data), "--masks-dir",
                         str(data / "gt" / "masks"), "--output-dir", str(out), "--num-workers", "0", "--no-progress",
                         *map(str, extra)])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- 1. outputs never overwrite inputs ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("out", ["gt", "images", "images/..", "gt/masks"])
def test_an_output_folder_holding_or_being_an_input_folder_is_refused(case, out):
    data, checkpoint = case
    truth, images = snapshot(data / "gt" / "masks"), snapshot(data / "images")
    with pytest.raises(predict.DataError, match="the predictions would replace inputs"):
        run_predict(data, checkpoint, data / out)  # was: the ground truth replaced, IoU 1.0, exit 0
    assert snapshot(data / "gt" / "masks") == truth and snapshot(data / "images") == images


@pytest.mark.slow
def test_a_masks_folder_linked_to_an_input_folder_is_refused(case, tmp_path):
    data, checkpoint = case
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").symlink_to(data / "gt" / "masks")
    truth = snapshot(data / "gt" / "masks")
    with pytest.raises(predict.DataError, match="is a link to .*outputs are never written through links"):
        run_predict(data, checkpoint, out)
    assert snapshot(data / "gt" / "masks") == truth


@pytest.mark.slow
def test_a_link_at_an_output_name_is_replaced_never_written_through(case, tmp_path):
    data, checkpoint = case
    elsewhere = tmp_path / "precious.png"
    elsewhere.write_bytes(b"not to be overwritten")
    (tmp_path / "out" / "masks").mkdir(parents=True)
    (tmp_path / "out" / "masks" / "benign (1).png").symlink_to(elsewhere)
    assert run_predict(data, checkpoint, tmp_path / "out") == 0
    assert elsewhere.read_bytes() == b"not to be overwritten"
    written = tmp_path / "out" / "masks" / "benign (1).png"
    assert not written.is_symlink() and cv2.imread(str(written), cv2.IMREAD_UNCHANGED).shape == (64, 80)


# --- 2. a full disk is one error, never empty files -----------------------------------------------------

def fill_the_disk_after(monkeypatch, writes: int):
    """Simulate a disk that fills up after ``writes`` files: the next fsync fails with ENOSPC, and OpenCV's
    imwrite (the old way of writing masks) leaves an empty file and reports success, as it did in the issue."""
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def imwrite(path, image, *args):
        open(path, "wb").close()
        return True

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(cv2, "imwrite", imwrite)


@pytest.mark.slow
def test_predict_on_a_full_disk_names_the_file_and_leaves_no_empty_mask(case, tmp_path, monkeypatch):
    data, checkpoint = case
    fill_the_disk_after(monkeypatch, writes=2)
    with pytest.raises(WriteError, match=r"could not write .*out/\w+/[\w ()]+\.png: no space left on the device.*"
                                         r"nothing was written to .*out; its previous contents, if any, are untouched"):
        run_predict(data, checkpoint, tmp_path / "out")
    # the folder is replaced as a whole (issue 33): nothing of the unfinished one stays, no empty mask either
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_checkpoint_on_a_full_disk_is_one_error_and_the_previous_one_stays(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    atomic_save({"iteration": 1}, path)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # what torch.save does when the disk fills up mid-file
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed; unexpected pos 64 vs 12")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteError, match=rf"could not write {path}: the file stopped part-way \(torch.save could not "
                                         r"write all of it\) \(is the disk full or read-only\?\); the previous "
                                         "checkpoint_last.pt, if there was one, is untouched") as error:
        atomic_save({"iteration": 2}, path)
    assert "unexpected pos" not in str(error.value) and "enforce" not in str(error.value)  # issue 33
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["iteration"] == 1 and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.slow
def test_an_output_folder_that_is_a_file_is_one_error(case, tmp_path):
    data, checkpoint = case
    (tmp_path / "out").write_text("a file")
    with pytest.raises(WriteError, match=r"--output-dir .*out is a file, not a folder"):
        run_predict(data, checkpoint, tmp_path / "out")


# --- 6. non-finite and crafted checkpoints are refused where they are loaded ---------------------------

@pytest.mark.slow
def test_predict_refuses_an_all_nan_checkpoint(case, tmp_path):
    data, _ = case
    checkpoint = segmenter_checkpoint(tmp_path / "nan.pt", poison=True)
    with pytest.raises(CheckpointError, match="nan.pt: its weights hold NaN or infinite values in"):
        run_predict(data, checkpoint, tmp_path / "out")  # was: exit 0, empty masks, precision 1.0
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ({"model": [1, 2]}, "model is a list, expected a dict"),
    ({"config": ["image_size"]}, "config is a list, expected a dict"),
    ({"iteration": "1"}, "iteration is a str, expected a int"),
    ({"config": {"mode": "mgcc"}}, "its config lacks image_size, in_channels, normalization"),
    ({"model_args": {"width": 4, "depth": 2}}, "its model_args .* do not describe the network"),
])
def test_predict_refuses_crafted_checkpoints(case, tmp_path, override, message):
    data, _ = case
    checkpoint = segmenter_checkpoint(tmp_path / "crafted.pt", **override)
    with pytest.raises(CheckpointError, match=message):
        run_predict(data, checkpoint, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--num-workers", "-1"), ("--threshold", "2")])
def test_predict_checks_its_flags(case, tmp_path, capsys, flag, value):
    data, checkpoint = case
    with pytest.raises(SystemExit) as exit_:
        run_predict(data, checkpoint, tmp_path / "out", flag, value)
    assert exit_.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_a_nan_denoiser_is_refused_where_it_is_loaded(tmp_path):
    """sample_ldm.py loads its networks through load_model: a NaN denoiser sampled black images, exit 0."""
    from diffusers import UNet2DModel

    from generation.run import load_model, save_model

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 4), layers_per_block=1,
                       norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    save_model(unet, tmp_path / "unet_ema")
    assert load_model("unet", tmp_path / "unet_ema", "EMA denoiser") is not None
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    save_model(unet, tmp_path / "unet_ema")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: its EMA denoiser weights hold "
                                              r"NaN or infinite values in 1 tensor\(s\)"):
        load_model("unet", tmp_path / "unet_ema", "EMA denoiser")
