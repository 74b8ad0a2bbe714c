"""The segmenter's training batches and evaluation sets, resident on the device or from DataLoaders.

train.py's data choice (--data-on-device): the images decoded and resized once and kept on the
training device (dataloaders.device_data, no worker processes), or DataLoaders with
--num-workers processes. Both give the same batches: the labeled images of a step first, then the
unlabeled ones (samplers.StreamBatchSampler: a pure function of seed and step, so a resumed run
draws what an uninterrupted one would), each rank its slice of the global batch under torchrun.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .datasets import SegmentationDataset
from .device_data import DeviceBatches, DeviceImageSet, data_bytes, keep_on_device
from .samplers import LABELED_STREAM, UNLABELED_STREAM, StreamBatchSampler
from utils.runtime import ignore_stop_signals


def make_loader(dataset, cfg, device, **kwargs) -> DataLoader:
    workers = cfg.num_workers
    # A private generator: creating loader iterators must not consume the global torch RNG (exact resume).
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed),
                      worker_init_fn=ignore_stop_signals, **kwargs)


def endless(loader: DataLoader):
    while True:
        yield from loader


class TrainingBatches:
    """``batch(step)`` -> (images, masks) of training step ``step`` on the device, the labeled
    images first; ``selection_batches()`` and ``report_batches()`` the evaluation sets.

    ``cfg``: train.py's configuration (image_size, in_channels, normalization, mask_values,
    num_workers, seed, labeled_batch_size, eval_batch_size, data_on_device, progress); ``start``:
    the steps already trained; ``unlabeled_batch_size`` 0: labeled images only.
    """

    def __init__(self, cfg, run_data, device, ctx, start: int, unlabeled_batch_size: int):
        self.cfg, self.run_data, self.device, self.ctx = cfg, run_data, device, ctx
        semi = unlabeled_batch_size > 0

        def sampler(items, batch_size, stream, whole_epochs):
            return StreamBatchSampler(len(items), batch_size, cfg.seed, stream, whole_epochs, start, ctx.rank,
                                      ctx.world_size)

        labeled_sampler = sampler(run_data.labeled, cfg.labeled_batch_size, LABELED_STREAM, whole_epochs=True)
        unlabeled_sampler = sampler(run_data.unlabeled, unlabeled_batch_size, UNLABELED_STREAM, False) if semi else None
        self.resident_bytes = data_bytes(len(run_data.labeled), len(run_data.unlabeled) if semi else 0,
                                         len(run_data.selection), cfg.image_size, cfg.in_channels)
        self.on_device = keep_on_device(cfg.data_on_device, self.resident_bytes)
        if self.on_device:
            self.selection_set = self.resident(run_data.selection, False, f"loading the {run_data.selection_name} images")
            self.device_batches = DeviceBatches(
                (self.resident(run_data.labeled, True, "loading the labeled images"), labeled_sampler),
                (self.resident(run_data.unlabeled, True, "loading the unlabeled images"), unlabeled_sampler)
                if semi else None, cfg.seed)
        else:
            self.loaders = [endless(make_loader(self.dataset(items, augment=True), cfg, device, batch_sampler=s))
                            for items, s in ((run_data.labeled, labeled_sampler),
                                             (run_data.unlabeled, unlabeled_sampler)) if s]
            self.selection_set = self.loader(run_data.selection)

    def describe(self) -> str:
        return (f"on {self.device}, {self.resident_bytes / 2 ** 30:.2f} GiB" if self.on_device else "DataLoader") \
            + f" (--data-on-device {self.cfg.data_on_device})"

    def dataset(self, items, augment: bool) -> SegmentationDataset:
        cfg = self.cfg
        return SegmentationDataset(items, cfg.image_size, cfg.in_channels, cfg.normalization, augment, cfg.mask_values)

    def loader(self, items) -> DataLoader:
        return make_loader(self.dataset(items, False), self.cfg, self.device, batch_size=self.cfg.eval_batch_size)

    def resident(self, items, augment: bool, desc: str) -> DeviceImageSet:
        cfg = self.cfg
        return DeviceImageSet(items, cfg.image_size, cfg.in_channels, cfg.normalization, cfg.mask_values, self.device,
                              augment, cfg.num_workers, cfg.progress and self.ctx.is_main, desc)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_device:
            return self.device_batches(step)
        labeled = next(self.loaders[0])
        images = [labeled["image"]] + [next(loader)["image"] for loader in self.loaders[1:]]
        # each pinned part is copied as it is, then joined on the device: torch.cat on the host would make one
        # pageable tensor, whose copy waits for the device
        images = torch.cat([part.to(self.device, non_blocking=True) for part in images])
        return images, labeled["mask"].to(self.device, non_blocking=True)

    def selection_batches(self):
        return self.selection_set.batches(self.cfg.eval_batch_size) if self.on_device else self.selection_set

    def report_batches(self):
        """The val list, evaluated once at the end after selection on --holdout ids (else the selection set)."""
        if not self.run_data.report:
            return self.selection_batches()
        if self.on_device:
            return self.resident(self.run_data.report, False, "loading the val images").batches(self.cfg.eval_batch_size)
        return self.loader(self.run_data.report)
