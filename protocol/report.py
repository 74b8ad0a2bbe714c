"""The results of a protocol folder: results.csv, times.csv, results.md, results.png and results_curves.png.

One row per run (arm, split, seed) from each run's metrics.json files (train.py's and predict.py's),
the generator's figures per split, and a header saying how the numbers were made (the protocol, the
configs, the seeds, the schedule, the device, the project's commit, the command). The table and the
figure themselves are protocol/results.py's.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from datetime import date
from pathlib import Path

import torch

from dataloaders.io import dataset_name
from .clean_subset import CLEAN_COLUMNS, clean_fields, clean_section
from utils.config import read_yaml
from utils.runtime import resolve_device

from . import results
from .arms import BASELINES
from .ledger import Ledger
from .plan import ROOT, SCRIPT_OPTIONS, stage2_config

def device_description(device: str) -> str:
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def stage_devices(ledger: Ledger) -> str:
    """The devices the cluster jobs recorded for their stages ('' for a local run, whose device is this host's)."""
    return "; ".join(sorted({entry["device"] for entry in ledger.stages.values() if entry.get("device")}))


def collect(args, splits: list[int], ledger: Ledger) -> tuple[list[dict], dict[int, dict]]:
    """results rows (one per run: arm, split, seed) from each run's metrics.json files, and each
    split's generator figures."""
    rows, generators = [], {}
    out = args.out_dir.resolve()
    for i in splits:
        for s in args.seeds or [None]:
            where, prefix = (out / f"split{i}" / f"seed{s}", f"split{i}/seed{s}") if s is not None else \
                (out / f"split{i}", f"split{i}")
            for arm in args.arms:
                run = json.loads((where / arm / "metrics.json").read_text())
                val = json.loads((where / f"{arm}_val" / "metrics.json").read_text())
                seed = read_yaml(where / arm / "config.yaml", SCRIPT_OPTIONS["train.py"]).get("seed")  # the seed it ran with
                rows.append({"arm": arm, "split": i, "seed": seed, **{m: val.get(m) for m in results.METRIC_NAMES},
                             "selected_iteration": run["best_iteration"], "iterations": run["iterations"],
                             "selection_set": run["selection_set"],
                             "train_seconds": round(ledger.seconds(f"{prefix}/{arm}") or 0, 1),
                             "predict_seconds": round(ledger.seconds(f"{prefix}/{arm}/predict") or 0, 1),
                             **clean_fields(val)})
        if args.generator:
            figures = {}
            for path in (out / f"split{i}" / "ldm" / "vae_metrics.json", out / f"split{i}" / "samples" / "report.json"):
                if path.is_file():
                    figures.update(json.loads(path.read_text()))
            generators[i] = {**figures, **fidelity_figures(args, out / f"split{i}")}
    return rows, generators


def fidelity_figures(args, run: Path) -> dict:
    """The mask fidelity of split ``run``'s pairs (issue 31, protocol/plan.py FIDELITY): the supervised segmenter's
    IoU with the pairs' masks on the pairs, on the unconditional samples of the same names, and on the real val
    images; {} without them."""
    figures = {}
    seeds = args.seeds or [None]
    where = run / f"seed{seeds[0]}" if seeds[0] is not None else run
    for key, path in (("mask_fidelity_iou", run / "pairs_fidelity" / "metrics.json"),
                      ("unconditional_fidelity_iou", run / "samples_fidelity" / "metrics.json"),
                      ("segmenter_val_iou", where / "supervised_val" / "metrics.json")):
        if path.is_file() and (key != "segmenter_val_iou" or figures):
            figures[key] = json.loads(path.read_text()).get("iou")
    return figures


def project_version() -> str:
    """The git commit of this checkout (with '+ uncommitted changes' when tracked files differ from it),
    or 'unknown' outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def run_curves(args, splits: list[int]) -> dict[str, list[tuple[str, list[int], list[float]]]]:
    """{arm: [(run label, iterations, selection IoU)]}: each run's evaluations, from its metrics.jsonl."""
    out = args.out_dir.resolve()
    curves = {arm: [] for arm in args.arms}
    for i in splits:
        for s in args.seeds or [None]:
            where = out / f"split{i}" / f"seed{s}" if s is not None else out / f"split{i}"
            label = f"split {i}" + (f", seed {s}" if s is not None else "")
            for arm in args.arms:
                curves[arm].append((label, *results.read_curve(where / arm / "metrics.jsonl")))
    return curves


def write_results(args, splits: list[int], ledger: Ledger, device: str) -> Path:
    rows, generators = collect(args, splits, ledger)
    out = args.out_dir.resolve()
    results.write_csv(rows, out / "results.csv", [*results.CSV_COLUMNS, *CLEAN_COLUMNS])
    results.write_csv(rows, out / "times.csv", results.TIME_COLUMNS)
    protocol = (f"checkpoint selected on the last {args.holdout:g} of each training list (holdout); the val ids "
                "evaluated once, by the selected checkpoint" if args.holdout else
                "checkpoint selected on the val ids, which are also the ids reported (the official protocol: "
                "optimistic)")
    seeds = (f"- Seeds: {', '.join(map(str, args.seeds))} (each arm once per split and seed; stage 1 once per split, "
             f"seed {args.seeds[0]})" if args.seeds else
             f"- Seed: {args.seed}" if args.seed is not None else "- Seed: each config's own")
    header = [f"# {dataset_name(args.data_dir)}: {args.labels}, "
              f"splits {', '.join(map(str, splits))}", "",
              f"- Protocol: {protocol}. Metrics per image at the image's own size (predict.py), then averaged.",
              f"- HD95 and ASD in {'mm' if args.spacing_mm or args.spacing_csv else 'pixels'}; NSD at a tolerance of "
              + (f"{args.nsd_tolerance:g} {'mm' if args.spacing_mm or args.spacing_csv else 'pixels'}"
                 if args.nsd_tolerance is not None else "2 pixels") + " (MONAI's definitions: docs/segmentation.md, Metrics).",
              f"- Stage 2 config: `{args.config.name}`{' + ' + shlex.join(args.train_args) if args.train_args else ''}"
              + (f"; stage 1: `{args.ldm_config.name}`{' + ' + shlex.join(args.ldm_args) if args.ldm_args else ''}, "
                 f"{args.num_samples} samples per split" if args.generator else "; no generator"),
              seeds,
              f"- Schedule: x {stage2_config(args).schedule_scale:g} of the published one (train.py --schedule-scale; "
              f"the iterations each run made are in the per-run table)",
              f"- Device: {stage_devices(ledger) or device_description(device)}; {date.today().isoformat()}",
              f"- Project version: {project_version()}",
              f"- Command: `{args.command_line}`",
              f"- Curves: every run's selection IoU over its iterations, mean and ± 1 SD band where several: "
              f"[{results.CURVES}]({results.CURVES})"]
    (out / "results.md").write_text(results.markdown(rows, args.arms, generators, header, BASELINES)
                                    + clean_section(rows, args.arms))
    results.plot(rows, args.arms, out / "results.png",
                 f"{dataset_name(args.data_dir)}, {args.labels}: one point per run")
    results.plot_curves(run_curves(args, splits), out / results.CURVES,
                        f"{dataset_name(args.data_dir)}, {args.labels}: {rows[0]['selection_set']} IoU while training"
                        if rows else dataset_name(args.data_dir))
    return out
