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
from .samplers import LABELED_STREAM, PAIRS_STREAM, UNLABELED_STREAM, StreamBatchSampler
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


def labeled_parts(labeled_batch_size: int, synthetic_share: float | None) -> tuple[int, int]:
    """(real, synthetic) images of a labeled batch: round(share x labeled_batch_size) synthetic pairs
    (train.py --synthetic-pairs-share), the real labeled images the rest; (labeled_batch_size, 0) without pairs."""
    if synthetic_share is None:
        return labeled_batch_size, 0
    synthetic = round(synthetic_share * labeled_batch_size)
    return labeled_batch_size - synthetic, synthetic


class TrainingBatches:
    """``batch(step)`` -> (images, masks) of training step ``step`` on the device, the labeled
    images first; ``selection_batches()`` and ``report_batches()`` the evaluation sets.

    ``cfg``: train.py's configuration (image_size, in_channels, normalization, mask_values,
    num_workers, seed, labeled_batch_size, eval_batch_size, data_on_device, progress, and
    synthetic_pairs_share with ``run_data.synthetic``); ``start``: the steps already trained;
    ``unlabeled_batch_size`` 0: labeled images only. With synthetic pairs the labeled batch is the real
    labeled images (their own stream, as without pairs) followed by the pairs (a stream of their own,
    whole epochs over the pairs): every method sees them as labeled images, nothing else changes.
    """

    def __init__(self, cfg, run_data, device, ctx, start: int, unlabeled_batch_size: int):
        self.cfg, self.run_data, self.device, self.ctx = cfg, run_data, device, ctx
        semi = unlabeled_batch_size > 0
        real, synthetic = labeled_parts(cfg.labeled_batch_size, getattr(cfg, "synthetic_pairs_share", None)
                                        if run_data.synthetic else None)

        def sampler(items, batch_size, stream, whole_epochs):
            return StreamBatchSampler(len(items), batch_size, cfg.seed, stream, whole_epochs, start, ctx.rank,
                                      ctx.world_size)

        labeled_sampler = sampler(run_data.labeled, real, LABELED_STREAM, whole_epochs=True)
        pairs_sampler = sampler(run_data.synthetic, synthetic, PAIRS_STREAM, True) if synthetic else None
        unlabeled_sampler = sampler(run_data.unlabeled, unlabeled_batch_size, UNLABELED_STREAM, False) if semi else None
        self.resident_bytes = data_bytes(len(run_data.labeled) + (len(run_data.synthetic) if synthetic else 0),
                                         len(run_data.unlabeled) if semi else 0,
                                         len(run_data.selection), cfg.image_size, cfg.in_channels)
        self.on_device = keep_on_device(cfg.data_on_device, self.resident_bytes)
        streams = [(run_data.labeled, labeled_sampler, "labeled images"),
                   (run_data.synthetic, pairs_sampler, "synthetic pairs"),
                   (run_data.unlabeled, unlabeled_sampler, "unlabeled images")]
        if self.on_device:
            self.selection_set = self.resident(run_data.selection, False, f"loading the {run_data.selection_name} images")
            sets = [(self.resident(items, True, f"loading the {what}"), s) if s else None for items, s, what in streams]
            self.device_batches = DeviceBatches(sets[0], sets[2], cfg.seed, pairs=sets[1])
        else:
            self.loaders = [endless(make_loader(self.dataset(items, augment=True), cfg, device, batch_sampler=s))
                            for items, s, _ in streams if s]
            self.labeled_loaders = 2 if synthetic else 1
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
        parts = [next(loader) for loader in self.loaders]
        # each pinned part is copied as it is, then joined on the device: torch.cat on the host would make one
        # pageable tensor, whose copy waits for the device
        images = torch.cat([part["image"].to(self.device, non_blocking=True) for part in parts])
        masks = [part["mask"].to(self.device, non_blocking=True) for part in parts[:self.labeled_loaders]]
        return images, masks[0] if len(masks) == 1 else torch.cat(masks)

    def selection_batches(self):
        return self.selection_set.batches(self.cfg.eval_batch_size) if self.on_device else self.selection_set

    def report_batches(self):
        """The val list, evaluated once at the end after selection on --holdout ids (else the selection set)."""
        if not self.run_data.report:
            return self.selection_batches()
        if self.on_device:
            return self.resident(self.run_data.report, False, "loading the val images").batches(self.cfg.eval_batch_size)
        return self.loader(self.run_data.report)
