"""Sample synthetic ultrasound images from a latent diffusion model trained by train_ldm.py.

Writes <out-dir>/images/<prefix>_<n>.png (gray, 8-bit, the training size) and <out-dir>/manifest.csv
(file, seed, class, scheduler, steps, guidance, checkpoint, nearest training image and distance),
a folder that train.py takes unchanged as --unlabeled-dir. Image n is drawn from seed --seed + n,
so any image can be made again on its own. The folder appears only when every image is written.

The memorisation report (on by default) gives each sample's distance to its nearest training image
(normalised L2 at 64x64, mirror images included) and the fraction of samples nearer to a training
image than two training images typically are to each other: a generator that copies its training
images shows up there.
"""
from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from utils.config import ConfigError, Option, optional, parse_config

EPILOG = """examples:
  python sample_ldm.py --checkpoint runs/ldm_busi_1 --num-images 1000 --out-dir inputs/BUSI_synth_1
  python sample_ldm.py --checkpoint runs/ldm_busi_1 --num-images 200 --class malignant --guidance-scale 2 \\
      --scheduler dpmsolver --steps 25 --out-dir inputs/BUSI_synth_malignant --prefix malignant
"""
MANIFEST_COLUMNS = ["file", "seed", "class", "scheduler", "steps", "guidance", "checkpoint",
                    "nearest_train_id", "nearest_distance"]
MEMORISATION_SIZE = 64

OPTIONS = [
    Option("checkpoint", None, "run folder written by train_ldm.py (holding ldm.json, vae/, unet_ema/)",
           type=optional(str)),
    Option("num_images", 100, "number of images to make"),
    Option("out_dir", None, "output folder: images/ and manifest.csv are written there", type=optional(str)),
    Option("batch_size", 16, "images denoised together"),
    Option("scheduler", "ddim", "sampler: ddim or dpmsolver (DPM-Solver++)", choices=("ddim", "dpmsolver")),
    Option("steps", 50, "denoising steps"),
    Option("guidance_scale", 1.0, "classifier-free guidance scale (class-conditional models; 1 = none)"),
    Option("class", "all", "class of the images for a class-conditional model, or all (classes drawn "
           "with their training frequencies)"),
    Option("seed", 0, "image n is drawn from seed + n"),
    Option("prefix", "synth", "file names are <prefix>_<n>.png"),
    Option("check_memorisation", True, "report each sample's distance to its nearest training image "
           "(needs the run's training images)"),
    Option("overwrite", False, "replace --out-dir when it already holds images", in_file=False),
    Option("precision", "auto", "autocast precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
           choices=("auto", "bf16", "fp32")),
    Option("device", "auto", "auto, cpu, cuda or cuda:N", in_file=False),
    Option("progress", True, "show progress bars", in_file=False),
]


