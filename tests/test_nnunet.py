"""nnU-Net v2 raw datasets: convert_nnunet.py writes the project's layout, bad folders are one clear error."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import split
from conftest import run_script, write_dataset
from dataloaders.io import DataError, find_cases, read_mask
from dataloaders.nnunet import convert
from dataloaders.splits import load_run_data


def write_nnunet(root: Path, n: int = 9) -> Path:
    """Dataset501_Toy: the conftest phantom as nnU-Net stores it, label 1 the lesion, label 2 a band of other
    tissue along the top, two test images."""
    source = write_dataset(root / "source", n=n, splits=False)
    dataset = root / "Dataset501_Toy"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / folder).mkdir(parents=True)
    for k, image_path in enumerate(sorted((source / "images").iterdir())):
        case = f"toy_{k:03d}"
        mask = cv2.imread(str(source / "masks" / "0" / image_path.name), cv2.IMREAD_GRAYSCALE)
        label = (mask > 127).astype(np.uint8)
        label[:3][label[:3] == 0] = 2
        (dataset / "imagesTr" / f"{case}_0000.png").write_bytes(image_path.read_bytes())
        cv2.imwrite(str(dataset / "labelsTr" / f"{case}.png"), label)
        if k < 2:
            (dataset / "imagesTs" / f"test_{k:03d}_0000.png").write_bytes(image_path.read_bytes())
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "US"}, "labels": {"background": 0, "lesion": 1, "band": 2},
        "numTraining": n, "file_ending": ".png"}))
    return dataset


@pytest.mark.slow
def test_converted_dataset_is_read_like_any_other(tmp_path):
    nnunet = write_nnunet(tmp_path)
    out = tmp_path / "toy"
    run_script("convert_nnunet.py", "--nnunet-dir", nnunet, "--out-dir", out)
    cases = find_cases(out)
    assert sorted(cases) == [f"toy_{k:03d}" for k in range(9)]
    for case, (image, mask) in cases.items():
        assert image.is_symlink() and image.read_bytes() == (nnunet / "imagesTr" / f"{case}_0000.png").read_bytes()
        label = cv2.imread(str(nnunet / "labelsTr" / f"{case}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(read_mask(mask), label == 1)  # label 2 (the band) is background
        assert set(np.unique(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))) <= {0, 255}
    assert sorted(p.name for p in (out / "test" / "images").iterdir()) == ["test_000.png", "test_001.png"]
    assert split.main(["--data-dir", str(out), "--labeled", "2"]) == 0
    run = load_run_data(out, 1, labeled_list=out / "toy_train1_labeled2.txt")
    assert len(run.labeled) == 2 and len(run.labeled) + len(run.unlabeled) == len(split.make_splits(list(cases))[0][0])

    # another foreground label, by name, and copies instead of links
    band = tmp_path / "band"
    summary = convert(nnunet, band, foreground="band", copy=True)
    assert summary["foreground"] == 2 and summary["images"] == "copied"
    image, mask = find_cases(band)["toy_000"]
    assert not image.is_symlink() and read_mask(mask)[:3].any() and not read_mask(mask)[3:].any()


@pytest.mark.slow
def test_a_case_without_a_label_is_one_clear_error(tmp_path):
    nnunet = write_nnunet(tmp_path)
    (nnunet / "labelsTr" / "toy_004.png").unlink()
    out = tmp_path / "toy"
    result = run_script("convert_nnunet.py", "--nnunet-dir", nnunet, "--out-dir", out, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not consistent" in errors[0]
    assert "cases without a label in" in result.stderr and str(nnunet / "imagesTr" / "toy_004_0000.png") in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".toy.*"))  # nothing written, no staging left


def _second_channel(d: Path):
    (d / "imagesTr" / "toy_000_0001.png").write_bytes((d / "imagesTr" / "toy_000_0000.png").read_bytes())


def _wrong_size(d: Path):
    cv2.imwrite(str(d / "labelsTr" / "toy_001.png"), np.zeros((5, 7), np.uint8))


def _undeclared_value(d: Path):
    label = cv2.imread(str(d / "labelsTr" / "toy_002.png"), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 7
    cv2.imwrite(str(d / "labelsTr" / "toy_002.png"), label)


def _json(**changes):
    def change(d: Path):
        meta = json.loads((d / "dataset.json").read_text())
        meta.update(changes)
        (d / "dataset.json").write_text(json.dumps(meta))
    return change


@pytest.mark.parametrize("change, message", [
    (_second_channel, "toy_000_0001.png: channel 0001, but dataset.json declares one channel"),
    (_wrong_size, "toy_001.png: label is 7x5 but its image toy_001_0000.png is 80x64"),
    (_undeclared_value, "toy_002.png: values [7] are not in dataset.json's labels"),
    (_json(numTraining=10), "numTraining is 10 but"),
    (_json(channel_names={"0": "US", "1": "doppler"}), "2 channels"),
    (_json(file_ending=".nii.gz"), "file_ending '.nii.gz' is not a 2-D image format"),
    (lambda d: (d / "dataset.json").unlink(), "is not an nnU-Net v2 raw dataset"),
    (lambda d: (d / "imagesTr" / "toy_003_0000.png").unlink(), "labels without an image (<case>_0000.png) in"),
    (_json(labels={"background": 0, "lesion": [1, 2]}), "region-based labels"),
])
def test_bad_nnunet_folders(tmp_path, change, message):
    nnunet = write_nnunet(tmp_path, n=4)
    change(nnunet)
    with pytest.raises(DataError, match=re.escape(message)):
        convert(nnunet, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreground_label_must_be_declared(tmp_path):
    nnunet = write_nnunet(tmp_path, n=3)
    for label in ("3", "0", "tumour"):
        with pytest.raises(DataError, match="foreground label|no label named"):
            convert(nnunet, tmp_path / "out", foreground=label)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists"):
        convert(nnunet, tmp_path / "taken")
