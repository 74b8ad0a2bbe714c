"""Segment a folder of images with a trained segmenter; score the masks when ground truth is given.

    python predict.py --checkpoint runs/<run>/checkpoint_best.pt --input-dir <images> --output-dir <out> \\
        [--masks-dir <data>/masks/0] [--no-overlays]

Writes <out>/masks/<id>.png (0/255, at each input image's own size), <out>/overlays/<id>.png
(prediction in red, ground truth outlined in green) and, with --masks-dir, <out>/metrics.csv (per
image) and <out>/metrics.json (means), computed at each image's own size. With --trained-ids (the id
lists the model and its generator trained on), every metric is also given on the clean subset: the
images with no exact or near-duplicate among those ids (metrics.json's ``clean_subset``, with the
count and the ids left out; metrics.csv's ``near_duplicates_in_training`` names each one's duplicates).

--checkpoint takes a checkpoint of train.py (checkpoint_best.pt or checkpoint_last.pt; any --method, on
either --network: the evaluated network is built as the checkpoint names it) or one written
by the official MGCC code (a plain state_dict): the latter is detected, renamed, and run with the
official preprocessing (3-channel BGR, 256 x 256, official normalisation), so it gives the official
code's masks.

Outputs never replace inputs: an --output-dir that is, or holds, the input or mask folder is refused,
as is a masks/ or overlays/ folder that is a link to elsewhere. Every file is written atomically
(temporary file, fsync, size and read-back checked, rename), so a full disk is one error, not
empty masks, and a link at an output's name is replaced, never written through.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.datasets import SegmentationDataset
from dataloaders.duplicates import DEFAULT_THRESHOLD, near_duplicates_in
from dataloaders.io import (MASK_VALUES, DataError, add_pixel_limit_flag, check_images, check_pairs, image_folder,
                            list_images, read_id_list, read_image, read_mask, read_spacing_csv, select_cases,
                            set_max_image_pixels)
from networks.mgcc import MGCCNet
from networks.unet import build_network
from networks.official import convert_official_state_dict, infer_official_architecture, is_official_state_dict
from utils.checkpoint import CheckpointError, check_finite, load_checkpoint, require_fields
from utils.cli import run_cli
from utils.config import NON_NEGATIVE, POSITIVE, between, checked
from utils.files import atomic_write_text, write_error
from utils.metrics import DEFAULT_NSD_TOLERANCE_PX, METRIC_NAMES, per_image_metrics
from utils.plots import overlay, save_image
from utils.runtime import autocast_dtype, ignore_stop_signals, resolve_device

SEGMENTER_KIND = "mgcc-segmenter"
OFFICIAL_PREPROCESSING = {"image_size": 256, "in_channels": 3, "normalization": "official"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint_best.pt / checkpoint_last.pt of train.py, or an official MGCC state_dict")
    parser.add_argument("--input-dir", type=Path, required=True,
                        help="folder of images (<dir>/images/* if it has an images/ folder, else <dir>/*)")
    parser.add_argument("--ids", type=Path, default=None,
                        help="only the images whose ids this file lists, one per line (e.g. <data>/<name>_val1.txt)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where masks/, overlays/ and metrics go")
    parser.add_argument("--masks-dir", type=Path, default=None,
                        help="ground-truth masks named like the images (e.g. <data>/masks/0): adds metrics")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                        help="write overlay PNGs (default: on)")
    parser.add_argument("--mask-values", choices=MASK_VALUES, default="binary",
                        help="ground-truth mask values: binary (0/255), threshold (> 127) or nonzero (> 0) (default: binary)")
    parser.add_argument("--threshold", type=checked(float, between(0, 1)), default=0.5,
                        help="foreground where sigmoid(logit) > this (default: 0.5)")
    parser.add_argument("--batch-size", type=checked(int, POSITIVE), default=8,
                        help="images per forward pass (default: 8)")
    parser.add_argument("--num-workers", type=checked(int, NON_NEGATIVE), default=2, help="data-loader workers (default: 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="autocast precision (default: fp32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    parser.add_argument("--spacing-mm", type=float, nargs="+", default=None, metavar="MM",
                        help="pixel spacing of every image in mm (one number, or two: row and column): HD95 and ASD "
                             "in mm, NSD's tolerance in mm (default: distances in pixels)")
    parser.add_argument("--spacing-csv", type=Path, default=None,
                        help="pixel spacing of each image from a CSV with header id,spacing_mm (or "
                             "id,spacing_row_mm,spacing_col_mm); every image needs a row")
    parser.add_argument("--nsd-tolerance", type=float, default=None,
                        help=f"tolerance of the normalised surface Dice, in mm with a spacing, else pixels "
                             f"(default: {DEFAULT_NSD_TOLERANCE_PX:g} pixels, i.e. {DEFAULT_NSD_TOLERANCE_PX:g} x the "
                             "spacing in mm)")
    parser.add_argument("--trained-ids", type=Path, nargs="+", default=None, metavar="FILE",
                        help="id lists (one id per line) of the images the model and its generator trained on, found "
                             "in --input-dir by name (e.g. <data>/<name>_train1.txt): the metrics are also given on "
                             "the clean subset, the images with no exact or near-duplicate among them (see "
                             "dataloaders/duplicates.py); needs --masks-dir (default: none)")
    parser.add_argument("--duplicate-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="near-duplicate score (0-1] at or above which an image is left out of the clean subset "
                             f"(default: {DEFAULT_THRESHOLD:g})")
    add_pixel_limit_flag(parser)
    args = parser.parse_args(argv)
    if args.trained_ids is not None and args.masks_dir is None:
        parser.error("--trained-ids needs --masks-dir: it splits the metrics into all images and the clean subset")
    if not 0 < args.duplicate_threshold <= 1:
        parser.error(f"--duplicate-threshold must be in (0, 1], got {args.duplicate_threshold:g}")
    if args.spacing_mm is not None and args.spacing_csv is not None:
        parser.error("give --spacing-mm or --spacing-csv, not both")
    if args.spacing_mm is not None and (len(args.spacing_mm) > 2 or min(args.spacing_mm) <= 0):
        parser.error(f"--spacing-mm takes one or two positive numbers (row, column), got {args.spacing_mm}")
    if args.nsd_tolerance is not None and args.nsd_tolerance < 0:
        parser.error(f"--nsd-tolerance must be 0 or more, got {args.nsd_tolerance:g}")
    return args


def load_segmenter(path: Path) -> tuple[torch.nn.Module, dict, str]:
    """(model in eval mode, preprocessing options, description) from either kind of checkpoint."""
    if path.is_dir():
        what = "a latent diffusion run folder (for sample_ldm.py)" if (path / "ldm.json").exists() else "a folder"
        raise CheckpointError(f"{path} is {what}: expected a checkpoint file written by train.py "
                              "(e.g. runs/<run>/checkpoint_best.pt) or an official MGCC state_dict")
    checkpoint = load_checkpoint(path)
    if is_official_state_dict(checkpoint):
        check_finite(checkpoint, path)
        model = MGCCNet(**infer_official_architecture(checkpoint))
        model.load_state_dict(convert_official_state_dict(checkpoint))
        return model.eval(), dict(OFFICIAL_PREPROCESSING), "official MGCC checkpoint"
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if kind != SEGMENTER_KIND:
        raise CheckpointError(f"{path} is not a segmenter checkpoint: expected one written by train.py "
                              f"(kind {SEGMENTER_KIND!r}) or an official MGCC state_dict, found "
                              f"{'kind ' + repr(kind) if kind else type(checkpoint).__name__}")
    require_fields(checkpoint, path, {"model": dict, "model_args": dict, "config": dict, "iteration": int})
    missing = [k for k in (*OFFICIAL_PREPROCESSING, "mode") if k not in checkpoint["config"]]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)} (not written by train.py?)")
    check_finite(checkpoint["model"], path)
    network = checkpoint.get("network", "mgcc")  # mgcc or unet, as the run trained (mgcc before unet existed)
    try:
        model = build_network(network, **checkpoint["model_args"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its model_args {checkpoint['model_args']} do not describe the network "
                              f"({network!r}): {error}") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{path}: its weights do not fit the architecture it names "
                              f"({checkpoint['model_args']}): {len(problems)} mismatches, e.g. "
                              f"{problems[0] if problems else error}") from None
    config = checkpoint["config"]
    preprocessing = {k: config[k] for k in OFFICIAL_PREPROCESSING}
    method = config.get("method") or config["mode"]
    return model.eval(), preprocessing, f"train.py checkpoint ({method} on {network}, iteration {checkpoint['iteration']})"


def check_output_dir(output_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder whose writes could replace an input: the folder, or its masks/ or
    overlays/, equal to or holding an input folder (e.g. --output-dir <gt> with --masks-dir <gt>/masks),
    or a masks/ / overlays/ that is a link out of the output folder."""
    out = output_dir.resolve()
    problems = []
    for sub in ("masks", "overlays"):
        target = output_dir / sub
        if target.is_symlink() or (target.exists() and target.resolve().parent != out):
            problems.append(f"{target} is a link to {target.resolve()}: outputs are never written through links "
                            "out of the output folder; remove the link or choose another --output-dir")
    for where in (out, *(out / sub for sub in ("masks", "overlays"))):
        where = where.resolve()
        for what, folder in inputs.items():
            folder = folder.resolve()
            if where == folder or where in folder.parents:
                problems.append(f"--output-dir {output_dir} would write into {where}, which "
                                f"{'is' if where == folder else 'holds'} the {what} {folder}: the predictions would "
                                "replace inputs; choose an output folder outside the inputs")
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else "; ".join(problems))


