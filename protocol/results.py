"""The protocol's results: one row per run (arm, split, seed), summaries over runs, a figure.

``results.csv`` has a row per run; ``results.md`` gives, per arm, the mean ± standard deviation
over all its runs of each metric and the paired difference to the supervised baseline over the
(split, seed) pairs, with a 95 % confidence interval (Student t, :func:`paired_difference`), then
the generator's quality figures per split; ``results.png`` shows the arms side by side with one
point per run, the points of one (split, seed) joined.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.metrics import METRIC_NAMES

METRIC_TITLES = {"iou": "IoU", "dice": "Dice", "hd95": "HD95", "asd": "ASD", "nsd": "NSD",
                 "sensitivity": "sensitivity", "precision": "precision", "f1": "F1", "accuracy": "accuracy"}
LOWER_IS_BETTER = {"hd95", "asd"}
GENERATOR_FIGURES = [("psnr", "autoencoder PSNR (dB, val)", "{:.2f}"), ("ssim", "autoencoder SSIM (val)", "{:.4f}"),
                     ("c2st_accuracy", "C2ST accuracy", "{:.3f}"),
                     ("memorisation_q01", "closer than the closest 1 % of val", "{:.3f}"),
                     ("memorisation_q05", "closer than the closest 5 % of val", "{:.3f}"),
                     ("num_images", "samples", "{:d}")]
# with -pairs arms and the supervised arm (issue 31): the supervised segmenter's IoU with the pairs' masks
FIDELITY_FIGURES = [("mask_fidelity_iou", "mask fidelity: IoU on the pairs", "{:.4f}"),
                    ("unconditional_fidelity_iou", "IoU of unconditional samples on the same masks", "{:.4f}"),
                    ("segmenter_val_iou", "the same segmenter's IoU on val", "{:.4f}")]
# results.csv holds what the runs made, so that the same protocol gives the same file, byte for byte,
# however its stages were scheduled; their wall times, which vary from run to run, go to times.csv
CSV_COLUMNS = ["arm", "split", "seed", *METRIC_NAMES, "selected_iteration", "iterations", "selection_set"]
TIME_COLUMNS = ["arm", "split", "seed", "train_seconds", "predict_seconds"]
CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def paired_difference(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """The mean of the paired differences values[k] - baseline[k], their standard deviation, and the
    two-sided confidence interval of the mean: mean ± t(1 - (1 - confidence)/2, n - 1) · sd / sqrt(n),
    Student's t with n - 1 degrees of freedom (the pairs taken as independent draws). With one pair
    there is no interval (sd, low and high are None)."""
    from scipy import stats  # (a dependency of scikit-learn)

    pairs = [(v, b) for v, b in zip(values, baseline) if not any(x is None or math.isnan(x) for x in (v, b))]
    differences = np.array([v - b for v, b in pairs], float)
    n = len(differences)
    result = {"n": n, "mean": float(differences.mean()) if n else None, "sd": None, "low": None, "high": None}
    if n >= 2:
        sd = float(differences.std(ddof=1))
        half = float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * sd / math.sqrt(n)
        result.update(sd=sd, low=result["mean"] - half, high=result["mean"] + half)
    return result


def reading(difference: dict) -> str:
    """'no detectable difference' when the interval holds 0, else which way the arm differs."""
    if difference["low"] is None:
        return "one pair: no interval"
    if difference["low"] <= 0 <= difference["high"]:
        return "no detectable difference"
    return "higher than the baseline" if difference["low"] > 0 else "lower than the baseline"


def write_csv(rows: list[dict], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run_key(row: dict) -> tuple:
    """(split, seed): what pairs a run with the baseline's run (same labels, same seed)."""
    return row["split"], row.get("seed")


