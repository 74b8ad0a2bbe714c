"""Training data resident on the device: decoded and resized once, augmented and normalised there.

The training set of the segmenter is small (hundreds of images), so train.py keeps it on the
training device as uint8 tensors and builds each batch with a few tensor operations instead of a
DataLoader with worker processes.

Exactly the official distribution. The official pipeline rotates and flips the image at its file
size and then resizes it (datasets.py). Resizing first and rotating after is *not* bit-identical
with OpenCV: on BUSI at 64-256 px the images differed by up to one grey level and 0.18% of the mask
pixels (cv2's nearest-neighbour resize takes floor(x * scale), which is not mirror-symmetric). So
each training image is stored in the 8 orientations of the square (the dihedral group D4) that the
16 official draws (rot90 k in 0..3 or none, then flip -1/0/1 or none) produce, each resized from
the transformed file-size image exactly as the loader path does: the stored variant of a draw *is*
the loader's output for that draw. Memory: 8 x (C + 1) bytes per pixel for a labeled image, 8 x C
for an unlabeled one (BUSI split 1 at half the labels, 256², 3 channels: 0.82 GiB); evaluation
images once.

Randomness: batch composition comes from samplers.StreamBatchSampler (a pure function of seed and
step, as on the loader path); the draws of each step's augmentation come from a torch generator on
the device re-seeded from (seed, step), so a resumed run draws what an uninterrupted one would and
no generator state has to be saved. The draws are of the global batch; under torchrun each rank
keeps its slice, as with the sampler's indices.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .datasets import normalization_constants, resize_image, resize_mask, rot90_flip
from .io import read_image, read_mask
from .samplers import StreamBatchSampler
from utils.runtime import ignore_stop_signals

AUGMENT_STREAM = 2  # seed stream of the augmentation draws (0, 1: the samplers' labeled and unlabeled streams)
DEVICE_DATA_BUDGET_GIB = 2.0  # --data-on-device auto keeps the data on the device up to this size
FLIP_CODES = (None, -1, 0, 1)  # no flip, then cv2.flip's codes: both axes, vertical, horizontal


def official_draws() -> list[tuple[int, int | None]]:
    """The 16 (k, flip code) outcomes of the official RandomRotate90 + Flip, indexed k * 4 + flip index."""
    return [(k, code) for k in range(4) for code in FLIP_CODES]


def orientation_table() -> tuple[list[tuple[int, int | None]], list[int]]:
    """The 8 distinct orientations (as one (k, code) draw each) and, per official draw, its orientation."""
    probe = np.arange(6, dtype=np.uint8).reshape(2, 3)  # asymmetric: every element of D4 moves it differently
    variants, keys, table = [], [], []
    for k, code in official_draws():
        key = rot90_flip(probe, k, code).tobytes() + bytes(rot90_flip(probe, k, code).shape)
        if key not in keys:
            keys.append(key)
            variants.append((k, code))
        table.append(keys.index(key))
    return variants, table


class ResizedItems(Dataset):
    """Item i: its uint8 image(s) (V, S, S, C) and bool mask(s) (V, S, S) or None, resized for the set.

    ``orientations``: the (k, code) transforms applied before the resize (one (0, None) for no augmentation).
    """

    def __init__(self, items, image_size: int, in_channels: int, mask_values: str, orientations):
        self.items, self.image_size, self.in_channels = list(items), image_size, in_channels
        self.mask_values, self.orientations = mask_values, orientations

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        _, image_path, mask_path = self.items[index]
        image = read_image(image_path, self.in_channels)
        images = np.stack([resize_image(rot90_flip(image, k, code), self.image_size) for k, code in self.orientations])
        if mask_path is None:
            return images, None
        mask = read_mask(mask_path, self.mask_values)
        return images, np.stack([resize_mask(rot90_flip(mask, k, code), self.image_size)
                                 for k, code in self.orientations])


def data_bytes(labeled: int, unlabeled: int, evaluated: int, image_size: int, channels: int) -> int:
    """Device memory of the resident sets: 8 orientations of each training image, one of each evaluated one."""
    pixels = image_size * image_size
    return pixels * (8 * labeled * (channels + 1) + 8 * unlabeled * channels + evaluated * (channels + 1))


def keep_on_device(setting: str, nbytes: int, budget_gib: float = DEVICE_DATA_BUDGET_GIB) -> bool:
    """--data-on-device: on, off, or auto (on when the resident sets take at most budget_gib)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"data_on_device must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and nbytes <= budget_gib * 2 ** 30)


