"""Sample synthetic ultrasound images from a latent diffusion model trained by train_ldm.py.

Writes <out-dir>/images/<prefix>_<n>.png (gray, 8-bit, the training size) and <out-dir>/manifest.csv
(file, seed, class, scheduler, steps, guidance, checkpoint, nearest training image and distance)
<out-dir>/report.json (the quality figures below, the settings and the checkpoint) and
<out-dir>/grid.png (the first 64 images side by side), a folder
that train.py takes unchanged as --unlabeled-dir. Image n is drawn from numbers derived from
(--seed, n) alone: the same image whatever --batch-size and --num-images, and two different seeds
share no image. The folder appears only when every image is written:
images go to a hidden <out-dir>/../.<name>.partial folder that is renamed at the end, so an
interrupted run (a signal, kill -9, a crash) never leaves a half-written --out-dir; a signal exits
with status 128 + its number, bad input or an unusable run folder with status 2.

Image-mask pairs: a run trained with train_ldm.py --conditioning mask makes each image for a mask, the
run's labeled training masks in turn and, from the second pass over them on, new layouts of them
(--mask-augmentation: affine, elastic or both, lesion count kept; generation/mask_layouts.py). The
masks go to <out-dir>/masks/0/<prefix>_<n>.png beside the images (the dataset layout, no split files:
train.py --synthetic-pairs), and the manifest adds each pair's mask file, source id (mask_source) and
augmentation. --guidance-scale s mixes the conditional and the unconditional (no mask, no class)
predictions as u + s (c - u).

Several GPUs: torchrun --nproc_per_node N sample_ldm.py ... (the same flags). The batches of
--batch-size images are dealt out to the processes in turn (batch k to rank k mod N); every image
keeps its global name and seed and is written once, and rank 0 alone writes manifest.csv and the
memorisation report and publishes the folder. The output is byte for byte that of one process on
the same kind of device (each image is denoised in the same batch). --out-dir must be on a file
system every process sees.

Two quality figures, both on by default, read the run's training images:
- memorisation: each sample's distance to its nearest training image (normalised L2 at 64x64,
  mirror images included), against the same distance for the split's val images (real images the
  generator never trained on, less those with a near-duplicate among its training images): the
  fraction of samples nearer to a training image than the closest 1 % (5 %) of val images are,
  about 0.01 (0.05) for a generator that copies nothing and 1 for one that copies; both
  distributions' quantiles (memorisation.txt) and the closest sample/training pairs
  (closest_pairs.png);
- C2ST, a classifier two-sample test (Lopez-Paz & Oquab, 2017): a small CNN learns to tell the
  samples from the training images (64x64, as many of each, 5 folds); its held-out accuracy is 0.5
  when they cannot be told apart and 1.0 when they trivially can. About a minute on a CPU for a
  few hundred images.

--report-only --checkpoint RUN --out-dir FOLDER makes no image: it computes report.json,
memorisation.txt and closest_pairs.png again for the images in FOLDER (FOLDER/images/* or
FOLDER/*), against RUN's training and val images: another generator's samples, or real images as a
control. It writes no manifest.csv (a manifest would claim the images came from RUN).
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from dataloaders.duplicates import near_duplicates_in
from dataloaders.io import (MASK_SUBDIR, DataError, check_outside_data, find_cases, image_folder, read_id_list,
                            select_cases, set_max_image_pixels)
from generation.data import mask_fractions, read_masks_at, thumbnails
from generation.mask_layouts import pair_layouts
from networks.ldm import sampling_scheduler
from generation.sampling import IMAGE_MASK, generate, image_class, image_noise, image_seed
from utils import distributed
from generation.image_quality import c2st_accuracy, calibrated_memorisation, closest_pairs_image, describe_memorisation
from generation.run import load_sampling_models, open_run, run_conditioning, write_json
from utils.files import atomic_write_text
from utils.locks import carry_into, hold, holds_files, release_held
from utils.cli import run_cli, run_on_device
from generation.sampling_config import (C2ST_FOLDS, GRID, GRID_IMAGES, MANIFEST_COLUMNS, MEMORISATION_SIZE, OPTIONS,
                                       PAIR_COLUMNS, PAIR_COUNT, PAIRS, REPORT, check_values)
from utils.config import ConfigError, parse_config
from utils.plots import image_grid, save_image
from utils.runtime import autocast_dtype, StopRequest
from utils.training import stop_requested, stop_status

EPILOG = """examples:
  python sample_ldm.py --checkpoint runs/ldm_busi_1 --num-images 1000 --out-dir inputs/BUSI_synth_1
  torchrun --nproc_per_node 4 sample_ldm.py --checkpoint runs/ldm_busi_1 --num-images 1000 --out-dir inputs/BUSI_synth_1
  python sample_ldm.py --checkpoint runs/ldm_busi_1 --num-images 200 --class malignant --guidance-scale 2 \\
      --scheduler dpmsolver --steps 25 --out-dir inputs/BUSI_synth_malignant --prefix malignant
