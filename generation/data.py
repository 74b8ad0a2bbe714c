"""The training images of stage 1 (the latent diffusion model), read through dataloaders.io.

Only the ids of the chosen split's training list ever reach the generator: a synthetic image
must not carry information from a validation image into the segmenter's evaluation. A training
list that shares an id with the split's validation list is refused.

Data order and augmentation are a pure function of (seed, step): :class:`StepBatchSampler` can
start at any step, so that a resumed run sees exactly the batches an uninterrupted one would,
whatever the data-loader workers do.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dataloaders.splits import choose_labeled, holdout_size
from dataloaders.io import (DataError, listing, note, check_images, check_pairs, find_cases, read_id_list,
                            read_image, read_mask, select_cases, split_files)


@dataclass
class TrainingSet:
    """The images one stage-1 run learns from."""
    ids: list[str]
    paths: list[Path]
    labels: list[int] | None  # index into class_names; None for an unconditional model
    class_names: list[str]
    train_file: Path
    val_file: Path | None  # the split's validation list, when it exists (checked for overlap)
    val_paths: list[Path]  # its images: the autoencoder is measured on them, never trained on them
    # a mask-conditioned denoiser's pairs: positions in ``ids`` of the labeled images and their masks
    mask_index: list[int] = field(default_factory=list)
    mask_paths: list[Path] = field(default_factory=list)

    @property
    def mask_ids(self) -> list[str]:
        return [self.ids[k] for k in self.mask_index]

    @property
    def mask_labels(self) -> list[int] | None:
        """The classes of the labeled images (None: unconditional by class)."""
        return [self.labels[k] for k in self.mask_index] if self.labels is not None else None


def training_ids(data_dir: str | Path, split: int, split_name: str | None = None, holdout: float = 0.0
                 ) -> tuple[list[str], Path, Path | None]:
    """The ids of ``<name>_train<split>.txt`` but the last ``holdout`` of them (those train.py --holdout
    selects on: a generator that saw them would leak them through its samples); a DataError when they
    overlap ``<name>_val<split>.txt``."""
    train_file, val_file = split_files(data_dir, split, split_name)
    if not train_file.is_file():
        raise DataError(f"split file not found: {train_file} (the training list of split {split}; "
                        "write the split files with split.py)")
    ids = read_id_list(train_file)
    ids = ids[:len(ids) - holdout_size(len(ids), holdout)]
    if not val_file.is_file():
        return ids, train_file, None
    shared = sorted(set(ids) & set(read_id_list(val_file)))
    if shared:
        raise DataError(listing(f"{train_file} shares ids with the validation list {val_file}; the "
                                 "generator must never see a validation image", shared))
    return ids, train_file, val_file


def read_class_csv(path: str | Path) -> dict[str, str]:
    """``id,class`` rows (a header row ``id,class`` is allowed) -> {id: class}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class file not found: {path}")
    classes: dict[str, str] = {}
    problems = []
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if number == 1 and [c.strip().lower() for c in row] == ["id", "class"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                problems.append(f"line {number}: expected 'id,class', got {','.join(row)!r}")
            elif row[0].strip() in classes:
                problems.append(f"line {number}: id {row[0].strip()!r} listed twice")
            else:
                classes[row[0].strip()] = row[1].strip()
    if problems:
        raise DataError(listing(f"class file {path} is not valid", problems))
    if not classes:
        raise DataError(f"class file {path} has no rows")
    return classes


def class_labels(ids: Sequence[str], class_names: Sequence[str], class_csv: str | Path | None,
                 names_given: bool = True) -> tuple[list[str], list[int] | None]:
    """Class names and one label per id; ``([], None)`` for an unconditional model.

    With ``class_csv`` the class comes from the file (names default to its classes, sorted);
    otherwise from the id itself, which must start with one of ``class_names`` (BUSI: ``benign
    (10)``, ``malignant (3)``), case-insensitively, the longest matching name winning.

    Classes are a fact about the data, opt-in: ``names_given`` False (the names come from a config
    file, not from the user's --class-names) and no id starting with any of them, the model is
    unconditional, said in one note line (issue 34: every shipped config names BUSI's two classes).
    Names the user gave, or ids of which some match and others do not, are an error.
    """
    names = list(class_names)
    if len(set(names)) != len(names):
        raise DataError(f"class names listed more than once: {names}")
    if class_csv is not None:
        table = read_class_csv(class_csv)
        missing = [i for i in ids if i not in table]
        if missing:
            raise DataError(listing(f"class file {class_csv} has no class for training ids", missing))
        names = names or sorted({table[i] for i in ids})
        unknown = sorted({f"{i}: {table[i]}" for i in ids if table[i] not in names})
        if unknown:
            raise DataError(listing(f"class file {class_csv} gives classes outside {names}", unknown))
        return names, [names.index(table[i]) for i in ids]
    if not names:
        return [], None
    by_length = sorted(names, key=len, reverse=True)
    labels, unmatched = [], []
    for case_id in ids:
        match = next((n for n in by_length if case_id.lower().startswith(n.lower())), None)
        if match is None:
            unmatched.append(case_id)
        else:
            labels.append(names.index(match))
    if unmatched and not labels and not names_given:
        note(f"unconditional generator: no training id starts with a class of the config ({', '.join(names)}); "
             "give --class-names or --class-csv for a class-conditional one")
        return [], None
    if unmatched:
        raise DataError(listing(f"training ids that start with none of the classes {names} "
                                 "(give the classes in a CSV with --class-csv instead, or train an unconditional "
                                 "generator with --no-class-conditioning)", unmatched))
    return names, labels


@dataclass
class LabeledSelection:
    """Which training images a mask-conditioned denoiser learns from: train.py's labeled images."""
    labeled_fraction: float = 0.5
    labeled_list: str | Path | None = None
    mask_values: str = "binary"


def load_training_set(data_dir: str | Path, split: int, class_names: Sequence[str] = (),
                      class_csv: str | Path | None = None, progress: bool = False,
                      split_name: str | None = None, holdout: float = 0.0, names_given: bool = True,
                      labeled: LabeledSelection | None = None) -> TrainingSet:
    """Resolve, check and open once every training image of the split (one DataError if any is bad),
    and find the split's validation images (read later, only to measure the autoencoder). With
    ``labeled``, also the labeled images and their masks (dataloaders.splits.choose_labeled, train.py's
    own choice), each mask checked."""
    cases = find_cases(data_dir)  # first: a missing data folder is named as such
    ids, train_file, val_file = training_ids(data_dir, split, split_name, holdout)
    triples = select_cases(cases, ids, str(train_file))
    paths = [image for _, image, _ in triples]
    names, labels = class_labels(ids, class_names, class_csv, names_given)
    check_images(paths, progress=progress)
    val_paths = [image for _, image, _ in select_cases(cases, read_id_list(val_file), str(val_file))] \
        if val_file is not None else []
    data = TrainingSet(ids, paths, labels, names, train_file, val_file, val_paths)
    if labeled is not None:
        chosen, _ = choose_labeled(triples, labeled.labeled_fraction, labeled.labeled_list, train_file)
        check_pairs(chosen, progress=progress, mask_values=labeled.mask_values)
        position = {case_id: k for k, case_id in enumerate(ids)}
        data.mask_index = [position[case_id] for case_id, _, _ in chosen]
        data.mask_paths = [mask for _, _, mask in chosen]
    return data


def mask_fractions(mask: np.ndarray, image_size: int, size: int) -> np.ndarray:
    """A boolean mask (any size) -> float32 size x size: each latent cell's lesion fraction. The mask is first
    brought to the image size as the image is (nearest: it stays a mask), then averaged over each cell."""
    mask = mask.astype(np.uint8)
    if mask.shape != (image_size, image_size):
        mask = cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def read_masks_at(data_dir: str | Path, ids: Sequence[str], image_size: int, mask_values: str = "binary",
                  source: str = "the run's ldm.json") -> list[np.ndarray]:
    """The masks of ``ids`` in ``data_dir``, each as a uint8 0/1 image_size x image_size array (nearest: the
    size the generator's images have)."""
    cases = find_cases(data_dir)
    out = []
    for _, _, mask_path in select_cases(cases, list(ids), source):
        mask = read_mask(mask_path, mask_values).astype(np.uint8)
        out.append(cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_NEAREST))
    return out


