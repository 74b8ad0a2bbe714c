"""Bookkeeping of a segmenter run (train.py): its folder, its evaluations and the best checkpoint.

Kept out of train.py so that the training loop there reads like the algorithm (the loop's own
skeleton is utils.training). Under torchrun only rank 0 writes files (``writer=False`` elsewhere).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from utils import distributed
from utils.checkpoint import atomic_save, to_host
from utils.config import ConfigError
from utils.plots import plot_curves
from utils.tensorboard import LOG_DIR

from dataloaders.io import note

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "checkpoint_last.pt", "checkpoint_best.pt")


CHECKPOINT_FILES = ("checkpoint_last.pt", "checkpoint_best.pt")


def claim_run_folder(out_dir: Path, overwrite: bool, writer: bool) -> None:
    """Refuse a folder that holds a run unless ``overwrite``; then clear that run's files.

    A run holds something only once it wrote a checkpoint: the config.yaml (and log) of a run that
    failed before its first checkpoint (a bad flag, a crash in the first steps) are replaced by the
    corrected rerun, with a note. (The folder's lock, taken before, says no such run is still going.)
    """
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    made = [name for name in existing if name in CHECKPOINT_FILES]
    if made and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(existing)}): "
                          "use --resume to continue it or --overwrite to start afresh")
    if existing and not made and writer:
        note(f"{out_dir}: replacing {', '.join(existing)} of a run that stopped before its first checkpoint")
    distributed.barrier()  # every rank has looked before rank 0 deletes
    if writer:
        for name in existing:
            (out_dir / name).unlink()
        if overwrite or existing:  # the earlier run's TensorBoard events would mix with the new run's
            shutil.rmtree(out_dir / LOG_DIR, ignore_errors=True)


class RunRecord:
    """Evaluation history, the best result so far, and the files that show them."""

    def __init__(self, out_dir: Path, selection_name: str, writer: bool, history=None, best=None, device=None):
        self.out_dir, self.selection_name, self.writer = out_dir, selection_name, writer
        self.device = device  # the training device: its peak memory is recorded (--device cuda:1 is not the current one)
        self.history: list[dict] = history or []
        self.best: dict = best or {"iteration": None, "iou": -1.0}
        if writer and history is not None:
            # evaluations logged after the resumed checkpoint was written are repeated: drop them
            (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def add(self, iteration: int, metrics: dict, train_means: dict[str, float], lr: float) -> bool:
        """Log one evaluation with the mean of each training loss since the last one (train_<name>);
        True when it is the best so far (by IoU)."""
        record = {"iteration": iteration, "set": self.selection_name, **metrics,
                  **{f"train_{name}": mean for name, mean in train_means.items()}, "lr": lr, "time": time.time()}
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_initialized():
            # the run's peak so far on the training device: what a benchmark of the loop reads back
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.history.append(record)
        improved = metrics["iou"] > self.best["iou"]
        if improved:
            self.best = {"iteration": iteration, **metrics}
        if self.writer:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.plot()
        return improved

    def plot(self) -> None:
        its = [r["iteration"] for r in self.history]
        names = [k[len("train_"):] for k in self.history[-1] if k.startswith("train_")]
        losses = {k: (its, [r.get(f"train_{k}", float("nan")) for r in self.history]) for k in names}
        plot_curves(self.out_dir / "curves.png", {
            "training loss (mean since last evaluation)": losses,
            f"{self.selection_name} IoU / Dice": {"IoU": (its, [r["iou"] for r in self.history]),
                                                  "Dice": (its, [r["dice"] for r in self.history])}})

    def save(self, name: str, checkpoint: dict) -> None:
        if self.writer:
            atomic_save(to_host(checkpoint, self.device) if self.device is not None else checkpoint, self.out_dir / name)

    def describe_last(self) -> str:
        r, b = self.history[-1], self.best
        return (f"iteration {r['iteration']}: {self.selection_name} IoU {r['iou']:.4f} Dice {r['dice']:.4f} "
                f"(best {b['iou']:.4f} at {b['iteration']})")
