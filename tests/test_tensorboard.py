"""TensorBoard logs: what a run writes to <run>/tensorboard, rank 0 only, resume appends without repeats."""
from __future__ import annotations

import numpy as np

from utils.tensorboard import LOG_DIR, TensorBoardLog, read_events


def test_scalars_images_and_resume_purge(tmp_path):
    log = TensorBoardLog(tmp_path)
    for step in range(10):
        log.scalars(step, {"loss": float(step), "skipped": None}, prefix="train")
    log.image("overlay", 4, np.zeros((8, 10, 3), np.uint8))
    log.image("grid", 4, np.zeros((6, 5), np.uint8))
    log.close()
    # resumed from a checkpoint at step 5: the first run's steps 5..9 (after that checkpoint) are dropped
    log = TensorBoardLog(tmp_path, resume_step=5)
    for step in range(5, 8):
        log.scalars(step, {"loss": 100.0 + step}, prefix="train")
    log.close()
    events = read_events(tmp_path / LOG_DIR)
    assert events["train/loss"] == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]
    assert "train/skipped" not in events
    assert events["overlay"] == [(4, (8, 10))] and events["grid"] == [(4, (6, 5))]


def test_disabled_or_not_rank_zero_writes_nothing(tmp_path):
    for log in (TensorBoardLog(tmp_path, enabled=False), TensorBoardLog(tmp_path, writer=False)):
        assert not log
        log.scalars(1, {"loss": 1.0})
        log.image("x", 1, np.zeros((4, 4), np.uint8))
        log.close()
    assert not (tmp_path / LOG_DIR).exists()