"""


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a folder")
    if not out_dir.is_dir() or not holds_files(out_dir):  # (its own lock file aside)
        return
    if not overwrite:
        raise ConfigError(f"--out-dir {out_dir} already holds files; give --overwrite to replace it or "
                          "choose another folder")
    if not (out_dir / "manifest.csv").is_file():
        raise ConfigError(f"refusing to replace {out_dir}: it was not written by sample_ldm.py (no "
                          "manifest.csv); choose another --out-dir")


def class_for_sampling(requested: str, class_names: list[str]) -> int | None:
    """Label index for ``--class NAME``; None for ``all``. Unknown names are a ConfigError."""
    if requested == "all":
        return None
    if not class_names:
        raise ConfigError(f"--class {requested}: this model is unconditional (trained without classes); "
                          "use --class all")
    if requested not in class_names:
        raise ConfigError(f"--class {requested!r} unknown: the model knows {', '.join(class_names)} (or all)")
    return list(class_names).index(requested)


def training_thumbnails(info: dict):
    """The run's training images at 64x64, for the memorisation report and the C2ST."""
    try:
        cases = find_cases(info["data_dir"])
        paths = [image for _, image, _ in select_cases(cases, info["train_ids"], "the run's ldm.json")]
        return thumbnails(paths, MEMORISATION_SIZE)
    except DataError as error:
        raise DataError(f"{error}\n(the memorisation check and the C2ST read the run's training images; "
                        "give --no-check-memorisation --no-c2st to sample without them)") from None


def val_thumbnails(info: dict):
    """The split's val images at 64x64 (never trained on): the memorisation report's reference of how
    near a real image comes to a training image. None when the run has no val list. A val image with an
    exact or near-duplicate among the generator's training images (dataloaders/duplicates.py; BUSI has
    many) is left out: it sits as near to a training image as a copy does, and would calibrate the
    figure to call copies normal."""
    if not info.get("val_file"):
        return None
    try:
        cases = find_cases(info["data_dir"])
        val_file = Path(info["data_dir"]) / Path(info["val_file"]).name  # the split file beside the data
        val = {i: image for i, image, _ in select_cases(cases, read_id_list(val_file), str(val_file))}
        leaks = near_duplicates_in(val, {i: cases[i][0] for i in info["train_ids"] if i in cases})
        if leaks:
            print(f"memorisation: calibrated on {len(val) - len(leaks)} of the {len(val)} val images ({len(leaks)} "
                  "with an exact or near-duplicate among the training images left out)", flush=True)
        return thumbnails([image for i, image in val.items() if i not in leaks], MEMORISATION_SIZE)
    except DataError as error:
        raise DataError(f"{error}\n(the memorisation check reads the split's val images; give "
                        "--no-check-memorisation to sample without it)") from None


def image_classes(cfg: SimpleNamespace, info: dict, label: int | None, layouts: list | None = None
                  ) -> list[int | None]:
    """One label per image: the asked class, or (``all``) drawn from image n's own seed with the
    training frequencies, so that image n is the same whatever --num-images and --batch-size; a pair of a
    class- and mask-conditioned model (``layouts``), with ``all``: the class of its mask's labeled image."""
    if layouts is not None and label is None and info.get("mask_labels") is not None:
        return [info["mask_labels"][source] for _, source, _ in layouts]

    if not info["class_names"]:
        return [None] * cfg.num_images
    if label is not None:
        return [label] * cfg.num_images
    frequencies = np.asarray(info["class_counts"], float)
    frequencies /= frequencies.sum()
    return [image_class(cfg.seed, n, frequencies) for n in range(cfg.num_images)]


