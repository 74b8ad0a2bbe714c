"""TensorBoard logs of a training run: ``<run>/tensorboard``, written beside the run's PNGs and CSVs.

    tensorboard --logdir runs/<run>/tensorboard     (or --logdir runs: every run side by side)

Scalars (losses, lambda, learning rate, metrics) and images (the preview grids, overlays and
reconstructions the run also saves as PNGs). Only the process that writes the run folder (rank 0
under torchrun) opens a writer; elsewhere, and with ``--no-tensorboard``, every call does nothing.
A resumed run appends to the same event files: events logged at or after the step it resumes from
(written after the checkpoint it continues) are purged, so the curves show each step once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

LOG_DIR = "tensorboard"


class TensorBoardLog:
    """``scalars`` and ``image`` to ``log_dir`` (``<run>/tensorboard``, or a folder in it per stage); a no-op
    unless ``enabled`` and ``writer`` (rank 0)."""

    def __init__(self, log_dir: str | Path | None, enabled: bool = True, writer: bool = True,
                 resume_step: int | None = None):
        self.path = Path(log_dir) if log_dir is not None else None
        self.writer = None
        if enabled and writer and self.path is not None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

            # resumed from a checkpoint at step k: what the first run logged after k is purged (steps > k)
            self.writer = SummaryWriter(str(self.path), purge_step=resume_step + 1 if resume_step else None)

    def __bool__(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        """One scalar per key, tagged ``prefix/key``; None and non-numbers are skipped."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """A uint8 HxW (gray) or HxWx3 (BGR, as OpenCV and the run's PNGs have it) image."""
        if self.writer is None:
            return
        if image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.ndim == 3:
            image = image[..., 0]
        self.writer.add_image(tag, image, step, dataformats="HWC" if image.ndim == 3 else "HW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_events(log_dir: str | Path) -> dict[str, list[tuple[int, float | tuple[int, ...]]]]:
    """tag -> [(step, value)] of every scalar, and [(step, (height, width))] of every image, in a log folder
    (for the tests and for scripts that compare runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    found: dict[str, list] = {}
    for tag in events.Tags()["scalars"]:
        found[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    for tag in events.Tags()["images"]:
        found[tag] = [(e.step, (e.height, e.width)) for e in events.Images(tag)]
    return found
