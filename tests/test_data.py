"""The data layer: reading and checking files, preprocessing, batch streams, run composition."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from conftest import run_script, write_dataset
from dataloaders.datasets import SegmentationDataset, normalize
from dataloaders.io import DataError, check_pairs, find_cases, read_image, read_mask, unlabeled_images
from dataloaders.samplers import StreamBatchSampler
from generation.data import load_training_set
from dataloaders.splits import load_run_data
from utils.config import parse_config
from generation.run import load_data
import train
import train_ldm


# ---- batch streams -------------------------------------------------------------------------------
def test_labeled_stream_passes_over_every_id_once_per_epoch():
    sampler = StreamBatchSampler(10, 3, seed=1, stream=0, whole_epochs=True)
    assert sampler.batches_per_epoch == 3
    for epoch in range(3):
        ids = sum((sampler.indices(epoch * 3 + b) for b in range(3)), [])
        assert len(ids) == len(set(ids)) == 9  # one id of 10 left out (incomplete batch dropped)
    assert sampler.indices(0) != sampler.indices(3)  # a new permutation each epoch


def test_unlabeled_stream_cycles_across_permutations():
    sampler = StreamBatchSampler(5, 2, seed=1, stream=1, whole_epochs=False)
    flat = sum((sampler.indices(s) for s in range(5)), [])  # 10 items = two full cycles
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))


def test_streams_are_resumable_and_independent():
    fresh = StreamBatchSampler(7, 2, seed=3, stream=0, whole_epochs=True)
    resumed = StreamBatchSampler(7, 2, seed=3, stream=0, whole_epochs=True, start_step=5)
    first = next(iter(resumed))
    assert first == fresh.batch(5)
    assert [i for i, _ in first] == fresh.indices(5)
    other = StreamBatchSampler(7, 2, seed=3, stream=1, whole_epochs=True)
    assert [fresh.indices(s) for s in range(6)] != [other.indices(s) for s in range(6)]
    seeds = [s for _, s in fresh.batch(0)] + [s for _, s in fresh.batch(1)]
    assert len(set(seeds)) == 4  # every item of every step has its own augmentation seed


def test_stream_needs_a_full_batch():
    with pytest.raises(ValueError, match="at least"):
        StreamBatchSampler(3, 4, seed=0, stream=0, whole_epochs=True)


# ---- preprocessing --------------------------------------------------------------------------------
def test_official_normalisation_by_hand():
    image = np.array([[[0, 128, 255]]], np.uint8)  # one BGR pixel
    got = normalize(image, "official")[:, 0, 0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array([0, 128, 255]) - mean * 255) / (std * 255) / 255
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(normalize(image[..., :1], "unit")[:, 0, 0], [-1.0])


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    root = write_dataset(tmp_path / "d", n=3, size=(40, 56))
    cases = find_cases(root)
    items = [(i, img, mask) for i, (img, mask) in cases.items()]
    # make the image equal to its mask so alignment is visible after any rotation/flip
    for _, img, mask in items:
        cv2.imwrite(str(img), cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))
    dataset = SegmentationDataset(items, image_size=32, in_channels=1, normalization="unit", augment=True)
    for seed in range(12):
        item = dataset[(seed % 3, seed)]
        assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
        agreement = ((item["image"] > 0) == (item["mask"] > 0)).float().mean()
        assert agreement > 0.97  # only resampling at the edge can differ
        assert item["size"].tolist() == [40, 56]
    views = {dataset[(0, seed)]["mask"].numpy().tobytes() for seed in range(20)}
    assert len(views) >= 4  # the seeds draw different rotations/flips
    assert torch.equal(dataset[(0, 7)]["image"], dataset[(0, 7)]["image"])  # one seed, one view


def test_grayscale_and_colour_files_mix(tmp_path):
    gray = write_dataset(tmp_path / "g", n=2, splits=False)
    color = write_dataset(tmp_path / "c", n=2, color=True, splits=False, seed=5)
    for path in [*(gray / "images").iterdir(), *(color / "images").iterdir()]:
        assert read_image(path, 3).shape[2] == 3 and read_image(path, 1).shape[2] == 1


# ---- checking files --------------------------------------------------------------------------------
def test_upper_case_extensions_and_other_sizes(tmp_path):
    root = write_dataset(tmp_path / "d", n=4, size=(33, 47), ext=".PNG")
    cases = find_cases(root)
    assert len(cases) == 4 and all(p.suffix == ".PNG" for p, _ in cases.values())


def test_missing_mask_missing_image_and_duplicate_ids_in_one_error(tmp_path):
    root = write_dataset(tmp_path / "d", n=4)
    (root / "masks" / "0" / "benign (1).png").unlink()
    (root / "images" / "malignant (2).png").unlink()
    cv2.imwrite(str(root / "images" / "benign (3).jpg"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as error:
        find_cases(root)
    message = str(error.value)
    assert "benign (1).png" in message and "malignant (2).png" in message and "benign (3)" in message


def test_corrupt_truncated_and_mismatched_files(tmp_path):
    root = write_dataset(tmp_path / "d", n=4)
    images = root / "images"
    (images / "benign (1).png").write_bytes(b"not a png")
    jpeg = cv2.imencode(".jpg", np.full((64, 80), 128, np.uint8))[1].tobytes()
    (images / "malignant (2).png").unlink()
    (images / "malignant (2).jpg").write_bytes(jpeg[: len(jpeg) // 2])
    cv2.imwrite(str(root / "masks" / "0" / "benign (3).png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError) as error:
        check_pairs([(i, *p) for i, p in find_cases(root).items()])
    message = str(error.value)
    assert "benign (1).png" in message and "malignant (2).jpg: truncated" in message
    assert "benign (3).png: mask is 10x10 but its image" in message


def test_unlabeled_folder_errors(tmp_path):
    with pytest.raises(DataError, match="unlabeled folder not found"):
        unlabeled_images(tmp_path / "nope")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        unlabeled_images(tmp_path / "empty")


# ---- what plays which part in a run ----------------------------------------------------------------
def test_labeled_fraction_takes_the_first_ids_in_file_order(dataset):
    train_ids = (dataset / "toy_train1.txt").read_text().split("\n")[:8]
    (dataset / "toy_train1.txt").write_text("\n".join(reversed(train_ids)))
    data = load_run_data(dataset, 1, labeled_fraction=0.25)
    assert [i for i, *_ in data.labeled] == list(reversed(train_ids))[:2]
    assert [i for i, *_ in data.unlabeled] == list(reversed(train_ids))[2:]
    assert all(mask is None for *_, mask in data.unlabeled)
    assert data.selection_name == "val" and len(data.selection) == 4 and not data.report


def test_holdout_is_carved_from_the_end_of_the_training_list(dataset):
    data = load_run_data(dataset, 1, labeled_fraction=0.5, holdout=0.25)
    ids = (dataset / "toy_train1.txt").read_text().splitlines()
    assert [i for i, *_ in data.selection] == ids[6:] and data.selection_name == "holdout"
    assert [i for i, *_ in data.labeled] == ids[:3] and len(data.report) == 4
    assert not {i for i, *_ in data.selection} & {i for i, *_ in data.labeled + data.unlabeled}


def test_unlabeled_dirs_are_added(dataset, tmp_path):
    synth = write_dataset(tmp_path / "synth", n=3, splits=False)
    data = load_run_data(dataset, 1, labeled_fraction=0.5, unlabeled_dirs=[synth], unlabeled_from_train=False)
    assert len(data.unlabeled) == 3 and all(i.startswith("synth/") for i, *_ in data.unlabeled)


@pytest.mark.parametrize("change,message", [
    (lambda d: (d / "toy_val1.txt").write_text("benign (1)\n"), "share 1 id"),
    (lambda d: (d / "toy_train1.txt").write_text("benign (1)\nghost (9)\n"), "ghost (9)"),
    (lambda d: (d / "toy_train1.txt").write_text("\n"), "split file is empty"),
    (lambda d: (d / "toy_val1.txt").unlink(), "split file not found"),
])
def test_bad_split_files(dataset, change, message):
    change(dataset)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_data(dataset, 1)


def rename_split_files(data, old: str, new: str) -> None:
    for path in data.glob(f"{old}_*.txt"):
        path.rename(data / path.name.replace(f"{old}_", f"{new}_", 1))


def test_split_files_of_another_prefix_are_found(tmp_path, capsys):
    """The official layout under another folder name: BUSI_2020/busi_train1.txt."""
    data = write_dataset(tmp_path / "BUSI_2020", n=9)
    rename_split_files(data, "busi_2020", "busi")
    expected = (data / "busi_train1.txt").read_text().splitlines()
    for load in (lambda: [i for i, *_ in (lambda run: run.labeled + run.unlabeled)(load_run_data(data, 1))],
                 lambda: load_training_set(data, 1).ids):
        assert load() == expected
        assert "note: split files: using busi_train1.txt" in capsys.readouterr().err
    # named explicitly: no note, and another prefix beside it is then no ambiguity
    (data / "other_train1.txt").write_text("benign (1)\n")
    assert load_run_data(data, 1, split_name="busi").selection_name == "val"
    assert load_training_set(data, 1, split_name="busi").ids == expected
    assert "note" not in capsys.readouterr().err


def test_ambiguous_split_files_are_an_error_naming_them(tmp_path):
    data = write_dataset(tmp_path / "BUSI_2020", n=9)
    rename_split_files(data, "busi_2020", "busi")
    (data / "other_train1.txt").write_text("benign (1)\n")
    for load in (load_run_data, load_training_set):
        with pytest.raises(DataError, match=r"busi_2020_train1.txt; .*several names \(busi, other\).*--split-name"):
            load(data, 1)
    with pytest.raises(DataError, match="split file not found: .*nothing_train1.txt"):
        load_run_data(data, 1, split_name="nothing")


@pytest.mark.slow
def test_split_name_is_a_flag_of_every_script_that_reads_split_files(tmp_path):
    data = write_dataset(tmp_path / "BUSI_2020", n=9)
    rename_split_files(data, "busi_2020", "a")
    write_dataset(data, n=9)  # and busi_2020_train1.txt again: the default finds it, --split-name picks the other
    (data / "a_train1.txt").write_text("\n".join(f"benign ({k})" for k in (1, 3, 5)) + "\n")
    args = ["--data-dir", str(data), "--split-name", "a"]
    assert parse_config(train.OPTIONS, "", args).split_name == "a"
    assert load_data(parse_config(train_ldm.OPTIONS, "", args)).ids == ["benign (1)", "benign (3)", "benign (5)"]
    assert train.main([*args, "--out-dir", str(tmp_path / "run"), "--mode", "supervised", "--labeled-fraction", "1",
                       "--width", "4", "--image-size", "32", "--batch-size", "2", "--labeled-batch-size", "2",
                       "--iterations", "1", "--num-workers", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iterations"] == 1
    assert parse_config(train.OPTIONS, "", ["--config", str(tmp_path / "run" / "config.yaml")]).split_name == "a"


def generated_folder(folder, generator_train_ids, data_root) -> None:
    """A folder as sample_ldm.py leaves it (images/, manifest.csv naming the generator run), and that
    generator's run folder with the ldm.json train_ldm.py writes (its training ids)."""
    import sample_ldm

    run = data_root / f"ldm_{folder.name}"
    run.mkdir()
    (run / "ldm.json").write_text(json.dumps({"kind": "mgcc-ldm", "train_ids": generator_train_ids}))
    write_dataset(folder, n=3, splits=False, seed=5)
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(sample_ldm.MANIFEST_COLUMNS)
        for image in sorted((folder / "images").iterdir()):
            row = dict.fromkeys(sample_ldm.MANIFEST_COLUMNS, "")
            writer.writerow({**row, "file": f"images/{image.name}", "checkpoint": str(run.resolve())}.values())


