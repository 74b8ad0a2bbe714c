"""predict.py: masks at each image's size, metrics, and official checkpoints with official preprocessing."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from conftest import run_script, write_dataset
from networks.mgcc import MGCCNet
from networks.official import convert_official_state_dict
from reference_weights import official_reference_state_dict
import predict
import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = write_dataset(tmp / "toy", n=9)
    # one image of another size: predictions must come back at each image's own size
    image = cv2.imread(str(data / "images" / "benign (1).png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(data / "masks" / "0" / "benign (1).png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(data / "images" / "benign (1).png"), cv2.resize(image, (50, 30)))
    cv2.imwrite(str(data / "masks" / "0" / "benign (1).png"), cv2.resize(mask, (50, 30), interpolation=cv2.INTER_NEAREST))
    assert train.main(["--data-dir", str(data), "--out-dir", str(tmp / "run"), "--width", "4", "--image-size", "32",
                       "--batch-size", "4", "--labeled-batch-size", "2", "--iterations", "2", "--eval-every", "2",
                       "--num-workers", "0", "--no-progress"]) == 0
    return data, tmp / "run" / "checkpoint_best.pt"


@pytest.mark.slow
def test_masks_overlays_and_metrics(tmp_path, trained):
    data, checkpoint = trained
    out = tmp_path / "out"
    run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir", out,
               "--masks-dir", data / "masks" / "0", "--num-workers", "0")
    names = sorted(p.name for p in (data / "images").iterdir())
    assert sorted(p.name for p in (out / "masks").iterdir()) == names
    assert sorted(p.name for p in (out / "overlays").iterdir()) == names
    for name in names:
        image = cv2.imread(str(data / "images" / name), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(out / "masks" / name), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 255}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    summary = json.loads((out / "metrics.json").read_text())
    assert len(rows) == summary["images"] == 9
    assert summary["iou"] == pytest.approx(np.mean([float(r["iou"]) for r in rows]))


@pytest.mark.slow
def test_spacing_gives_surface_metrics_in_mm(tmp_path, trained):
    data, checkpoint = trained
    common = ["--checkpoint", str(checkpoint), "--input-dir", str(data), "--masks-dir", str(data / "masks" / "0"),
              "--num-workers", "0", "--no-overlays", "--no-progress"]
    ids = sorted(p.stem for p in (data / "images").iterdir())
    spacing_csv = tmp_path / "spacing.csv"
    spacing_csv.write_text("id,spacing_mm\n" + "".join(f"{i},0.5\n" for i in ids))
    assert predict.main(common + ["--output-dir", str(tmp_path / "px")]) == 0
    assert predict.main(common + ["--output-dir", str(tmp_path / "mm"), "--spacing-mm", "0.5"]) == 0
    assert predict.main(common + ["--output-dir", str(tmp_path / "csv"), "--spacing-csv", str(spacing_csv)]) == 0
    px, mm, from_csv = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("px", "mm", "csv"))
    assert px["distance_unit"] == "px" and mm["distance_unit"] == from_csv["distance_unit"] == "mm"
    assert set(px) >= {"hd95", "asd", "nsd"}
    # half a millimetre per pixel: distances halve; NSD's default tolerance (2 px = 1 mm) keeps its value
    for name, factor in (("hd95", 0.5), ("asd", 0.5), ("nsd", 1.0), ("iou", 1.0)):
        assert mm[name] == pytest.approx(factor * px[name], rel=1e-5) and from_csv[name] == pytest.approx(mm[name])
    header = next(csv.reader(open(tmp_path / "mm" / "metrics.csv")))
    assert header == ["id", "iou", "dice", "sensitivity", "precision", "f1", "accuracy", "hd95", "asd", "nsd"]

    spacing_csv.write_text("id,spacing_mm\n" + "".join(f"{i},0.5\n" for i in ids[1:]))  # one image left out
    result = run_script("predict.py", *common, "--output-dir", tmp_path / "bad", "--spacing-csv", spacing_csv,
                        check=False)
    assert result.returncode == 2 and f"no row for id '{ids[0]}'" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_official_checkpoint_gives_the_official_masks(tmp_path):
    """An official state_dict is detected and run with the official preprocessing (BGR, 256, ImageNet / 255)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in official_reference_state_dict().items()}
    checkpoint = tmp_path / "official.pth"
    torch.save(state, checkpoint)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    bgr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    cv2.imwrite(str(images / "case.png"), bgr)
    result = run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", images, "--output-dir",
                        tmp_path / "out", "--num-workers", "0", "--no-overlays")
    assert "official MGCC checkpoint" in result.stdout
    # the official pipeline by hand, from the reference README
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    x = ((bgr.astype(np.float64) - mean) / std / 255).transpose(2, 0, 1)[None]
    model = MGCCNet(in_channels=3, width=16).double().eval()
    model.load_state_dict(convert_official_state_dict(official_reference_state_dict()))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[0, 0].numpy()
    expected = (logits > 0).astype(np.uint8) * 255
    got = cv2.imread(str(tmp_path / "out" / "masks" / "case.png"), cv2.IMREAD_GRAYSCALE)
    decided = np.abs(logits) > 1e-4  # float32 vs float64 may only disagree right at the threshold
    assert np.array_equal(got[decided], expected[decided]) and decided.mean() > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("make,message", [
    (lambda p: torch.save({"kind": "mgcc-ldm"}, p), "not a segmenter checkpoint"),
    (lambda p: p.write_bytes(b"\x80\x02garbage"), "cannot read checkpoint"),
])
def test_foreign_or_broken_checkpoints(tmp_path, trained, make, message):
    data, _ = trained
    bad = tmp_path / "bad.pt"
    make(bad)
    result = run_script("predict.py", "--checkpoint", bad, "--input-dir", data, "--output-dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_an_ldm_run_folder_is_not_a_segmenter(tmp_path, trained):
    data, _ = trained
    (tmp_path / "ldm").mkdir()
    (tmp_path / "ldm" / "ldm.json").write_text("{}")
    result = run_script("predict.py", "--checkpoint", tmp_path / "ldm", "--input-dir", data, "--output-dir",
                        tmp_path / "o", check=False)
    assert result.returncode == 2 and "latent diffusion run folder (for sample_ldm.py)" in result.stderr


@pytest.mark.slow
def test_truncated_checkpoint(tmp_path, trained):
    data, checkpoint = trained
    bad = tmp_path / "cut.pt"
    bad.write_bytes(checkpoint.read_bytes()[:5000])
    result = run_script("predict.py", "--checkpoint", bad, "--input-dir", data, "--output-dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr


@pytest.mark.slow
def test_missing_ground_truth_is_named(tmp_path, trained):
    data, checkpoint = trained
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in list((data / "masks" / "0").iterdir())[1:]:
        (masks / p.name).write_bytes(p.read_bytes())
    result = run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir",
                        tmp_path / "o", "--masks-dir", masks, check=False)
    assert result.returncode == 2 and "no mask for" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ids_file_restricts_the_images(tmp_path, trained):
    data, checkpoint = trained
    run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir", tmp_path / "o",
               "--ids", data / "toy_val1.txt", "--masks-dir", data / "masks" / "0", "--num-workers", "0")
    val = (data / "toy_val1.txt").read_text().split("\n")
    assert sorted(p.stem for p in (tmp_path / "o" / "masks").iterdir()) == sorted(i for i in val if i)
    (tmp_path / "ids.txt").write_text("benign (1)\nnobody (0)\n")
    result = run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir", tmp_path / "p",
                        "--ids", tmp_path / "ids.txt", check=False)
    assert result.returncode == 2 and "nobody (0)" in result.stderr