def latent_masks(paths: Sequence[Path], image_size: int, size: int, mask_values: str = "binary") -> torch.Tensor:
    """The masks of a mask-conditioned denoiser's pairs at the latent's size, each as it is and mirrored (as
    encode_training_set encodes each image): (N, 2, 1, size, size) float32 lesion fractions."""
    out = []
    for path in paths:
        fractions = mask_fractions(read_mask(path, mask_values), image_size, size)
        out.append(np.stack([fractions, fractions[:, ::-1]])[:, None])
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def load_image(path: Path, size: int) -> np.ndarray:
    """Gray uint8 size x size (INTER_AREA: the right filter for the usual downscaling)."""
    image = read_image(path, channels=1)[..., 0]
    if image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def thumbnails(paths: Sequence[Path], size: int = 64) -> np.ndarray:
    """uint8 N x size x size, for the memorisation report."""
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size), np.uint8)


class TrainingImages(Dataset):
    """Item ``(index, flip)`` -> (1xHxW float tensor in [-1, 1], class label or -1).

    The flip is decided by the sampler, not here: no randomness lives in the workers. Only a
    horizontal flip: an ultrasound image has a top (the probe) and depth increases downwards.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, size: int):
        self.paths, self.labels, self.size = list(paths), labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        image = load_image(self.paths[index], self.size)
        if flip:
            image = image[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).float().div(127.5).sub(1.0)[None]
        return tensor, (self.labels[index] if self.labels is not None else -1)


class StepBatchSampler(Sampler):
    """Batches of ``(index, flip)`` for steps ``start_step .. end_step - 1``.

    Step s takes positions s*B .. s*B+B-1 of an endless stream made of one permutation per epoch
    (epoch e permuted with seed (seed, e)), so every image is seen once per epoch even when the
    batch size does not divide the dataset; the flips of step s come from seed (seed, s).

    Under torchrun ``batch_size`` is the global batch: every rank computes the same batch and
    iterates over its own slice (items rank, rank + world_size, ...), so the ranks never overlap
    within a step and together see exactly the batches of a single-process run.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world_size: int = 1):
        if num_items <= 0:
            raise DataError("no training images")
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} does not split evenly over {world_size} processes")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._order

    def batch(self, step: int) -> list[tuple[int, bool]]:
        """The whole (global) batch of ``step``."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        indices = [int(self._permutation(p // self.num_items)[p % self.num_items]) for p in positions]
        flips = np.random.default_rng([self.seed, step, 1]).random(self.batch_size) < 0.5
        return list(zip(indices, map(bool, flips)))

    def local_batch(self, step: int) -> list[tuple[int, bool]]:
        """This rank's slice of the batch of ``step``."""
        return self.batch(step)[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start_step, self.end_step):
            yield self.local_batch(step)
