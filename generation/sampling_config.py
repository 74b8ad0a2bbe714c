"""sample_ldm.py's settings: its options (flags, YAML keys and --help), their checks, and the constants
of its outputs that other modules read (the protocol's estimate: C2ST_FOLDS, MEMORISATION_SIZE).

Kept out of the script so that a library module (protocol/plan.py, protocol/estimate.py) can read them
without importing a script; sample_ldm.py imports them back from here.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

from generation.mask_layouts import AUGMENTATIONS
from utils.pixel_limit import MAX_IMAGE_PIXELS_OPTION
from utils.config import ConfigError, Option, between, optional

MANIFEST_COLUMNS = ["file", "seed", "class", "scheduler", "steps", "guidance", "checkpoint",
                    "nearest_train_id", "nearest_distance"]
# a mask-conditioned run's pairs: each image's mask file, the labeled id it was made from, and how it was moved
PAIR_COLUMNS = MANIFEST_COLUMNS + ["mask", "mask_source", "mask_augmentation"]
MEMORISATION_SIZE = 64  # the size at which samples and training images are compared (both checks)
REPORT = "report.json"
GRID, GRID_IMAGES = "grid.png", 64  # the first images side by side, for people to look at
PAIRS, PAIR_COUNT = "closest_pairs.png", 8  # the samples nearest to a training image, above those images
C2ST_FOLDS = 5
MAX_GUIDANCE = 100.0
MAX_IMAGES = 1_000_000  # 1e9 spent minutes listing names before the first image, deaf to SIGTERM

OPTIONS = [
    Option("checkpoint", None, "run folder written by train_ldm.py (holding ldm.json, vae/, unet_ema/)",
           type=optional(str)),
    Option("num_images", 100, "number of images to make",
           check=between(1, MAX_IMAGES, " (one folder's worth: sample larger sets in several folders with --seed)")),
    Option("out_dir", None, "output folder: images/ and manifest.csv are written there", type=optional(str)),
    Option("batch_size", 16, "images denoised together (per process under torchrun)"),
    Option("scheduler", "ddim", "sampler: ddim or dpmsolver (DPM-Solver++)", choices=("ddim", "dpmsolver")),
    Option("steps", 50, "denoising steps"),
    Option("guidance_scale", 1.0, "classifier-free guidance scale (class- or mask-conditional models; 1 = none): "
           "the conditional prediction c and the unconditional one u (no class, no mask) mixed as u + s (c - u)",
           check=between(0, MAX_GUIDANCE, " (beyond a few tens every image saturates; from 1e30 on the "
                                          "denoiser's numbers overflow to black images)")),
    Option("class", "all", "class of the images for a class-conditional model, or all (classes drawn "
           "with their training frequencies; a mask-conditioned model's pair: the class of its mask's image)"),
    Option("mask_augmentation", "both", "mask-conditioned models (train_ldm.py --conditioning mask), which make "
           "image-mask pairs: pair n takes the run's labeled mask n mod M; from the second pass over the M masks on, "
           "it is moved to a new layout from pair n's seed: none, affine, elastic or both (lesion count kept; "
           "docs/generation.md)", choices=AUGMENTATIONS),
    Option("seed", 0, "image n is drawn from numbers derived from (seed, n): another seed shares no image"),
    Option("prefix", "synth", "file names are <prefix>_<n>.png"),
    Option("check_memorisation", True, "report each sample's distance to its nearest training image "
           "(needs the run's training images)"),
    Option("c2st", True, "classifier two-sample test of the samples against the run's training images "
           "(needs them; about a minute on a CPU for a few hundred images)"),
    Option("report_only", False, "make no image: compute report.json, memorisation.txt and closest_pairs.png "
           "again for the images already in --out-dir (<out-dir>/images/* or <out-dir>/*), e.g. another "
           "generator's or real images as a control, against --checkpoint's training and val images",
           in_file=False),
    Option("overwrite", False, "replace --out-dir when it already holds images", in_file=False),
    Option("precision", "auto", "autocast precision: auto (bf16 on a CUDA GPU of compute capability 8.0 or newer, else fp32), bf16 or fp32",
           choices=("auto", "bf16", "fp32")),
    Option("device", "auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda means each process's own GPU, "
           "LOCAL_RANK)", in_file=False),
    Option("progress", True, "show progress bars", in_file=False),
    MAX_IMAGE_PIXELS_OPTION,
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
