"""The protocol's results on the clean subset: the val ids with no exact or near-duplicate among the ids a
split's runs trained on (issue 30), beside the results on all val ids.

predict.py ``--trained-ids`` writes ``clean_subset`` into its metrics.json (see dataloaders/duplicates.py);
reproduce.py passes each split's training list, which holds every id any of the split's runs (and its
generator) trained on, so that every arm of a split is scored on the same clean ids. This module turns
those figures into results.csv columns and a results.md section; the results code calls it and keeps
its own tables unchanged.
"""
from __future__ import annotations

from typing import Sequence

from utils.metrics import METRIC_NAMES
from .results import METRIC_TITLES, mean_std, run_key

CLEAN_COLUMNS = ["val_images", "clean_images", *[f"clean_{m}" for m in METRIC_NAMES]]
SHOWN = ("iou", "dice", "hd95", "asd", "nsd")


def clean_fields(val_metrics: dict) -> dict:
    """results.csv's clean-subset columns of one run, from its predict.py metrics.json (empty without one)."""
    clean = val_metrics.get("clean_subset")
    if not isinstance(clean, dict):
        return {}
    return {"val_images": val_metrics.get("images"), "clean_images": clean.get("images"),
            "duplicate_threshold": clean.get("threshold"),
            **{f"clean_{m}": clean.get(m) for m in METRIC_NAMES}}


def clean_section(rows: list[dict], arms: Sequence[str]) -> str:
    """results.md's section: per arm each metric on all val ids and on the clean subset, side by side,
    with the count of each per split; '' when no run has clean-subset figures."""
    if not any("clean_images" in r for r in rows):
        return ""
    thresholds = sorted({r["duplicate_threshold"] for r in rows if r.get("duplicate_threshold") is not None})
    per_split = {}
    for r in rows:
        if "clean_images" in r:
            per_split.setdefault(r["split"], (r["val_images"], r["clean_images"]))
    counts = "; ".join(f"split {s}: {n_clean} of {n_all} ({n_all - n_clean} dropped)"
                       for s, (n_all, n_clean) in sorted(per_split.items()))
    lines = ["", "## All val ids and the clean subset", "",
             f"The clean subset leaves out each val id that has an exact or near-duplicate (score >= "
             f"{', '.join(format(t, 'g') for t in thresholds) or 'the default'}, dataloaders/duplicates.py) "
             "among the split's training ids: the labeled and unlabeled images of every arm and the generator's "
             "training images all come from that list, so every arm of a split is scored on the same ids. Those "
             "val images, or a copy of them, were trained on: their scores measure memory as much as "
             f"segmentation. Val ids kept: {counts}.", "",
             "| arm | runs | " + " | ".join(f"{METRIC_TITLES[m]} all | {METRIC_TITLES[m]} clean" for m in SHOWN) + " |",
             "| --- | --- |" + " --- | --- |" * len(SHOWN)]
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        cells = [f"{mean_std([r.get(m) for r in runs])} | {mean_std([r.get('clean_' + m) for r in runs])}"
                 for m in SHOWN]
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "A metric that is better on 'all' than on 'clean' was helped by the duplicates; an arm whose gain "
              "over the baseline shrinks on the clean subset gained partly from seeing them (semi-supervised arms "
              "also train on the unlabeled part of the training list). The clean subset is not a random sample of "
              "the val ids: compare arms within a column."]
    keys = sorted({run_key(r) for r in rows}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    lines += ["", "| split | seed | arm | val ids | IoU all | clean ids | IoU clean |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in keys:
        for arm in arms:
            r = next((r for r in rows if r["arm"] == arm and run_key(r) == key), None)
            if r and "clean_images" in r:
                clean_iou = "n/a" if r.get("clean_iou") is None else f"{r['clean_iou']:.4f}"
                lines.append(f"| {key[0]} | {'' if key[1] is None else key[1]} | {arm} | {r['val_images']} | "
                             f"{r['iou']:.4f} | {r['clean_images']} | {clean_iou} |")
    return "\n".join(lines) + "\n"
