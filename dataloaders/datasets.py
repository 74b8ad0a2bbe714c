"""Datasets and preprocessing of the segmenter (stage 2), as the official MGCC / CMU-Net loader.

Training augmentation (official albumentations pipeline ``RandomRotate90, Flip, Resize``):
  with p = 0.5 rotate by k * 90 degrees, k uniform in {0, 1, 2, 3};
  with p = 0.5 flip vertically, horizontally or both (uniform);
  resize to image_size x image_size (image bilinear, mask nearest).
Normalisation ``official``: ImageNet mean/std (x 255) per channel in the order OpenCV reads (BGR),
then divided by 255 once more, exactly as the official loader. For 1-channel input the channel mean
and std are the averages of the three. ``unit``: x / 255 * 2 - 1.

Randomness comes from a seed handed in with each index (see samplers.py), so an item's
augmentation does not depend on which worker loads it: runs resume exactly.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .io import MASK_VALUES, read_image, read_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("official", "unit")


def normalization_constants(channels: int, mode: str = "official") -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) float32 per channel: the network input is (x - offset) / scale, x the uint8 value.

    official: offset = mean x 255, scale = std x 255 (then / 255 once more, see normalize); unit:
    offset 127.5, scale 127.5 (x / 127.5 - 1 is computed as written, see normalize).
    """
    if mode == "official":
        mean = np.array(IMAGENET_MEAN if channels == 3 else [np.mean(IMAGENET_MEAN)], np.float32) * 255
        std = np.array(IMAGENET_STD if channels == 3 else [np.mean(IMAGENET_STD)], np.float32) * 255
        return mean, std
    if mode == "unit":
        return np.full(channels, 127.5, np.float32), np.full(channels, 127.5, np.float32)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def normalize(image: np.ndarray, mode: str = "official") -> np.ndarray:
    """uint8 HxWxC -> float32 CxHxW network input."""
    x = image.astype(np.float32)
    mean, std = normalization_constants(image.shape[2], mode)
    if mode == "official":
        x = (x - mean) / std / 255  # the official loader divides by 255 after Normalize as well
    else:
        x = x / 127.5 - 1
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def rot90_flip(array: np.ndarray, k: int, flip_code: int | None) -> np.ndarray:
    """Rotate by k * 90 degrees (np.rot90), then flip with cv2.flip(flip_code) unless it is None."""
    array = np.rot90(array, k)
    if flip_code is not None:
        array = cv2.flip(np.ascontiguousarray(array), flip_code)
    return np.ascontiguousarray(array)


def random_rot90_flip(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The official RandomRotate90 + Flip (each p = 0.5), the same draw applied to every array."""
    k = int(rng.integers(0, 4)) if rng.random() < 0.5 else 0
    flip_code = int(rng.integers(-1, 2)) if rng.random() < 0.5 else None  # 0 vertical, 1 horizontal, -1 both
    return [rot90_flip(a, k, flip_code) for a in arrays]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


class SegmentationDataset(Dataset):
    """Images with or without masks, preprocessed for the segmenter.

    ``items`` are (id, image path, mask path or None). An item is a dict with ``image`` (float32
    C x S x S), ``id``, ``size`` (the file's H, W) and, for labeled items, ``mask`` (float32 1 x S x S, values 0/1). Index with an
    int (no augmentation) or with ``(index, seed)`` from the samplers (augmented when ``augment``).
    """

    def __init__(self, items: list[tuple[str, Path, Path | None]], image_size: int = 256, in_channels: int = 3,
                 normalization: str = "official", augment: bool = False, mask_values: str = "binary"):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.items = list(items)
        self.image_size = image_size
        self.in_channels = in_channels
        self.normalization = normalization
        self.augment = augment
        if mask_values not in MASK_VALUES:
            raise ValueError(f"mask_values must be one of {MASK_VALUES}, got {mask_values!r}")
        self.mask_values = mask_values

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        case_id, image_path, mask_path = self.items[index]
        arrays = [read_image(image_path, self.in_channels)]
        size = torch.tensor(arrays[0].shape[:2])  # (H, W) of the file, to map predictions back
        if mask_path is not None:
            arrays.append(read_mask(mask_path, self.mask_values))
        if self.augment and seed is not None:
            arrays = random_rot90_flip(np.random.default_rng(seed), *arrays)
        item = {"id": case_id, "size": size, "image": torch.from_numpy(normalize(resize_image(arrays[0], self.image_size),
                                                                   self.normalization))}
        if mask_path is not None:
            item["mask"] = torch.from_numpy(resize_mask(arrays[1], self.image_size)[None].astype(np.float32))
        return item