def pair_masks(cfg: SimpleNamespace, info: dict) -> list[tuple[np.ndarray, int, str]] | None:
    """A mask-conditioned run's pairs: each image's mask (uint8 0/1 at the image size), the index of its source
    in ldm.json's mask_ids and the augmentation applied (generation/mask_layouts.py); None for another run."""
    if run_conditioning(info) != "mask":
        return None
    try:
        sources = read_masks_at(info["data_dir"], info["mask_ids"], info["image_size"], info.get("mask_values", "binary"))
    except DataError as error:
        raise DataError(f"{error}\n(a mask-conditioned generator makes its images for the masks of its labeled "
                        "training images, read from the run's data folder)") from None
    return pair_layouts(sources, cfg.num_images, cfg.mask_augmentation,
                        lambda n: np.random.default_rng(image_seed(cfg.seed, n, IMAGE_MASK)))


def outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A gray image in colour with its mask's outline in red (the pairs' grid)."""
    colour = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(colour, contours, -1, (0, 0, 255), 1)


def publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished ``partial`` folder to ``out_dir``; an existing --out-dir (--overwrite) is
    moved aside first and deleted only once the new folder is in place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.is_dir() and not holds_files(out_dir):  # empty (the working folder, say): filled, not replaced
        for entry in partial.iterdir():
            entry.rename(out_dir / entry.name)
        partial.rmdir()
        return
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    carry_into(out_dir, partial)  # the new folder is locked by this writer as soon as it is in place
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def denoise_dealt_batches(cfg, ctx, device, stop, models, info: dict, classes: list, names: list[str],
                          folder: Path, layouts: list | None = None) -> tuple[dict, bool]:
    """Denoise this process's share of the images into ``folder``/images, batch by batch, until done or a stop
    request; with ``layouts`` (pair_masks), each image for its mask, written to ``folder``/masks/0 under the
    image's name. (image number -> 64x64 thumbnail for the memorisation report, whether it stopped)."""
    vae, unet, scheduler, amp_dtype = models
    null_label = len(info["class_names"])
    latent_shape = (info["latent_channels"], info["latent_size"], info["latent_size"])
    # the batches of a single-process run, dealt out in turn: each image is denoised in the same
    # batch whatever the number of processes, so its bytes are the same too
    batches = [range(first, min(first + cfg.batch_size, cfg.num_images))
               for first in range(0, cfg.num_images, cfg.batch_size)]
    small, stopping = {}, False
    progress = tqdm(total=cfg.num_images, desc="sampling", unit="image", dynamic_ncols=True,
                    disable=not (cfg.progress and ctx.is_main))
    for round_ in range(math.ceil(len(batches) / ctx.world_size)):
        k = round_ * ctx.world_size + ctx.rank
        if k < len(batches):
            batch = batches[k]
            noise = image_noise(cfg.seed, batch, latent_shape).to(device)
            labels = torch.tensor([classes[n] for n in batch], device=device) if info["class_names"] else None
            masks = None if layouts is None else torch.from_numpy(np.stack([
                mask_fractions(layouts[n][0], info["image_size"], info["latent_size"]) for n in batch]))[:, None]
            images = generate(unet, vae, scheduler, noise, labels, null_label, cfg.guidance_scale,
                              cfg.steps, info["latent_scaling_factor"], amp_dtype,
                              masks=masks.to(device) if masks is not None else None)
            for n, image in zip(batch, images):
                save_image(folder / "images" / names[n], image)
                if layouts is not None:
                    save_image(folder / MASK_SUBDIR / names[n], layouts[n][0].astype(np.uint8) * 255)
                if cfg.check_memorisation or cfg.c2st:  # (the training thumbnails are on rank 0 only)
                    small[n] = cv2.resize(image, (MEMORISATION_SIZE,) * 2, interpolation=cv2.INTER_AREA)
        progress.update(sum(len(b) for b in batches[round_ * ctx.world_size:(round_ + 1) * ctx.world_size]))
        stopping = stop_requested(stop, ctx, device)
        if stopping:
            break
    progress.close()
    return small, stopping


