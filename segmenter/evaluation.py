"""Evaluation of a segmenter on a labeled set, batched, shared by train.py and predict.py."""
from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from utils.metrics import MetricAverager


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
             autocast_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "evaluating",
             surface: bool = True, nsd_tolerance: float | None = None) -> dict[str, float]:
    """Mean per-image metrics of the main decoder at threshold 0.5, at the batches' image size.

    ``batches``: dicts with ``image`` and ``mask`` (a DataLoader, or DeviceImageSet.batches already
    on the device). The overlap metrics are computed on the device and read back once at the end;
    ``surface=False`` leaves out HD95, ASD and NSD (in pixels at the batches' size; NSD at
    ``nsd_tolerance`` pixels, default 2), which need every mask on the CPU.
    """
    was_training = model.training
    model.eval()
    averager = MetricAverager(surface=surface, nsd_tolerance=nsd_tolerance)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        averager.update(logits, batch["mask"].to(device, non_blocking=True))
    model.train(was_training)
    return averager.summary()


@torch.no_grad()
def overlay_grid(model: torch.nn.Module, dataset, device: torch.device, threshold: float = 0.5,
                 columns: int = 4):
    """One BGR picture of the main decoder's masks on the images of ``dataset`` (a SegmentationDataset,
    not augmented): the prediction in red, the ground truth outlined in green, at the dataset's size."""
    import cv2
    from dataloaders.io import read_image

    from utils.plots import image_grid, overlay

    was_training = model.training
    model.eval()
    tiles = []
    for k in range(len(dataset)):
        item = dataset[k]
        logits = model(item["image"][None].to(device)).float()
        pred = (torch.sigmoid(logits) > threshold)[0, 0].cpu().numpy()
        size = pred.shape[::-1]
        image = cv2.resize(read_image(dataset.items[k][1], 3), size, interpolation=cv2.INTER_LINEAR)
        truth = item["mask"][0].numpy() > 0.5 if "mask" in item else None
        tiles.append(overlay(image, pred, truth))
    model.train(was_training)
    return image_grid(tiles, columns=columns)
