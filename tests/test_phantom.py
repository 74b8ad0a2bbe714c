"""The phantom ultrasound generator: reproducible, exact binary masks, dark lesions, readable layout, CLI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, run_script
from dataloaders import phantom
from dataloaders.io import check_pairs, find_cases, read_id_list
from dataloaders.phantom import make_phantom, make_phantom_dataset
from utils.config import ConfigError


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_phantom(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m dataloaders.phantom ...`` as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "dataloaders.phantom", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check and result.returncode != 0:
        raise AssertionError(f"exited {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}")
    return result


def ring_and_lesion_means(image: np.ndarray, mask: np.ndarray, width: int = 3) -> tuple[float, float]:
    ring = (cv2.dilate(mask, np.ones((2 * width + 1,) * 2, np.uint8)) > 0) & (mask == 0)
    return float(image[ring].mean()), float(image[mask > 0].mean())


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    make_phantom_dataset(tmp_path / "a", num_images=5, size=(48, 64), seed=3)
    make_phantom_dataset(tmp_path / "b", num_images=5, size=(48, 64), seed=3)
    make_phantom_dataset(tmp_path / "c", num_images=5, size=(48, 64), seed=4)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 5 + 5 + 2  # images, masks, preview.png, phantom.yaml
    images_a = sorted(v for n, v in a.items() if n.startswith("images"))
    images_c = sorted(v for n, v in c.items() if n.startswith("images"))
    assert not set(images_a) & set(images_c)  # no image of seed 3 is among those of seed 4
    # one image depends only on (seed, index, class, size): the same generator gives the same pair
    first = make_phantom(np.random.default_rng(9), (40, 56), malignant=True)
    second = make_phantom(np.random.default_rng(9), (40, 56), malignant=True)
    assert all(np.array_equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("sector", [False, True])
def test_masks_are_binary_and_lesions_darker_than_their_surroundings(tmp_path, sector):
    ids = make_phantom_dataset(tmp_path / "p", num_images=16, size=(64, 80), seed=11, sector=sector)
    differences, black_everywhere, masks = [], np.ones((64, 80), bool), []
    for case_id in ids:
        image = cv2.imread(str(tmp_path / "p/images" / f"{case_id}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "p/masks/0" / f"{case_id}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (64, 80) and image.dtype == mask.dtype == np.uint8  # 8-bit grey
        assert set(np.unique(mask)) == {0, 255}
        ring, lesion = ring_and_lesion_means(image, mask)
        assert lesion < ring, case_id
        differences.append(ring - lesion)
        black_everywhere &= image == 0
        masks.append(mask)
    assert np.mean(differences) > 20  # grey levels: clearly darker on average
    if sector:  # outside the fan (black in every image: the corners, ~20 % of the image), no lesion
        assert black_everywhere[0, 0] and black_everywhere[0, -1] and 0.1 < black_everywhere.mean() < 0.4
        assert all(not mask[black_everywhere].any() for mask in masks)
    else:
        assert not black_everywhere.any()
    # speckle inside the lesion too: it is not a flat region
    image = cv2.imread(str(tmp_path / "p/images" / f"{ids[0]}.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "p/masks/0" / f"{ids[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert image[mask > 0].std() > 3


def test_the_lesion_is_not_found_by_a_threshold():
    """Darker than its surroundings but not the only dark thing: fat, shadows and the chest wall
    are dark too, so even the best grey-level threshold per image segments it poorly."""
    dice = []
    for k in range(12):
        image, mask = make_phantom(np.random.default_rng(100 + k), (64, 64), malignant=k % 2 == 1)
        smooth, truth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5), mask > 0
        best = max(2 * ((smooth < t) & truth).sum() / ((smooth < t).sum() + truth.sum())
                   for t in range(0, 256, 4))
        dice.append(best)
    assert np.mean(dice) < 0.7


def test_layout_is_the_dataset_layout_train_reads(tmp_path):
    out = tmp_path / "phantom"
    ids = make_phantom_dataset(out, num_images=7, size=(40, 40), seed=0, malignant_fraction=0.3)
    cases = find_cases(out)
    assert sorted(cases) == sorted(ids)
    check_pairs([(i, *cases[i]) for i in ids], mask_values="binary")  # what train.py checks
    assert all(re.fullmatch(r"(benign|malignant) \(\d+\)", i) for i in ids)
    malignant = [i for i in ids if i.startswith("malignant")]
    benign = [i for i in ids if i.startswith("benign")]
    assert len(malignant) == 2  # round(7 * 0.3)
    assert malignant == [f"malignant ({n})" for n in (1, 2)] and benign == [f"benign ({n})" for n in range(1, 6)]
    assert make_phantom_dataset(tmp_path / "all_benign", num_images=3, size=(32, 32), malignant_fraction=0,
                                preview_count=0) == ["benign (1)", "benign (2)", "benign (3)"]
    assert not (tmp_path / "all_benign" / "preview.png").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 0}, "num_images"),
    ({"size": (16, 64)}, "at least 32x32"),
    ({"malignant_fraction": 1.5}, "malignant_fraction"),
])
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_phantom_dataset(tmp_path / "p", **kwargs)
    assert not (tmp_path / "p").exists()


def test_an_interrupted_run_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "phantom"
    make_phantom_dataset(out, num_images=3, size=(32, 32), seed=1)
    before = files_of(out)
    real = phantom.make_phantom
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 4):  # the second image of each run
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_phantom", failing)
    with pytest.raises(KeyboardInterrupt):
        make_phantom_dataset(out, num_images=4, size=(32, 32), seed=2, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        make_phantom_dataset(tmp_path / "new", num_images=4, size=(32, 32), seed=2)
    assert files_of(out) == before and not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["phantom"]  # no staging folder left behind


@pytest.mark.slow
def test_cli_end_to_end_then_split(tmp_path):
    out = tmp_path / "phantom"
    result = run_phantom("--out-dir", out, "--num-images", 10, "--height", 48, "--width", 64, "--seed", 1, "--sector")
    assert "wrote 10 phantom images (5 benign, 5 malignant) of 48x64 (sector)" in result.stdout
    assert sorted(os.listdir(out)) == ["images", "masks", "phantom.yaml", "preview.png"]
    preview = cv2.imread(str(out / "preview.png"))
    assert preview.shape == (2 * (48 + 2) + 2, 8 * (64 + 2) + 2, 3)  # 10 images, 8 a row
    assert (preview[..., 1] > preview[..., 2] + 100).any()  # the green mask outlines
    image = cv2.imread(str(out / "images/benign (1).png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 64)

    again = run_phantom("--out-dir", out, "--num-images", 4, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr and len(os.listdir(out / "images")) == 10

    run_script("split.py", "--data-dir", out, "--seeds", "41")
    # --overwrite replaces the whole dataset: no stale image from the larger run, no stale split file
    run_phantom("--out-dir", out, "--num-images", 4, "--height", 32, "--width", 32, "--overwrite",
                "--preview-count", 0)
    assert sorted(os.listdir(out / "images")) == ["benign (1).png", "benign (2).png",
                                                  "malignant (1).png", "malignant (2).png"]
    assert sorted(os.listdir(out)) == ["images", "masks", "phantom.yaml"]
    run_script("split.py", "--data-dir", out, "--seeds", "41", "--val-fraction", "0.5")
    assert len(read_id_list(out / "phantom_val1.txt")) == 2

    # the settings file is a config file of the script: the same data again, byte for byte
    copy = tmp_path / "copy"
    run_phantom("--config", out / "phantom.yaml", "--out-dir", copy)
    assert files_of(copy / "images") == files_of(out / "images")


@pytest.mark.slow
def test_cli_bad_value_is_an_error(tmp_path):
    result = run_phantom("--out-dir", tmp_path / "p", "--height", 8, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "8x128" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "p").exists()
    help_text = run_phantom("--help").stdout
    for flag in ("--out-dir", "--num-images", "--height", "--width", "--seed", "--malignant-fraction",
                 "--sector", "--preview-count", "--overwrite", "--config"):
        assert flag in help_text