def sample(cfg: SimpleNamespace, ctx, device) -> int:
    """Sample the images this process is dealt; rank 0 publishes the folder. The exit status."""
    diffusers_logging.set_verbosity_error()
    check_values(cfg)
    if device.type == "cuda":  # the same command gives the same bytes: no autotuned, no nondeterministic kernels
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    # From here a signal only sets a flag, acted on after the current batch (every rank agrees).
    with StopRequest() as stop:
        run_dir, out_dir = Path(cfg.checkpoint), Path(cfg.out_dir).absolute()  # '.': a name for its siblings
        requested = getattr(cfg, "class")
        memorisation = {}

        def prepare():
            """The checks (rank 0; every rank raises its errors) and the training thumbnails (rank 0)."""
            hold(out_dir, "sample folder")  # one writer: a second sample_ldm.py into this folder is refused here
            info = open_run(run_dir)
            check_outside_data(out_dir, info.get("data_dir"))
            label = class_for_sampling(requested, info["class_names"])
            if cfg.guidance_scale != 1.0 and not info["class_names"] and run_conditioning(info) != "mask":
                raise ConfigError(f"--guidance-scale {cfg.guidance_scale}: the model in {run_dir} is unconditional "
                                  "(classifier-free guidance needs a class- or mask-conditional model); use 1")
            check_out_dir(out_dir, cfg.overwrite)
            memorisation["training"] = training_thumbnails(info) if cfg.check_memorisation or cfg.c2st else None
            memorisation["val"] = val_thumbnails(info) if cfg.check_memorisation else None
            return info, label, pair_masks(cfg, info)

        info, label, layouts = distributed.on_main_rank(prepare, ctx)
        amp_dtype = autocast_dtype(cfg.precision, device)
        vae, unet, training_schedule = load_sampling_models(run_dir, info)
        vae, unet = vae.to(device).eval(), unet.to(device).eval()
        if cfg.steps > training_schedule.num_train_timesteps:
            raise ConfigError(f"--steps {cfg.steps} exceeds the {training_schedule.num_train_timesteps} "
                              "timesteps the model was trained with")
        scheduler = sampling_scheduler(cfg.scheduler, training_schedule)
        classes = image_classes(cfg, info, label, layouts)
        width = max(4, len(str(cfg.num_images - 1)))
        names = [f"{cfg.prefix}_{n:0{width}d}.png" for n in range(cfg.num_images)]

        partial = out_dir.parent / f".{out_dir.name}.partial"
        if ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
            (partial / "images").mkdir(parents=True)
            if layouts is not None:  # image-mask pairs: the dataset layout, without split files
                (partial / MASK_SUBDIR).mkdir(parents=True)
        distributed.barrier()  # the folder exists before any rank writes into it
        published = False
        try:
            if ctx.is_main:
                where = f"{device} x {ctx.world_size} processes" if ctx.enabled else str(device)
                print(f"sampling {cfg.num_images} images from {run_dir} (denoiser at training step "
                      f"{info['diffusion_step']}; {cfg.scheduler}, {cfg.steps} steps, class {requested}, guidance "
                      f"{cfg.guidance_scale}) on {where}", flush=True)
            small, stopping = denoise_dealt_batches(cfg, ctx, device, stop, (vae, unet, scheduler, amp_dtype), info,
                                                    classes, names, partial, layouts)
            if stopping:
                code = stop_status(stop)
                if ctx.is_main:
                    print(f"stopped by {signal.Signals(code - 128).name}: nothing was written to {out_dir} (the "
                          "images made so far are discarded); run the same command again to sample", file=sys.stderr)
                return code
            gathered = distributed.gather_objects(small)  # also: every rank has written its images
            if ctx.is_main:
                small = {n: t for part in gathered for n, t in part.items()}
                write_outputs(cfg, info, classes, names, run_dir, partial, memorisation["training"],
                              memorisation["val"], small, layouts)
                publish(partial, out_dir)
                published = True
                print(f"wrote {cfg.num_images} images to {out_dir / 'images'}, {out_dir / 'manifest.csv'} and "
                      f"{out_dir / REPORT}; the first {min(GRID_IMAGES, cfg.num_images)} side by side in "
                      f"{out_dir / GRID}")
            distributed.barrier()  # the folder is there when any rank returns
        finally:
            if ctx.is_main and not published:  # an error or a stop: no half-written folder stays behind
                shutil.rmtree(partial, ignore_errors=True)
        return 0


