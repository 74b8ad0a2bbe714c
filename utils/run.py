"""Bookkeeping of a training run: its folder, its evaluations and checkpoints, its loss readings.

Kept out of train.py so that the training loop there reads like the algorithm. Under torchrun only
rank 0 writes files (``writer=False`` elsewhere).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import distributed
from .checkpoint import atomic_save
from .config import ConfigError
from .plots import plot_curves

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "checkpoint_last.pt", "checkpoint_best.pt")


def claim_run_folder(out_dir: Path, overwrite: bool, writer: bool) -> None:
    """Refuse a folder that holds a run unless ``overwrite``; then clear that run's files."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(existing)}): "
                          "use --resume to continue it or --overwrite to start afresh")
    distributed.barrier()  # every rank has looked before rank 0 deletes
    if writer:
        for name in existing:
            (out_dir / name).unlink()


class RunRecord:
    """Evaluation history, the best result so far, and the files that show them."""

    def __init__(self, out_dir: Path, selection_name: str, writer: bool, history=None, best=None):
        self.out_dir, self.selection_name, self.writer = out_dir, selection_name, writer
        self.history: list[dict] = history or []
        self.best: dict = best or {"iteration": None, "iou": -1.0}
        if writer and history is not None:
            # evaluations logged after the resumed checkpoint was written are repeated: drop them
            (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def add(self, iteration: int, metrics: dict, train_means: list[float], lr: float) -> bool:
        """Log one evaluation; True when it is the best so far (by IoU)."""
        record = {"iteration": iteration, "set": self.selection_name, **metrics, "train_loss": train_means[0],
                  "train_sup": train_means[1], "train_cons": train_means[2], "lr": lr, "time": time.time()}
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
        losses = {k: (its, [r[f"train_{k}"] for r in self.history]) for k in ("loss", "sup", "cons")}
        plot_curves(self.out_dir / "curves.png", {
            "training loss (mean since last evaluation)": losses,
            f"{self.selection_name} IoU / Dice": {"IoU": (its, [r["iou"] for r in self.history]),
                                                  "Dice": (its, [r["dice"] for r in self.history])}})

    def save(self, name: str, checkpoint: dict) -> None:
        if self.writer:
            atomic_save(checkpoint, self.out_dir / name)

    def describe_last(self) -> str:
        r, b = self.history[-1], self.best
        return (f"iteration {r['iteration']}: {self.selection_name} IoU {r['iou']:.4f} Dice {r['dice']:.4f} "
                f"(best {b['iou']:.4f} at {b['iteration']})")


class LossTracker:
    """Sums the step losses on the device and reads them back only every few steps.

    Reading a loss forces the host to wait for the GPU, so the step itself never does. The first
    iteration with a non-finite loss is remembered on the device and reported at the next reading.
    """

    def __init__(self, device: torch.device, start: int):
        self.device = device
        self.sums = torch.zeros(3, device=device)  # loss, sup, cons since the last reading
        self.since_eval = torch.zeros(3, device=device)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.last_read = self.last_eval = start

    def add(self, iteration: int, loss: torch.Tensor, sup: torch.Tensor, cons: torch.Tensor) -> None:
        step = torch.stack([loss.detach(), sup.detach(), cons.detach()]).float()
        self.sums += step
        self.since_eval += step
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(step[0]), iteration, self.first_bad)

    def read(self, done: int, checkpoint_path: Path) -> list[float]:
        """Mean losses since the last reading; raises FloatingPointError (on every rank) after a non-finite loss."""
        bad = int(self.first_bad.item())
        if distributed.any_rank(bad >= 0, self.device):
            where = f"iteration {bad}" if bad >= 0 else f"iterations up to {done} (on another rank)"
            raise FloatingPointError(f"non-finite loss at {where}: stopped; the last good checkpoint "
                                     f"({checkpoint_path}) is untouched")
        means = (self.sums / max(done - self.last_read, 1)).tolist()
        self.sums.zero_()
        self.last_read = done
        return means

    def eval_means(self, done: int) -> list[float]:
        means = (self.since_eval / max(done - self.last_eval, 1)).tolist()
        self.since_eval.zero_()
        self.last_eval = done
        return means