def markdown(rows: list[dict], arms: Sequence[str], generators: dict[int, dict], header: list[str],
             baselines: Sequence[str] = ("supervised",)) -> str:
    """results.md: the summary over runs, the paired differences, per-run rows, generator figures."""
    by_arm = {arm: {run_key(r): r for r in rows if r["arm"] == arm} for arm in arms}
    keys = sorted({run_key(r) for r in rows}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    splits = sorted({k[0] for k in keys})
    seeds = sorted({k[1] for k in keys if k[1] is not None})
    over = f"splits {', '.join(map(str, splits))}" + (f" × seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    lines = [*header, "", f"## Mean ± standard deviation over runs ({over})", "",
             "| arm | runs | " + " | ".join(METRIC_TITLES[m] for m in METRIC_NAMES) + " |",
             "| --- | --- |" + " --- |" * len(METRIC_NAMES)]
    for arm in arms:
        runs = by_arm[arm].values()
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(mean_std([r.get(m) for r in runs]) for m in METRIC_NAMES)
                     + " |")
    for baseline in [b for b in baselines if b in by_arm and len(arms) > 1]:
        lines += difference_section(by_arm, arms, keys, baseline)
    lines += per_run_section(by_arm, arms, keys)
    if generators:
        lines += generator_section(generators)
    return "\n".join(lines) + "\n"


