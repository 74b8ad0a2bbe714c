"""Batch streams of the training loop: one for labeled ids, one for unlabeled ids.

Each step's batch is a pure function of (seed, stream, step), so a run resumed at step s draws
exactly what an uninterrupted run would have drawn, whatever the number of data-loader workers:

- the labeled stream goes through whole epochs: epoch e is a permutation of the labeled ids, cut
  into len // batch_size batches (the incomplete tail is dropped, as the official two-stream
  sampler does), so an epoch is one pass over the labeled ids;
- the unlabeled stream cycles through its own permutations independently of the labeled epochs.

A batch is a list of (index, sample_seed) pairs; the sample seed drives that item's augmentation.
Under torchrun every rank computes the same global batch and keeps its own slice (items rank,
rank + world_size, ...): the ranks never overlap within a step, and together they see exactly the
batches of a single-process run.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from utils.schedule import batches_per_epoch  # re-exported: the loaders' epochs are the schedule's

LABELED_STREAM, UNLABELED_STREAM = 0, 1
PAIRS_STREAM = 3  # the synthetic pairs' own labeled stream (2 is device_data's augmentation draws)


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless, resumable stream of batches of ``batch_size`` indices out of ``num_items``.

    ``whole_epochs``: batches never straddle two permutations (labeled stream); otherwise the
    permutations are concatenated and cut into batches (unlabeled stream).
    ``start_step``: the step of the first batch yielded (for resuming).
    ``rank``, ``world_size``: yield only this rank's slice of each (global) batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, stream: int, whole_epochs: bool,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or num_items < batch_size:
            raise ValueError(f"a batch of {batch_size} needs at least that many items, got {num_items}")
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} does not split evenly over {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self.num_items, self.batch_size, self.seed, self.stream = num_items, batch_size, seed, stream
        self.whole_epochs = whole_epochs
        self.start_step = start_step
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_items, self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            self._cache = (epoch, rng.permutation(self.num_items))
        return self._cache[1]

    def indices(self, step: int) -> list[int]:
        """The item indices of batch ``step``."""
        if self.whole_epochs:
            epoch, position = divmod(step, self.batches_per_epoch)
            start = position * self.batch_size
            return self._permutation(epoch)[start:start + self.batch_size].tolist()
        out = []
        for flat in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(flat, self.num_items)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def batch(self, step: int) -> list[tuple[int, int]]:
        seeds = np.random.SeedSequence([self.seed, self.stream, step]).generate_state(self.batch_size)
        return [(index, int(s)) for index, s in zip(self.indices(step), seeds)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)[self.rank::self.world_size]
            step += 1
