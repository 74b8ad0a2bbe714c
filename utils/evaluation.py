"""Evaluation of a segmenter on a labeled set, batched, shared by train.py and predict.py."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .metrics import MetricAverager


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None = None,
             progress: bool = False, desc: str = "evaluating") -> dict[str, float]:
    """Mean per-image metrics of the main decoder at threshold 0.5, at the loader's image size."""
    was_training = model.training
    model.eval()
    averager = MetricAverager()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        averager.update(logits, batch["mask"].to(device))
    model.train(was_training)
    return averager.summary()