def quality_report(cfg, info: dict, names: list[str], folder: Path, training, val, samples) -> tuple[dict, list, list]:
    """The memorisation figures (memorisation.txt, closest_pairs.png into ``folder``) and the C2ST of
    ``samples`` (uint8 Nx64x64) against the run's training images: (report entries, each sample's
    nearest training id and distance as the manifest writes them)."""
    report = {"c2st_accuracy": None}
    nearest_ids, distances = [""] * len(names), [""] * len(names)
    if cfg.check_memorisation:
        if val is None or not len(val):
            print("memorisation: skipped (the run names no val images to compare with)")
        else:
            figures, d, nearest = calibrated_memorisation(samples, training, val)
            report.update(figures)
            nearest_ids = [info["train_ids"][k] for k in nearest]
            distances = [f"{x:.4f}" for x in d]
            closest = int(d.argmin())
            summary = (describe_memorisation(figures) + f"\nclosest: {names[closest]} to '{nearest_ids[closest]}' at "
                       f"{d[closest]:.3f} (normalised L2 at {MEMORISATION_SIZE}x{MEMORISATION_SIZE}; 0: the same image, "
                       f"about 1.4: unrelated); the {min(PAIR_COUNT, len(d))} closest pairs: {PAIRS} beside this file\n"
                       f"former figure, fraction_closer_than_median_train_nn: "
                       f"{figures['fraction_closer_than_median_train_nn']:.3f} (about 0.5 for a generator that "
                       "copies nothing: no measure of copying)")
            atomic_write_text(folder / "memorisation.txt", summary + "\n")  # a full disk: one error
            save_image(folder / PAIRS, closest_pairs_image(samples, training, d, nearest, PAIR_COUNT))
            print(summary)
    if cfg.c2st:
        count = min(len(samples), len(training))
        if count < C2ST_FOLDS:
            print(f"C2ST skipped: it needs at least {C2ST_FOLDS} samples and training images, got {count}")
        else:
            print(f"C2ST: training a CNN to tell {count} samples from {count} training images "
                  f"({C2ST_FOLDS} folds)...", flush=True)
            accuracy = c2st_accuracy(samples, training, folds=C2ST_FOLDS, seed=cfg.seed)
            report.update(c2st_accuracy=accuracy, c2st={"images_per_set": count, "folds": C2ST_FOLDS,
                                                        "image_size": MEMORISATION_SIZE, "seed": cfg.seed})
            print(f"C2ST accuracy {accuracy:.3f} (held out; 0.5 = samples indistinguishable from training images, "
                  "1.0 = trivially told apart)")
    return report, nearest_ids, distances