def leaky_samples(dataset, tmp_path):
    """Split 2 made of split 1's lists so that its 3 val ids are in split 1's training list, and the samples
    of a generator trained on split 1 (tmp_path/synth_split1): they leak those val ids into split 2."""
    train1 = (dataset / "toy_train1.txt").read_text().splitlines()
    val1 = (dataset / "toy_val1.txt").read_text().splitlines()
    (dataset / "toy_train2.txt").write_text("\n".join(train1[3:] + val1) + "\n")
    (dataset / "toy_val2.txt").write_text("\n".join(train1[:3]) + "\n")
    synth = tmp_path / "synth_split1"
    generated_folder(synth, train1, tmp_path)
    return synth


def test_samples_of_a_generator_that_saw_evaluated_images_are_refused(dataset, tmp_path, capsys):
    """Split 2's val ids are in split 1's training list: split 1's generator leaks them into split 2."""
    synth = leaky_samples(dataset, tmp_path)
    assert len(load_run_data(dataset, 1, unlabeled_dirs=[synth]).unlabeled) == 4 + 3  # its own split: fine
    with pytest.raises(DataError) as error:
        load_run_data(dataset, 2, unlabeled_dirs=[synth])
    message = str(error.value)
    assert f"unlabeled folder {synth} was generated by {(tmp_path / 'ldm_synth_split1').resolve()}" in message
    assert "3 of the 3 val ids this run evaluates (toy_val2.txt)" in message
    assert all(repr(i) in message for i in (dataset / "toy_val2.txt").read_text().splitlines())
    # the holdout ids are evaluated too: carved from the training list the generator learned from
    with pytest.raises(DataError, match=r"2 of the 2 holdout ids this run evaluates \(toy_train1.txt\)"):
        load_run_data(dataset, 1, holdout=0.25, unlabeled_dirs=[synth])
    # given as the images/ folder itself, its manifest beside it is found
    with pytest.raises(DataError, match="toy_val2.txt"):
        load_run_data(dataset, 2, unlabeled_dirs=[synth / "images"])
    assert "note" not in capsys.readouterr().err


