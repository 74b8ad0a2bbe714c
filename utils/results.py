"""The protocol's results: one row per (arm, split), summaries over splits, a figure.

``results.csv`` has a row per arm and split; ``results.md`` gives, per arm, the mean ± standard
deviation over splits of each metric and the paired difference to the supervised baseline, then
the generator's quality figures per split; ``results.png`` shows the arms side by side with one
point per split, the points of one split joined.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import METRIC_NAMES

METRIC_TITLES = {"iou": "IoU", "dice": "Dice", "hd95": "HD95", "asd": "ASD", "nsd": "NSD",
                 "sensitivity": "sensitivity", "precision": "precision", "f1": "F1", "accuracy": "accuracy"}
LOWER_IS_BETTER = {"hd95", "asd"}
GENERATOR_FIGURES = [("psnr", "autoencoder PSNR (dB, val)", "{:.2f}"), ("ssim", "autoencoder SSIM (val)", "{:.4f}"),
                     ("c2st_accuracy", "C2ST accuracy", "{:.3f}"),
                     ("memorisation_fraction", "memorisation fraction", "{:.3f}"), ("num_images", "samples", "{:d}")]
CSV_COLUMNS = ["arm", "split", *METRIC_NAMES, "selected_iteration", "iterations", "selection_set",
               "train_seconds", "predict_seconds"]


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], arms: Sequence[str], generators: dict[int, dict], header: list[str],
             baseline: str = "supervised") -> str:
    """results.md: the summary over splits, the paired differences, per-split rows, generator figures."""
    by_arm = {arm: {r["split"]: r for r in rows if r["arm"] == arm} for arm in arms}
    splits = sorted({r["split"] for r in rows})
    lines = [*header, "", f"## Mean ± standard deviation over splits ({', '.join(map(str, splits))})", "",
             "| arm | splits | " + " | ".join(METRIC_TITLES[m] for m in METRIC_NAMES) + " |",
             "| --- | --- |" + " --- |" * len(METRIC_NAMES)]
    for arm in arms:
        runs = by_arm[arm].values()
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(mean_std([r.get(m) for r in runs]) for m in METRIC_NAMES)
                     + " |")
    if baseline in by_arm and len(arms) > 1:
        lines += ["", f"## Difference to `{baseline}` (paired by split; mean ± standard deviation)", "",
                  "| arm | " + " | ".join(f"Δ {METRIC_TITLES[m]}" for m in METRIC_NAMES) + " |",
                  "| --- |" + " --- |" * len(METRIC_NAMES)]
        for arm in arms:
            if arm == baseline:
                continue
            common = sorted(set(by_arm[arm]) & set(by_arm[baseline]))
            lines.append(f"| {arm} | " + " | ".join(
                mean_std([by_arm[arm][s][m] - by_arm[baseline][s][m] for s in common
                          if by_arm[arm][s].get(m) is not None and by_arm[baseline][s].get(m) is not None])
                for m in METRIC_NAMES) + " |")
        lines.append("")
        lines.append("HD95 and ASD are better when lower; every other metric when higher.")
    lines += ["", "## Per split", "",
              "| split | arm | IoU | Dice | HD95 | ASD | NSD | selected iteration | of | wall time (train + predict) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for split in splits:
        for arm in arms:
            r = by_arm[arm].get(split)
            if r:
                wall = (r["train_seconds"] or 0) + (r["predict_seconds"] or 0)
                surface = " | ".join("n/a" if r.get(m) is None else format(r[m], form)
                                     for m, form in (("hd95", ".2f"), ("asd", ".2f"), ("nsd", ".4f")))
                lines.append(f"| {split} | {arm} | {r['iou']:.4f} | {r['dice']:.4f} | {surface} | "
                             f"{r['selected_iteration']} | {r['iterations']} | {wall / 60:.1f} min |")
    if generators:
        lines += ["", "## Generator (stage 1) per split", "",
                  "| split | " + " | ".join(title for _, title, _ in GENERATOR_FIGURES) + " |",
                  "| --- |" + " --- |" * len(GENERATOR_FIGURES)]
        for split in sorted(generators):
            figures = generators[split]
            cells = []
            for key, _, form in GENERATOR_FIGURES:
                value = figures.get(key)
                cells.append("n/a" if value is None else form.format(value))
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
        lines += ["", "PSNR and SSIM: the autoencoder's reconstructions of the split's val images (never trained "
                  "on). C2ST: held-out accuracy of a classifier telling samples from training images (0.5: "
                  "indistinguishable). Memorisation: the fraction of samples nearer to a training image than two "
                  "training images typically are to each other."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], arms: Sequence[str], path: Path, title: str,
         metrics: Sequence[str] = ("iou", "dice", "hd95")) -> None:
    """The arms side by side, one point per split (the points of one split joined), the mean as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in rows})
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, split in enumerate(splits):
            xs, ys = [], []
            for x, arm in enumerate(arms):
                value = next((r[metric] for r in rows if r["arm"] == arm and r["split"] == split), None)
                if value is not None:
                    xs.append(x)
                    ys.append(value)
            ax.plot(xs, ys, marker="o", color=colours(k % 10), alpha=0.8, label=f"split {split}")
        for x, arm in enumerate(arms):
            values = [r[metric] for r in rows if r["arm"] == arm]
            if values:
                ax.hlines(np.mean(values), x - 0.25, x + 0.25, color="black", linewidth=2)
        ax.set_xticks(range(len(arms)), arms, rotation=15)
        ax.set_title(METRIC_TITLES[metric] + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