def write_outputs(cfg, info: dict, classes: list, names: list[str], run_dir: Path, folder: Path,
                  training, val, small: dict, layouts: list | None = None) -> None:
    """manifest.csv, memorisation.txt, closest_pairs.png and report.json into ``folder``; prints the figures."""
    keys = ("seed", "scheduler", "steps", "guidance_scale", "class", "batch_size", "precision", "prefix") + \
        (("mask_augmentation",) if layouts is not None else ())
    report = {"num_images": cfg.num_images, "checkpoint": str(run_dir.resolve()),
              "diffusion_step": info["diffusion_step"], "pairs": layouts is not None,
              "settings": {key: getattr(cfg, key) for key in keys}}
    samples = np.stack([small[n] for n in range(cfg.num_images)]) if training is not None else None
    figures, nearest_ids, distances = (quality_report(cfg, info, names, folder, training, val, samples)
                                       if training is not None else ({"c2st_accuracy": None}, [""] * len(names),
                                                                     [""] * len(names)))
    report.update(figures)
    checkpoint = str(run_dir.resolve())
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(MANIFEST_COLUMNS if layouts is None else PAIR_COLUMNS)
    for n in range(cfg.num_images):
        class_name = info["class_names"][classes[n]] if classes[n] is not None else "none"
        pair = [] if layouts is None else [f"{MASK_SUBDIR.as_posix()}/{names[n]}", info["mask_ids"][layouts[n][1]],
                                           layouts[n][2]]
        writer.writerow([f"images/{names[n]}", cfg.seed, class_name, cfg.scheduler, cfg.steps,
                         cfg.guidance_scale, checkpoint, nearest_ids[n], distances[n], *pair])
    atomic_write_text(folder / "manifest.csv", table.getvalue())  # a full disk: one error naming it
    write_json(folder / REPORT, report)
    shown = [cv2.imread(str(folder / "images" / name), cv2.IMREAD_GRAYSCALE) for name in names[:GRID_IMAGES]]
    if layouts is not None:  # each image with its mask's outline
        shown = [outlined(image, layouts[n][0]) for n, image in enumerate(shown)]
    save_image(folder / GRID, image_grid(shown, columns=8))


def previous_report(folder: Path) -> dict:
    """How a sample_ldm.py folder's images were made (its report.json's diffusion_step and settings), to keep;
    {} without a report. A report that is not a JSON object is one error, before anything is rewritten."""
    path = folder / REPORT
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        report = error
    if not isinstance(report, dict):
        found = f"cannot be read ({report})" if isinstance(report, Exception) else f"holds a {type(report).__name__}"
        raise DataError(f"--report-only: {path} {found}, where sample_ldm.py writes a JSON object; move it away (the "
                        "report is then written anew) or restore it")
    return {k: v for k, v in report.items() if k in ("diffusion_step", "settings")}


def report_only(cfg) -> int:
    """--report-only: the quality figures of the images already in --out-dir, against the run's data."""
    run_dir, folder = Path(cfg.checkpoint), Path(cfg.out_dir)
    info = open_run(run_dir, need_denoiser=False)
    previous = previous_report(folder)  # before anything is rewritten
    own = {GRID, PAIRS}  # this script's pictures, when they lie among the images themselves
    paths = [p for p in image_folder(folder, "--out-dir") if (folder / "images").is_dir() or p.name not in own]
    if not paths:
        raise DataError(f"--report-only: no images in {folder} (looked in {folder}/images and {folder})")
    samples = thumbnails(paths, MEMORISATION_SIZE)
    training = training_thumbnails(info)
    val = val_thumbnails(info) if cfg.check_memorisation else None
    print(f"quality figures of the {len(paths)} images of {folder} against {run_dir}'s {len(training)} training "
          f"images{'' if val is None else f' and {len(val)} val images'}", flush=True)
    figures, _, _ = quality_report(cfg, info, [p.name for p in paths], folder, training, val, samples)
    write_json(folder / REPORT, {"num_images": len(paths), "checkpoint": str(run_dir.resolve()), **previous,
                                 "report_only": True, "images": str((folder / "images").resolve()
                                                                    if (folder / "images").is_dir() else folder.resolve()),
                                 **figures})
    print(f"wrote {folder / REPORT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Sample; the exit status. Bad input raises ConfigError / DataError / CheckpointError, which
    utils.cli.run_cli turns into one error line and status 2."""

    cfg = parse_config(OPTIONS, __doc__, argv, epilog=EPILOG)
    if cfg.report_only:  # no device and no process group: run_on_device's pixel limit and lock release alone
        set_max_image_pixels(cfg.max_image_pixels)
        if cfg.checkpoint is None or cfg.out_dir is None:
            raise ConfigError("--report-only needs --checkpoint (the run whose training and val images are compared "
                              "with) and --out-dir (the folder of images)")
        try:
            hold(cfg.out_dir, "sample folder")  # one writer: no sampling into the folder while its report is made
            return report_only(cfg)
        finally:
            release_held()
    return run_on_device(cfg, sample)


if __name__ == "__main__":
    run_cli(main)
