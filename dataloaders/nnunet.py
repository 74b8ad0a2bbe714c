"""nnU-Net v2 raw datasets, converted to this project's layout (the one every script reads).

An nnU-Net v2 raw dataset (nnU-Net's documentation, ``dataset_format.md``) is::

    DatasetXXX_Name/dataset.json            channel_names, labels (background 0), numTraining, file_ending
    DatasetXXX_Name/imagesTr/<case>_0000<file_ending>     one file per channel: _0000 is channel 0
    DatasetXXX_Name/labelsTr/<case><file_ending>          integer label map, same size as the image
    DatasetXXX_Name/imagesTs/<case>_0000<file_ending>     optional, no labels

:func:`convert` writes ``<out>/images/<case><ext>`` (links to the nnU-Net images, or copies),
``<out>/masks/0/<case>.png`` (0/255: 255 where the label map equals the foreground label) and, when
there is an ``imagesTs``, ``<out>/test/images/<case><ext>``. Everything is checked before anything is
written, and the output appears only once complete. Then split.py, train.py, train_ldm.py and
predict.py read ``<out>`` as any other dataset.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np

from .io import IMAGE_EXTENSIONS, MASK_SUBDIR, DataError, _decode, check_pairs, listing, require_dir
from utils.files import make_temp_dir

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def read_dataset_json(root: Path) -> dict:
    """dataset.json, checked for what a 2-D single-channel dataset needs."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{root} is not an nnU-Net v2 raw dataset: {path} not found")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a {type(meta).__name__}, where nnU-Net v2 writes an object of keys")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (nnU-Net v2 dataset.json keys)")
    wrong = [f"{key} is a {type(meta[key]).__name__}" for key in ("channel_names", "labels")
             if not isinstance(meta[key], dict)]
    if wrong:  # was: a traceback (len() of an int, .values() of a list)
        raise DataError(f"{path}: {', '.join(wrong)}, where nnU-Net v2 writes an object (e.g. \"labels\": "
                        "{\"background\": 0, \"lesion\": 1}, \"channel_names\": {\"0\": \"US\"})")
    if len(meta["channel_names"]) != 1:
        raise DataError(f"{path}: {len(meta['channel_names'])} channels ({meta['channel_names']}); this project reads "
                        "one image per case (channel 0000)")
    if str(meta["file_ending"]).lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: file_ending {meta['file_ending']!r} is not a 2-D image format read here "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    if not all(isinstance(v, int) for v in meta["labels"].values()):
        raise DataError(f"{path}: region-based labels (lists of label values) are not supported: {meta['labels']}")
    return meta


def foreground_value(meta: dict, foreground: str | int, path: Path) -> int:
    """The label value that is foreground: a value of ``labels`` other than 0, or a label name."""
    labels = meta["labels"]
    if isinstance(foreground, str) and not foreground.isdigit():
        if foreground not in labels:
            raise DataError(f"{path}: no label named {foreground!r}; labels are {labels}")
        value = labels[foreground]
    else:
        value = int(foreground)
    if value == 0 or value not in labels.values():
        raise DataError(f"{path}: foreground label {value} is not a non-background value of labels {labels}; choose "
                        "one with --foreground-label")
    return value