@pytest.mark.slow
def test_trained_ids_give_the_metrics_on_the_clean_subset_too(tmp_path, trained):
    """Issue 30: a val image that is a (mirrored, re-encoded) copy of a training image is left out of the
    clean subset, and so is a val id listed as trained; the clean means are over the other val ids."""
    import shutil

    source, checkpoint = trained
    data = tmp_path / "toy"
    shutil.copytree(source, data)
    train_ids = [i for i in (data / "toy_train1.txt").read_text().splitlines() if i]
    val_ids = [i for i in (data / "toy_val1.txt").read_text().splitlines() if i]
    copied, original = val_ids[0], train_ids[1]
    for sub, ext in (("images", ".jpg"), ("masks/0", ".png")):  # the val image: a mirrored JPEG of a training one
        picture = cv2.imread(str(data / sub / f"{original}.png"), cv2.IMREAD_GRAYSCALE)[:, ::-1]
        (data / sub / f"{copied}.png").unlink()
        cv2.imwrite(str(data / sub / f"{copied}{ext}"), picture, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])
    (tmp_path / "more.txt").write_text(f"{val_ids[2]}\n")  # a val id the model is said to have trained on
    out = tmp_path / "out"
    result = run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir", out,
                        "--ids", data / "toy_val1.txt", "--masks-dir", data / "masks" / "0", "--num-workers", "0",
                        "--no-overlays", "--trained-ids", data / "toy_train1.txt", tmp_path / "more.txt")
    assert "clean subset: 1 of 3 images (2 with an exact or near-duplicate among the trained ids left out)" in result.stdout
    rows = {r["id"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert {i: r["near_duplicates_in_training"] for i, r in rows.items()} == {
        copied: original, val_ids[1]: "", val_ids[2]: val_ids[2]}
    summary = json.loads((out / "metrics.json").read_text())
    clean = summary["clean_subset"]
    assert (summary["images"], clean["images"], clean["dropped"]) == (3, 1, 2)
    assert clean["dropped_ids"] == {copied: [original], val_ids[2]: [val_ids[2]]}
    for metric in ("iou", "dice", "hd95"):
        assert clean[metric] == pytest.approx(float(rows[val_ids[1]][metric]))
        assert summary[metric] == pytest.approx(np.mean([float(r[metric]) for r in rows.values()]))
    # without --masks-dir there is nothing to split
    result = run_script("predict.py", "--checkpoint", checkpoint, "--input-dir", data, "--output-dir", tmp_path / "x",
                        "--trained-ids", data / "toy_train1.txt", check=False)
    assert result.returncode == 2 and "--trained-ids needs --masks-dir" in result.stderr