def difference_section(by_arm: dict, arms: Sequence[str], keys: list[tuple], baseline: str) -> list[str]:
    """results.md's lines of every arm's paired difference to ``baseline``, per metric."""
    lines = ["", f"## Difference to `{baseline}`, paired by (split, seed)", "",
             f"Each arm's run minus the baseline's run with the same split and seed (the same labels, initial "
             f"weights and data order), then the mean over the pairs with its {CONFIDENCE:.0%} confidence "
             "interval: mean ± t · sd / √n, Student's t with n − 1 degrees of freedom. The interval treats "
             "the pairs as independent; the splits share images, so it is if anything too narrow. "
             "'no detectable difference': the interval contains 0.", "",
             "| arm | metric | pairs | mean Δ | sd | 95 % CI | reading |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        if arm == baseline:
            continue
        common = [k for k in keys if k in by_arm[arm] and k in by_arm[baseline]]
        for m in METRIC_NAMES:
            d = paired_difference([by_arm[arm][k].get(m) for k in common], [by_arm[baseline][k].get(m) for k in common])
            form = "{:.2f}" if m in ("hd95", "asd") else "{:.4f}"
            cells = [form.format(d["mean"]) if d["mean"] is not None else "n/a",
                     form.format(d["sd"]) if d["sd"] is not None else "n/a",
                     f"[{form.format(d['low'])}, {form.format(d['high'])}]" if d["low"] is not None else "n/a"]
            lines.append(f"| {arm} | {METRIC_TITLES[m]} | {d['n']} | " + " | ".join(cells) + f" | {reading(d)} |")
    lines.append("")
    lines.append("HD95 and ASD are better when lower; every other metric when higher.")
    return lines


def per_run_section(by_arm: dict, arms: Sequence[str], keys: list[tuple]) -> list[str]:
    """results.md's table of every run: its metrics, selected iteration and wall time."""
    lines = ["", "## Per run", "",
             "| split | seed | arm | IoU | Dice | HD95 | ASD | NSD | selected iteration | of | wall time (train + predict) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in keys:
        for arm in arms:
            r = by_arm[arm].get(key)
            if r:
                wall = (r["train_seconds"] or 0) + (r["predict_seconds"] or 0)
                surface = " | ".join("n/a" if r.get(m) is None else format(r[m], form)
                                     for m, form in (("hd95", ".2f"), ("asd", ".2f"), ("nsd", ".4f")))
                lines.append(f"| {key[0]} | {'' if key[1] is None else key[1]} | {arm} | {r['iou']:.4f} | "
                             f"{r['dice']:.4f} | {surface} | {r['selected_iteration']} | {r['iterations']} | "
                             f"{wall / 60:.1f} min |")
    return lines


def generator_section(generators: dict[int, dict]) -> list[str]:
    """results.md's table of the generator's figures per split, and how to read them."""
    fidelity = any("mask_fidelity_iou" in f for f in generators.values())
    shown = GENERATOR_FIGURES + (FIDELITY_FIGURES if fidelity else [])
    lines = ["", "## Generator (stage 1) per split", "",
             "| split | " + " | ".join(title for _, title, _ in shown) + " |",
             "| --- |" + " --- |" * len(shown)]
    for split in sorted(generators):
        figures = generators[split]
        cells = []
        for key, _, form in shown:
            value = figures.get(key)
            cells.append("n/a" if value is None else form.format(value))
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", "PSNR and SSIM: the autoencoder's reconstructions of the split's val images (never trained "
              "on). C2ST: held-out accuracy of a classifier telling samples from training images (0.5: "
              "indistinguishable). Memorisation: the fraction of samples nearer to their nearest training "
              "image than the closest 1 % (5 %) of the split's val images, which the generator never saw, are "
              "to theirs: about 0.01 (0.05) for a generator that copies nothing, 1 for one that copies "
              "(sample_ldm.py's report.json has the value expected without copying for the number of val "
              "images, and both distributions' quantiles)."]
    if fidelity:
        lines += ["", "Mask fidelity (the -pairs arms' mask-conditioned generator): the supervised arm's segmenter, "
                  "trained on the real labeled images alone, segments each synthetic pair, and its IoU with the "
                  "pair's mask is averaged; beside it the same for the unconditional generator's samples of the same "
                  "names against the same masks (what chance placement gives), and the segmenter's IoU on the real "
                  "val images (what a faithful pair would score)."]
    return lines


def plot(rows: list[dict], arms: Sequence[str], path: Path, title: str,
         metrics: Sequence[str] = ("iou", "dice", "hd95")) -> None:
    """The arms side by side, one point per run (the points of one (split, seed) joined), the mean as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({run_key(r) for r in rows}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key in keys:
            xs, ys = [], []
            for x, arm in enumerate(arms):
                value = next((r[metric] for r in rows if r["arm"] == arm and run_key(r) == key), None)
                if value is not None:
                    xs.append(x)
                    ys.append(value)
            label = f"split {key[0]}" + (f", seed {key[1]}" if key[1] is not None and len(keys) > len({k[0] for k in keys}) else "")
            ax.plot(xs, ys, marker="o", color=colours(int(key[0]) % 10), alpha=0.8, label=label)
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


CURVES = "results_curves.png"  # beside results.png: every run's selection IoU over its iterations


def read_curve(metrics_jsonl: Path) -> tuple[list[int], list[float]]:
    """(iterations, IoU) of a train.py run's evaluations, from its metrics.jsonl (train.py's RunRecord:
    one JSON object per evaluation on the selection set); empty lists when the file is missing."""
    if not metrics_jsonl.is_file():
        return [], []
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    records = [r for r in records if "iteration" in r and "iou" in r]
    return [r["iteration"] for r in records], [r["iou"] for r in records]


def mean_curve(runs: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(iterations every run evaluated at, mean IoU there, standard deviation there) over several runs."""
    common = sorted(set.intersection(*(set(its) for its, _ in runs)))
    values = np.array([[dict(zip(its, ious))[it] for it in common] for its, ious in runs], dtype=float)
    return common, values.mean(axis=0), values.std(axis=0, ddof=1)


def plot_curves(curves: dict[str, list[tuple[str, list[int], list[float]]]], path: Path, title: str) -> None:
    """One panel per arm: a thin line per run (label, iterations, IoU) and, where there are several, their
    mean with a band of ± one standard deviation over the iterations they share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm, runs in curves.items() if any(its for _, its, _ in runs)]
    columns = min(3, max(len(arms), 1))
    rows = math.ceil(max(len(arms), 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for ax, arm in zip(axes.flat, arms):
        runs = [(label, its, ious) for label, its, ious in curves[arm] if its]
        for label, its, ious in runs:
            ax.plot(its, ious, linewidth=1, alpha=0.6, label=label)
        if len(runs) > 1:
            its, mean, std = mean_curve([(its, ious) for _, its, ious in runs])
            ax.plot(its, mean, color="black", linewidth=2, label="mean")
            ax.fill_between(its, mean - std, mean + std, color="black", alpha=0.15, linewidth=0)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("selection IoU")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
