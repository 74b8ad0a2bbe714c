"""A checkpoint is data, never code: a crafted .pth whose pickle would run a command is refused by
every script that reads checkpoints, with one error naming the file, and its command never runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import LDM_TINY_VAE, run_script, write_dataset


class LeavesAMark:
    """Unpickling this calls os.system: it would create the file ``mark``."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch '{self.mark}'",)


def crafted_checkpoint(path: Path, mark: Path, kind: str) -> Path:
    """A file that looks like the project's checkpoints (its kind, a state dict) plus the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": kind, "model": {"w": torch.zeros(2)}, "payload": LeavesAMark(mark)}, path)
    return path


def assert_refused(result, path: Path, mark: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"refused to load {path}" in result.stderr and "posix.system" in result.stderr, result.stderr
    assert not mark.exists(), "the checkpoint's payload ran"


def test_the_payload_runs_under_full_unpickling(tmp_path):
    """The crafted file is a real attack: loaded the unsafe way, it leaves its mark."""
    mark = tmp_path / "mark"
    path = crafted_checkpoint(tmp_path / "evil.pth", mark, "mgcc-segmenter")
    torch.load(path, weights_only=False)
    assert mark.exists()


@pytest.mark.slow
def test_predict_refuses_a_crafted_checkpoint(tmp_path):
    mark = tmp_path / "mark"
    path = crafted_checkpoint(tmp_path / "evil.pth", mark, "mgcc-segmenter")
    data = write_dataset(tmp_path / "toy", n=2, splits=False)
    result = run_script("predict.py", "--checkpoint", path, "--input-dir", data / "images",
                        "--output-dir", tmp_path / "out", "--num-workers", "0", check=False)
    assert_refused(result, path, mark)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_resume_refuses_a_crafted_checkpoint(tmp_path):
    mark = tmp_path / "mark"
    path = crafted_checkpoint(tmp_path / "run" / "checkpoint_last.pt", mark, "mgcc-segmenter")
    result = run_script("train.py", "--out-dir", tmp_path / "run", "--resume", "--no-progress", check=False)
    assert_refused(result, path, mark)


@pytest.mark.slow
def test_train_ldm_resume_refuses_a_crafted_state_file(tmp_path):
    data = write_dataset(tmp_path / "toy", n=6, size=(32, 32))
    run = tmp_path / "ldm"
    tiny = LDM_TINY_VAE
    run_script("train_ldm.py", "--data-dir", data, "--out-dir", run, *tiny, "--vae-steps", "1")
    mark = tmp_path / "mark"
    path = crafted_checkpoint(run / "state_vae.pt", mark, "mgcc-ldm-vae-state")
    result = run_script("train_ldm.py", "--data-dir", data, "--out-dir", run, *tiny, "--vae-steps", "2",
                        "--resume", check=False)
    assert_refused(result, path, mark)


@pytest.mark.slow
def test_sample_ldm_refuses_a_crafted_checkpoint(tmp_path):
    mark = tmp_path / "mark"
    path = crafted_checkpoint(tmp_path / "evil.pth", mark, "mgcc-ldm")
    result = run_script("sample_ldm.py", "--checkpoint", path, "--out-dir", tmp_path / "samples", check=False)
    assert_refused(result, path, mark)
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("saved", [
    {"model": {"w": torch.ones(3)}, "history": [{"iou": 0.5}], "rng": [torch.get_rng_state()], "config": {"a": [1]}},
    torch.nn.Linear(2, 2).state_dict(),  # an OrderedDict, as official checkpoints are
])
def test_tensors_and_plain_values_still_load(tmp_path, saved):
    from utils.checkpoint import atomic_save, load_checkpoint

    atomic_save(saved, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.keys() == saved.keys()