def check_values(cfg: SimpleNamespace) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("give --checkpoint (the run folder written by train_ldm.py)")
    if cfg.out_dir is None:
        raise ConfigError("give --out-dir (the folder to write images/ and manifest.csv into)")
    for name in ("num_images", "batch_size", "steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.guidance_scale < 0:
        raise ConfigError(f"guidance_scale must not be negative, got {cfg.guidance_scale}")
    if cfg.seed < 0:
        raise ConfigError(f"seed must not be negative, got {cfg.seed}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.prefix):
        raise ConfigError(f"prefix {cfg.prefix!r} must be letters, digits, '_', '-' or '.' (it names files)")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out-dir {out_dir} already holds files; give --overwrite to replace it or "
                          "choose another folder")
    if not (out_dir / "manifest.csv").is_file():
        raise ConfigError(f"refusing to replace {out_dir}: it was not written by sample_ldm.py (no "
                          "manifest.csv); choose another --out-dir")


def training_thumbnails(info: dict):
    """The run's training images at 64x64, for the memorisation report."""
    from dataloaders.io import DataError, find_cases, select_cases
    from dataloaders.ldm_data import thumbnails

    try:
        cases = find_cases(info["data_dir"])
        paths = [image for _, image, _ in select_cases(cases, info["train_ids"], "the run's ldm.json")]
        return thumbnails(paths, MEMORISATION_SIZE)
    except DataError as error:
        raise DataError(f"{error}\n(the memorisation check reads the run's training images; give "
                        "--no-check-memorisation to sample without it)") from None


def image_classes(cfg: SimpleNamespace, info: dict, label: int | None) -> list[int | None]:
    """One label per image: the asked class, or (``all``) drawn from image n's own seed with the
    training frequencies, so that image n is the same whatever --num-images and --batch-size."""
    import numpy as np

    if not info["class_names"]:
        return [None] * cfg.num_images
    if label is not None:
        return [label] * cfg.num_images
    frequencies = np.asarray(info["class_counts"], float)
    frequencies /= frequencies.sum()
    return [int(np.random.default_rng(cfg.seed + n).choice(len(frequencies), p=frequencies))
            for n in range(cfg.num_images)]


def sample(cfg: SimpleNamespace) -> Path:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are read from the run folder, never downloaded
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    from networks.ldm import (EMA_DIR, SCHEDULER_DIR, VAE_DIR, class_for_sampling, generate,
                              nearest_training_images, open_run, sampling_scheduler, typical_training_distance)
    from utils.plots import save_image
    from utils.runtime import autocast_dtype, resolve_device

    diffusers_logging.set_verbosity_error()
    check_values(cfg)
    run_dir, out_dir = Path(cfg.checkpoint), Path(cfg.out_dir)
    info = open_run(run_dir)
    requested = getattr(cfg, "class")
    label = class_for_sampling(requested, info["class_names"])
    if cfg.guidance_scale != 1.0 and not info["class_names"]:
        raise ConfigError(f"--guidance-scale {cfg.guidance_scale}: the model in {run_dir} is unconditional "
                          "(classifier-free guidance needs a class-conditional model); use 1")
    check_out_dir(out_dir, cfg.overwrite)
    training = training_thumbnails(info) if cfg.check_memorisation else None
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.precision, device)

    vae = AutoencoderKL.from_pretrained(run_dir / VAE_DIR).to(device).eval()
    unet = UNet2DModel.from_pretrained(run_dir / EMA_DIR).to(device).eval()
    training_schedule = DDPMScheduler.from_pretrained(run_dir / SCHEDULER_DIR).config
    if cfg.steps > training_schedule.num_train_timesteps:
        raise ConfigError(f"--steps {cfg.steps} exceeds the {training_schedule.num_train_timesteps} "
                          "timesteps the model was trained with")
    scheduler = sampling_scheduler(cfg.scheduler, training_schedule)
    classes = image_classes(cfg, info, label)
    null_label = len(info["class_names"])
    latent_shape = (info["latent_channels"], info["latent_size"], info["latent_size"])
    width = max(4, len(str(cfg.num_images - 1)))
    names = [f"{cfg.prefix}_{n:0{width}d}.png" for n in range(cfg.num_images)]

    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    (partial / "images").mkdir(parents=True)
    try:
        samples = []
        print(f"sampling {cfg.num_images} images from {run_dir} (denoiser at training step {info['diffusion_step']}; "
              f"{cfg.scheduler}, {cfg.steps} steps, class {requested}, guidance {cfg.guidance_scale}) on {device}")
        for first in tqdm(range(0, cfg.num_images, cfg.batch_size), desc="sampling", unit="batch",
                          dynamic_ncols=True, disable=not cfg.progress):
            batch = range(first, min(first + cfg.batch_size, cfg.num_images))
            # Noise drawn on the CPU, one generator per image: the same image on any device and batch size.
            noise = torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed + n))
                               for n in batch]).to(device)
            labels = (torch.tensor([classes[n] for n in batch], device=device)
                      if info["class_names"] else None)
            images = generate(unet, vae, scheduler, noise, labels, null_label, cfg.guidance_scale, cfg.steps,
                              info["latent_scaling_factor"], amp_dtype)
            for n, image in zip(batch, images):
                save_image(partial / "images" / names[n], image)
            samples.append(images)
        samples = np.concatenate(samples)

        nearest_ids, distances, summary = [""] * cfg.num_images, [""] * cfg.num_images, None
        if training is not None:
            import cv2
            small = np.stack([cv2.resize(s, (MEMORISATION_SIZE,) * 2, interpolation=cv2.INTER_AREA) for s in samples])
            d, nearest = nearest_training_images(small, training)
            typical = typical_training_distance(training)
            nearest_ids = [info["train_ids"][k] for k in nearest]
            distances = [f"{x:.4f}" for x in d]
            closest = int(d.argmin())
            summary = (f"memorisation: {int((d < typical).sum())} of {len(d)} samples ({np.mean(d < typical):.1%}) "
                       f"are nearer to a training image than the typical distance between two training "
                       f"images ({typical:.3f}, normalised L2 at {MEMORISATION_SIZE}x{MEMORISATION_SIZE}); "
                       f"median sample distance {np.median(d):.3f}; closest: {names[closest]} to "
                       f"'{nearest_ids[closest]}' at {d[closest]:.3f}")
            (partial / "memorisation.txt").write_text(summary + "\n")

        checkpoint = str(run_dir.resolve())
        with (partial / "manifest.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_COLUMNS)
            for n in range(cfg.num_images):
                class_name = info["class_names"][classes[n]] if classes[n] is not None else "none"
                writer.writerow([f"images/{names[n]}", cfg.seed + n, class_name, cfg.scheduler, cfg.steps,
                                 cfg.guidance_scale, checkpoint, nearest_ids[n], distances[n]])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if summary:
        print(summary)
    print(f"wrote {cfg.num_images} images to {out_dir / 'images'} and {out_dir / 'manifest.csv'}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from dataloaders.io import DataError
    from utils.checkpoint import CheckpointError

    try:
        cfg = parse_config(OPTIONS, __doc__, argv, epilog=EPILOG)
        sample(cfg)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