class DeviceImageSet:
    """A set of images (and masks) as uint8 tensors on ``device``: (N, V, C, S, S) and (N, V, 1, S, S).

    ``augment``: keep the 8 orientations (V = 8) for training; otherwise V = 1 (the image as read).
    Decoding runs once, through a DataLoader with ``num_workers`` processes.
    """

    def __init__(self, items, image_size: int, in_channels: int, normalization: str, mask_values: str,
                 device: torch.device, augment: bool, num_workers: int = 0, progress: bool = False,
                 desc: str = "loading images"):
        orientations, self.orientation_of_draw = orientation_table() if augment else ([(0, None)], [0] * 16)
        self.ids = [item[0] for item in items]
        decoded = ResizedItems(items, image_size, in_channels, mask_values, orientations)
        # a private generator: starting the loader must not consume the global torch RNG (exact resume)
        loader = DataLoader(decoded, batch_size=None, num_workers=num_workers, generator=torch.Generator(),
                            worker_init_fn=ignore_stop_signals)
        images, masks = [], []
        for image, mask in tqdm(loader, total=len(decoded), desc=desc, disable=not progress, leave=False):
            images.append(torch.as_tensor(image).permute(0, 3, 1, 2))
            masks.append(None if mask is None else torch.as_tensor(mask)[:, None])
        self.images = torch.stack(images).to(device)
        self.masks = torch.stack(masks).to(device) if all(m is not None for m in masks) else None
        offset, scale = normalization_constants(in_channels, normalization)
        self.offset = torch.from_numpy(offset).to(device).view(1, -1, 1, 1)
        self.scale = torch.from_numpy(scale).to(device).view(1, -1, 1, 1)
        self.normalization = normalization
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) -> float32 network input, the same arithmetic as datasets.normalize."""
        x = images.float()
        if self.normalization == "official":
            return (x - self.offset) / self.scale / 255
        return x / 127.5 - 1

    def batch(self, indices: torch.Tensor, orientations: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Items ``indices`` (long tensor on the device) in ``orientations`` (indices into V; None: the first)."""
        if orientations is None:
            orientations = torch.zeros_like(indices)
        out = {"image": self.normalize(self.images[indices, orientations])}
        if self.masks is not None:
            out["mask"] = self.masks[indices, orientations].float()
        return out

    def batches(self, batch_size: int):
        """The whole set in order, ``batch_size`` images at a time, without augmentation (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self)), device=self.device))


class DeviceAugmentation:
    """The official draw (rot90 with p 0.5, k uniform; then a flip with p 0.5, code uniform) on the device."""

    def __init__(self, seed: int, device: torch.device, orientation_of_draw: list[int]):
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.orientation_of_draw = torch.tensor(orientation_of_draw, device=device)

    def draw(self, step: int, batch_size: int) -> torch.Tensor:
        """Orientation indices (batch_size,) of step ``step``: a pure function of (seed, step)."""
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, AUGMENT_STREAM, step]).generate_state(1)[0]))
        device, g = self.orientation_of_draw.device, self.generator
        rotate = torch.rand(batch_size, device=device, generator=g) < 0.5
        k = torch.randint(0, 4, (batch_size,), device=device, generator=g)
        flip = torch.rand(batch_size, device=device, generator=g) < 0.5
        code = torch.randint(1, 4, (batch_size,), device=device, generator=g)  # index into FLIP_CODES[1:]
        draws = torch.where(rotate, k, 0) * len(FLIP_CODES) + torch.where(flip, code, 0)
        return self.orientation_of_draw[draws]


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of ``values`` on ``device``, copied without making the host wait for the GPU."""
    tensor = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":  # a copy from pageable memory would wait for the queued kernels
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceBatches:
    """The training batches of step s from device-resident sets: labeled images first, then unlabeled.

    ``labeled`` and ``unlabeled`` (None in supervised mode) are (DeviceImageSet, StreamBatchSampler)
    pairs; the samplers' ``rank`` / ``world_size`` pick this process's slice of each global batch.
    """

    def __init__(self, labeled: tuple[DeviceImageSet, StreamBatchSampler],
                 unlabeled: tuple[DeviceImageSet, StreamBatchSampler] | None, seed: int,
                 pairs: tuple[DeviceImageSet, StreamBatchSampler] | None = None):
        # the labeled streams first (the real images, then the synthetic pairs), then the unlabeled one
        self.streams = [labeled] + ([pairs] if pairs is not None else []) + ([unlabeled] if unlabeled is not None else [])
        self.labeled_streams = 2 if pairs is not None else 1
        data, self.device = labeled[0], labeled[0].device
        self.augmentation = DeviceAugmentation(seed, self.device, data.orientation_of_draw)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, masks) of step ``step``: the labeled masks only (real, then synthetic)."""
        total = sum(sampler.batch_size for _, sampler in self.streams)
        orientations = self.augmentation.draw(step, total)
        parts, start = [], 0
        for data, sampler in self.streams:
            chosen = orientations[start:start + sampler.batch_size][sampler.rank::sampler.world_size]
            start += sampler.batch_size
            indices = host_to_device(sampler.indices(step)[sampler.rank::sampler.world_size], self.device)
            parts.append(data.batch(indices, chosen))
        return torch.cat([p["image"] for p in parts]), torch.cat([p["mask"] for p in parts[:self.labeled_streams]])