def match_masks(images: list[Path], masks_dir: Path) -> dict[str, Path]:
    if not masks_dir.is_dir():
        raise DataError(f"mask folder not found: {masks_dir}")
    masks, problems = list_images(masks_dir)
    problems += [f"no mask for {p}" for p in images if p.stem not in masks]
    if problems:
        raise DataError(f"masks in {masks_dir} do not match the input images:\n  " + "\n  ".join(problems[:20])
                        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return {p.stem: masks[p.stem] for p in images}


DUPLICATE_COLUMN = "near_duplicates_in_training"  # metrics.csv, with --trained-ids


def trained_duplicates(input_dir: Path, evaluated: dict[str, Path], id_files: list[Path],
                       threshold: float) -> dict[str, list[str]]:
    """Evaluated id -> its exact or near-duplicates among the ids of ``id_files`` (found in the input folder)."""
    everything = {p.stem: (p,) for p in image_folder(input_dir, "input folder")}
    trained = {}
    for path in id_files:
        trained.update((i, p) for i, p in select_cases(everything, read_id_list(path), str(path)))
    return near_duplicates_in(evaluated, trained, threshold)


def clean_subset(rows: list[dict], leaks: dict[str, list[str]], args) -> dict:
    """metrics.json's ``clean_subset``: the means over the images with no duplicate among the trained ids."""
    clean = [r for r in rows if r["id"] not in leaks]
    means = {k: (float(np.mean([r[k] for r in clean])) if clean else None) for k in METRIC_NAMES}
    return {"images": len(clean), "dropped": len(rows) - len(clean),
            "trained_ids": [str(p) for p in args.trained_ids], "threshold": args.duplicate_threshold,
            "dropped_ids": {r["id"]: leaks[r["id"]] for r in rows if r["id"] in leaks}, **means}


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(args.precision, device)
    model, prep, description = load_segmenter(args.checkpoint)
    model.to(device)
    images = image_folder(args.input_dir, "input folder")
    if args.ids is not None:
        by_id = {p.stem: p for p in images}
        images = [item[1] for item in select_cases({i: (p,) for i, p in by_id.items()}, read_id_list(args.ids),
                                                   str(args.ids))]
    masks = match_masks(images, args.masks_dir) if args.masks_dir else {}
    spacing = {}  # id -> mm per pixel (row, column); none: distances in pixels
    if masks and args.spacing_mm:
        row_mm, col_mm = args.spacing_mm if len(args.spacing_mm) == 2 else args.spacing_mm * 2
        spacing = {p.stem: (row_mm, col_mm) for p in images}
    elif masks and args.spacing_csv:
        spacing = read_spacing_csv(args.spacing_csv, [p.stem for p in images])
    check_output_dir(args.output_dir, {"input folder": images[0].parent, **({"mask folder": args.masks_dir}
                                                                            if args.masks_dir else {})})
    # every file is opened once (and each mask's size checked) before anything is written
    if masks:
        check_pairs([(p.stem, p, masks[p.stem]) for p in images], mask_values=args.mask_values)
    else:
        check_images(images)
    image_paths = {p.stem: p for p in images}
    leaks = trained_duplicates(args.input_dir, image_paths, args.trained_ids, args.duplicate_threshold) \
        if args.trained_ids else None
    dataset = SegmentationDataset([(p.stem, p, None) for p in images], prep["image_size"], prep["in_channels"],
                                  prep["normalization"])
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        worker_init_fn=ignore_stop_signals)
    print(f"{description}: {len(images)} images -> {args.output_dir}", flush=True)

    for sub in ("masks", "overlays") if args.overlays else ("masks",):
        try:
            (args.output_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file in the way, a read-only folder
            raise write_error(args.output_dir / sub, error) from None
    rows = []
    for batch in tqdm(loader, desc="predicting", disable=not args.progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch["image"].to(device)).float()
        for case_id, size, logit in zip(batch["id"], batch["size"].tolist(), logits):
            # probabilities back to the image's own size, then the threshold
            prob = torch.sigmoid(F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False))[0, 0]
            pred = (prob > args.threshold).cpu().numpy()
            save_image(args.output_dir / "masks" / f"{case_id}.png", pred.astype(np.uint8) * 255)
            truth = read_mask(masks[case_id], args.mask_values) if masks else None
            if truth is not None:
                values = per_image_metrics(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None],
                                           spacing.get(case_id), args.nsd_tolerance)
                rows.append({"id": case_id, **{k: float(v[0]) for k, v in values.items()}})
            if args.overlays:
                original = read_image(image_paths[case_id], 3)
                save_image(args.output_dir / "overlays" / f"{case_id}.png", overlay(original, pred, truth))
    if rows:
        table = io.StringIO(newline="")
        if leaks is not None:  # which images the clean subset leaves out, and why
            rows = [{**r, DUPLICATE_COLUMN: ";".join(leaks.get(r["id"], []))} for r in rows]
        writer = csv.DictWriter(table, fieldnames=["id", *METRIC_NAMES, *([DUPLICATE_COLUMN] if leaks is not None else [])])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.output_dir / "metrics.csv", table.getvalue())
        means = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_NAMES}
        clean = clean_subset(rows, leaks, args) if leaks is not None else None
        unit = "mm" if spacing else "px"
        tolerance = (f"{args.nsd_tolerance:g} {unit}" if args.nsd_tolerance is not None else
                     f"{DEFAULT_NSD_TOLERANCE_PX:g} px" + (" (in mm: x each image's spacing)" if spacing else ""))
        atomic_write_text(args.output_dir / "metrics.json", json.dumps(
            {"checkpoint": str(args.checkpoint), "images": len(rows), "evaluated_at": "each image's own size",
             "threshold": args.threshold, "distance_unit": unit, "nsd_tolerance": tolerance,
             "spacing": ("--spacing-mm " + " ".join(f"{v:g}" for v in args.spacing_mm) if args.spacing_mm else
                         str(args.spacing_csv) if spacing else None), **means,
             **({"clean_subset": clean} if clean is not None else {})}, indent=2))
        print("  ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if clean is not None:
            print(f"clean subset: {clean['images']} of {len(rows)} images ({clean['dropped']} with an exact or "
                  f"near-duplicate among the trained ids left out)" + ("" if not clean["images"] else ": " + "  ".join(
                      f"{k} {clean[k]:.4f}" for k in METRIC_NAMES)))
    return 0


if __name__ == "__main__":
    run_cli(main)