def test_a_folder_without_manifest_is_accepted_with_a_note(dataset, tmp_path, capsys):
    own = write_dataset(tmp_path / "own", n=3, splits=False)
    assert len(load_run_data(dataset, 1, unlabeled_dirs=[own]).unlabeled) == 4 + 3
    err = capsys.readouterr().err
    assert f"note: unlabeled folder {own} has no manifest.csv: where its images come from cannot be checked" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_py_refuses_a_leaking_folder(dataset, tmp_path):
    synth = tmp_path / "synth"
    generated_folder(synth, (dataset / "toy_val1.txt").read_text().splitlines()[:1], tmp_path)
    result = run_script("train.py", "--data-dir", dataset, "--unlabeled-dir", synth, "--out-dir", tmp_path / "run",
                        "--iterations", "1", "--num-workers", "0", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: unlabeled folder" in result.stderr and "1 of the 4 val ids" in result.stderr
    assert not (tmp_path / "run").exists()


def test_mgcc_needs_unlabeled_images(dataset):
    with pytest.raises(DataError, match="needs unlabeled images"):
        load_run_data(dataset, 1, labeled_fraction=1.0)
    assert len(load_run_data(dataset, 1, labeled_fraction=1.0, need_unlabeled=False).labeled) == 8


# ---- mask values -----------------------------------------------------------------------------------
def test_jpeg_noisy_masks_are_thresholded_with_one_warning(dataset):
    mask_path = dataset / "masks" / "0" / "benign (1).png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    noisy = cv2.imdecode(cv2.imencode(".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(noisy)) > 8
    cv2.imwrite(str(mask_path), noisy)
    with pytest.warns(UserWarning, match=r"1 mask\(s\) are 0/255 with JPEG-like noise"):
        check_pairs([(i, *p) for i, p in find_cases(dataset).items()], mask_values="binary")
    assert (read_mask(mask_path) == (mask > 127)).mean() > 0.99


def test_label_maps_need_a_mapping(dataset):
    mask_path = dataset / "masks" / "0" / "benign (1).png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(mask_path), (mask > 0).astype(np.uint8))  # a 0/1 mask
    pairs = [(i, *p) for i, p in find_cases(dataset).items()]
    with pytest.raises(DataError, match=r"benign \(1\).png: values \[0, 1\]") as error:
        check_pairs(pairs, mask_values="binary")
    assert "nonzero" in str(error.value)
    check_pairs(pairs, mask_values="nonzero")
    assert np.array_equal(read_mask(mask_path, "nonzero"), mask > 0)
    assert not read_mask(mask_path, "threshold").any()