def find_nnunet_cases(root: Path, meta: dict) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """(case -> image, case -> label, case -> test image); one DataError lists every image without a label,
    label without an image, other channel and wrongly named file."""
    ending = meta["file_ending"]
    images_dir, labels_dir = require_dir(root / "imagesTr", "nnU-Net imagesTr folder"), require_dir(
        root / "labelsTr", "nnU-Net labelsTr folder")

    def channel_files(folder: Path, problems: list[str]) -> dict[str, Path]:
        cases = {}
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if not path.name.endswith(ending):
                problems.append(f"{path}: not a {ending} file (dataset.json's file_ending)")
                continue
            match = CHANNEL_SUFFIX.match(path.name[:-len(ending)])
            if match is None:
                problems.append(f"{path}: expected <case>_0000{ending}")
            elif match["channel"] != "0000":
                problems.append(f"{path}: channel {match['channel']}, but dataset.json declares one channel (0000)")
            else:
                cases[match["case"]] = path
        return cases

    problems: list[str] = []
    images = channel_files(images_dir, problems)
    labels = {}
    for path in sorted(labels_dir.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            if path.name.endswith(ending):
                labels[path.name[:-len(ending)]] = path
            else:
                problems.append(f"{path}: not a {ending} file (dataset.json's file_ending)")
    tests = channel_files(root / "imagesTs", problems) if (root / "imagesTs").is_dir() else {}
    parts = [listing("files that do not fit the nnU-Net layout", problems)] if problems else []
    no_label = sorted(str(images[c]) for c in images.keys() - labels.keys())
    no_image = sorted(str(labels[c]) for c in labels.keys() - images.keys())
    if no_label:
        parts.append(listing(f"cases without a label in {labels_dir}", no_label))
    if no_image:
        parts.append(listing(f"labels without an image (<case>_0000{ending}) in {images_dir}", no_image))
    if parts:
        raise DataError(f"nnU-Net dataset {root} is not consistent:\n" + "\n".join(parts))
    if not images:
        raise DataError(f"nnU-Net dataset {root} has no training cases in {images_dir}")
    expected = meta.get("numTraining")
    if expected is not None and expected != len(images):
        raise DataError(f"{root / 'dataset.json'}: numTraining is {expected} but {images_dir} holds {len(images)} cases")
    return images, labels, tests


def read_masks(images: dict[str, Path], labels: dict[str, Path], meta: dict, foreground: int) -> dict[str, np.ndarray]:
    """case -> 0/255 mask; one DataError lists unreadable labels, labels of another size than their image and
    values that dataset.json does not declare."""
    allowed = set(meta["labels"].values())
    masks, problems = {}, []
    for case, label_path in labels.items():
        try:
            label = _decode(label_path, cv2.IMREAD_UNCHANGED)
            image = _decode(images[case], cv2.IMREAD_GRAYSCALE)
        except DataError as error:
            problems.append(str(error))
            continue
        if label.ndim != 2:
            problems.append(f"{label_path}: a label map has one channel, this one has {label.shape[2]}")
            continue
        if label.shape != image.shape:
            problems.append(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                            f"{images[case].name} is {image.shape[1]}x{image.shape[0]}")
        undeclared = sorted(set(np.unique(label).tolist()) - allowed)
        if undeclared:
            problems.append(f"{label_path}: values {undeclared[:6]} are not in dataset.json's labels {meta['labels']}")
        masks[case] = np.where(label == foreground, 255, 0).astype(np.uint8)
    if problems:
        raise DataError(listing("bad nnU-Net label files", problems))
    return masks


def convert(root: str | Path, out_dir: str | Path, foreground: str | int = 1, copy: bool = False) -> dict:
    """Convert an nnU-Net v2 raw dataset into ``out_dir`` (which must not exist); returns a summary."""
    root, out_dir = require_dir(root, "nnU-Net dataset folder"), Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir} already exists: give a new folder (nothing is written over)")
    meta = read_dataset_json(root)
    value = foreground_value(meta, foreground, root / "dataset.json")
    images, labels, tests = find_nnunet_cases(root, meta)
    masks = read_masks(images, labels, meta, value)
    empty = sorted(case for case, mask in masks.items() if not mask.any())

    staging = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        def place(source: Path, folder: str, case: str) -> None:
            target = staging / folder / f"{case}{source.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copyfile(source, target)
            else:  # relative to the final folder: staging sits beside it, at the same depth
                os.symlink(os.path.relpath(source.resolve(), (out_dir / folder).resolve()), target)

        for case, image in images.items():
            place(image, "images", case)
            target = staging / MASK_SUBDIR / f"{case}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(target), masks[case]):
                raise DataError(f"cannot write {target}")
        for case, image in tests.items():
            place(image, "test/images", case)
        # the project's own checks, on what its scripts will read
        check_pairs([(case, staging / "images" / f"{case}{images[case].suffix}", staging / MASK_SUBDIR / f"{case}.png")
                     for case in images], mask_values="binary")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"cases": len(images), "test_cases": len(tests), "foreground": value, "empty_masks": empty,
            "images": "copied" if copy else "linked"}
