"""Stage 1 of MGCC: train the latent diffusion model that makes synthetic ultrasound images.

Two stages, both on the training images of one split only (never a validation image):
  vae        an AutoencoderKL (diffusers) learns to compress the images to latents:
             loss L1 + (1 - SSIM) + KL (+ an optional patch-discriminator term);
  diffusion  a UNet2DModel (diffusers) learns to denoise the frozen autoencoder's latents
             (DDPM, epsilon prediction, L1 loss), optionally conditioned on the class, with an EMA
             copy of its weights used for sampling.
--stage all runs both. The run folder gets config.yaml, ldm.json, vae/, unet/, unet_ema/ (diffusers
save_pretrained), state files for --resume, preview grids and loss plots. Then sample with
sample_ldm.py --checkpoint <run folder>.

Several GPUs: torchrun --nproc_per_node N train_ldm.py ... (the same flags; gloo on CPU, NCCL on
GPUs). --vae-batch-size and --batch-size are then global, per step over all processes, and must
split evenly over them: each process takes its own slice of every batch and the gradients are
averaged (DistributedDataParallel), so N processes learn what one process does with the same
batch sizes. Rank 0 alone writes the run folder; the saved networks are plain diffusers models
that single-process scripts read, and --resume works across any number of processes. Both
networks normalise with GroupNorm, which keeps no batch statistics: there is nothing to
synchronise, hence no --sync-bn option (unlike train.py).

Stopping: SIGINT or SIGTERM (under torchrun: to torchrun, which passes it on) finishes the current
step, writes the checkpoint and exits with status 128 + the signal number; continue with --resume.
After kill -9 or a crash, --resume continues from the last checkpoint (--checkpoint-every). A
non-finite loss stops the run (status 3) naming the step, its last checkpoint untouched; bad
input and unusable run folders or state files exit with status 2 and one error line.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.io import dataset_name
from dataloaders.ldm_data import load_training_set, StepBatchSampler, TrainingImages
from networks.ldm import (IMAGE_CHANNELS, STREAM_DIFFUSION, STREAM_PREVIEW, STREAM_VAE, AutoencoderPass, build_unet,
                          build_vae, check_architecture, latent_scaling_factor, latent_size, noise_scheduler,
                          parameter_counts, PatchDiscriminator, sampling_scheduler)
from networks.ldm_sampling import decode, generate, to_uint8
from utils import distributed
from utils.checkpoint import atomic_save, CheckpointError, load_checkpoint
from utils.cli import run_cli
from utils.config import ConfigError, Option, file_values, optional, parse_config, read_yaml, save_yaml
from utils.image_quality import psnr, ssim
from utils.ldm_run import (DIFFUSION_STATE, EMA_DIR, KIND, load_model, PREVIEW_DIR, read_run_info, RUN_INFO,
                           save_model, SCHEDULER_DIR, UNET_DIR, VAE_DIR, VAE_METRICS, VAE_STATE, write_json,
                           write_run_info)
from utils.plots import image_grid, plot_curves, save_image
from utils.runtime import (autocast, autocast_dtype, derived_seed, ignore_stop_signals, resolve_device, rng_state,
                           set_rng_state, step_generator, StopRequest)

EPILOG = """examples:
  python train_ldm.py --config configs/ldm_busi.yaml --data-dir inputs/BUSI --split 1 --out-dir runs/ldm_busi_1
  python train_ldm.py --config configs/ldm_busi.yaml --out-dir runs/ldm_busi_1 --resume
  torchrun --nproc_per_node 4 train_ldm.py --config configs/ldm_busi.yaml --data-dir inputs/BUSI --out-dir runs/ldm_busi_1
  python train_ldm.py --config configs/ldm_tiny.yaml --data-dir inputs/BUSI --out-dir runs/ldm_tiny --device cpu
"""


OPTIONS = [
    # data and run
    Option("data_dir", None, "dataset folder (images/, masks/0/, <name>_train<i>.txt); only the ids of "
           "the training list of --split are used", type=optional(str)),
    Option("split", 1, "split index i: trains on <name>_train<i>.txt, refuses ids of <name>_val<i>.txt"),
    Option("split_name", None, "prefix of the split files (<name>_train<i>.txt); none: the data folder's name lower-cased, or "
           "the prefix of the only *_train<i>.txt there", type=optional(str)),
    Option("holdout", 0.0, "leave out the last F of the training list: the ids train.py --holdout F selects on, "
           "which a generator whose samples serve that run must not see"),
    Option("out_dir", None, "run folder; none: runs/ldm_<dataset>_<split>", type=optional(str), in_file=False),
    Option("stage", "all", "what to train: vae, diffusion (on a run whose autoencoder is trained) or all",
           choices=("vae", "diffusion", "all"), in_file=False),
    Option("resume", False, "continue the run in --out-dir where its last checkpoint stopped; the step "
           "counts may be raised, other settings must be those of the run", in_file=False),
    Option("overwrite", False, "start the run in --out-dir over (with --stage diffusion: only its "
           "diffusion stage, keeping the autoencoder)", in_file=False),
    Option("device", "auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda means each process's own GPU, "
           "LOCAL_RANK)", in_file=False),
    Option("seed", 0, "seed of the initial weights, the data order, the augmentation and the noise"),
    Option("image_size", 256, "images are resized to image_size x image_size (gray, [-1, 1])"),
    Option("class_conditioning", True, "condition the denoiser on the class when classes are given "
           "(class_names or class_csv); otherwise, or with --no-class-conditioning, unconditional"),
    Option("class_names", [], "class names; an id's class is the name it starts with (BUSI: benign, "
           "malignant)", repeatable=True),
    Option("class_csv", None, "CSV of 'id,class' rows giving each training id's class (instead of the "
           "id prefix)", type=optional(str)),
    # autoencoder
    Option("vae_channels", [64, 128, 256, 512], "autoencoder block widths (one block per entry; the "
           "image is halved len-1 times)", type=int, repeatable=True),
    Option("vae_layers_per_block", 2, "resnet layers per autoencoder block"),
    Option("vae_latent_channels", 8, "latent channels"),
    Option("vae_norm_groups", 32, "group-norm groups in the autoencoder (must divide every width)"),
    Option("vae_mid_attention", False, "self-attention in the autoencoder's middle block"),
    Option("vae_steps", 20000, "autoencoder training steps"),
    Option("vae_batch_size", 8, "autoencoder batch size; under torchrun the global batch, split evenly over "
           "the processes"),
    Option("vae_lr", 1e-4, "autoencoder learning rate (AdamW)"),
    Option("l1_weight", 1.0, "weight of the L1 reconstruction loss"),
    Option("ssim_weight", 1.0, "weight of the (1 - SSIM) reconstruction loss"),
    Option("kl_weight", 1e-6, "weight of the KL term; the KL is summed over the latent's elements and divided "
           "by the image's pixels (C x H x W), so that against the per-pixel mean reconstruction losses it "
           "weighs what kl_weight weighs in medfusion / Stable Diffusion (summed KL vs summed reconstruction)"),
    Option("disc_weight", 0.0, "weight of the patch-discriminator (hinge) term; 0 = no discriminator"),
    Option("disc_start", 10000, "autoencoder step at which the discriminator term starts"),
    Option("disc_channels", 64, "width of the discriminator's first layer"),
    Option("disc_layers", 3, "downsampling layers of the discriminator"),
    Option("disc_lr", 1e-4, "discriminator learning rate (AdamW, betas 0.5, 0.9)"),
    # denoiser
    Option("unet_channels", [256, 256, 512, 1024], "denoiser block widths (no attention blocks)",
           type=int, repeatable=True),
    Option("unet_layers_per_block", 2, "resnet layers per denoiser block"),
    Option("unet_norm_groups", 32, "group-norm groups in the denoiser (must divide every width)"),
    Option("unet_mid_attention", False, "self-attention in the denoiser's middle block"),
    Option("unet_dropout", 0.0, "dropout in the denoiser's resnet blocks against memorising a small training "
           "set (DDPM used 0.1 at 32x32); 0 = none"),
    Option("diffusion_steps", 50000, "denoiser training steps"),
    Option("batch_size", 32, "denoiser batch size (latents); under torchrun the global batch, split evenly "
           "over the processes"),
    Option("lr", 1e-4, "denoiser learning rate (AdamW)"),
    Option("train_timesteps", 1000, "diffusion timesteps of the noise schedule"),
    Option("beta_schedule", "scaled_linear", "noise schedule",
           choices=("linear", "scaled_linear", "squaredcos_cap_v2")),
    Option("beta_start", 0.002, "first beta of the noise schedule"),
    Option("beta_end", 0.02, "last beta of the noise schedule"),
    Option("prediction_type", "epsilon", "what the denoiser predicts", choices=("epsilon", "v_prediction")),
    Option("diffusion_loss", "l1", "denoiser loss", choices=("l1", "l2")),
    Option("class_dropout", 0.1, "probability of dropping the class during training (classifier-free guidance)"),
    Option("ema_decay", 0.9999, "largest EMA decay of the denoiser weights"),
    Option("ema_power", 0.75, "EMA warm-up exponent: decay = 1 - (1 + step) ** -power, capped at ema_decay"),
    # both stages
    Option("weight_decay", 0.01, "AdamW weight decay"),
    Option("warmup_steps", 500, "linear learning-rate warm-up steps, then constant"),
    Option("grad_clip", 1.0, "gradient norm clipping; 0 = none"),
    Option("precision", "auto", "autocast precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
           choices=("auto", "bf16", "fp32")),
    Option("num_workers", 4, "data-loader worker processes (autoencoder stage; per process under torchrun)"),
    Option("log_every", 50, "steps between loss records (CSV and PNG plot)"),
    Option("sample_every", 2000, "steps between preview grids (reconstructions / samples); 0 = only at the end"),
    Option("checkpoint_every", 2000, "steps between checkpoints (always at the end)"),
    Option("preview_images", 8, "images in a preview grid"),
    Option("preview_steps", 50, "DDIM steps of the preview samples"),
    Option("progress", True, "show progress bars", in_file=False),
]
FILE_KEYS = {o.name for o in OPTIONS if o.in_file}
# May differ on --resume: they change how long or how visibly the run goes, not what it learns.
FREE_KEYS = {"vae_steps", "diffusion_steps", "precision", "num_workers", "log_every", "sample_every",
             "checkpoint_every", "preview_images", "preview_steps",
             "data_dir", "class_csv"}  # moved files: the ids and classes are checked against ldm.json
# May differ from the run's config.yaml when the diffusion stage starts fresh on a trained autoencoder.
DIFFUSION_KEYS = {"unet_channels", "unet_layers_per_block", "unet_norm_groups", "unet_mid_attention",
                  "unet_dropout", "batch_size", "lr", "train_timesteps", "beta_schedule", "beta_start", "beta_end",
                  "prediction_type", "diffusion_loss", "class_dropout", "ema_decay", "ema_power",
                  "class_conditioning"}
# each stage's state file (for --resume) and the kind recorded in it
STATE_FILES = {"vae": (VAE_STATE, "mgcc-ldm-vae-state"), "diffusion": (DIFFUSION_STATE, "mgcc-ldm-diffusion-state")}


# ----------------------------------------------------------------------------------------------
# configuration and run folder
# ----------------------------------------------------------------------------------------------

def check_values(cfg: SimpleNamespace, world_size: int = 1) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    for name in ("image_size", "vae_layers_per_block", "vae_latent_channels", "vae_batch_size",
                 "unet_layers_per_block", "batch_size", "log_every", "checkpoint_every",
                 "disc_channels", "disc_layers", "preview_steps"):
        require(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("vae_steps", "diffusion_steps", "disc_start", "num_workers", "sample_every",
                 "preview_images", "warmup_steps", "l1_weight", "ssim_weight", "kl_weight",
                 "disc_weight", "weight_decay", "grad_clip"):
        require(getattr(cfg, name) >= 0, f"{name} must not be negative, got {getattr(cfg, name)}")
    for name in ("vae_lr", "lr", "disc_lr"):
        require(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.stage in ("vae", "all"):
        require(cfg.vae_steps >= 1, f"vae_steps must be at least 1 to train the autoencoder, got {cfg.vae_steps}")
    if cfg.stage in ("diffusion", "all"):
        require(cfg.diffusion_steps >= 1, f"diffusion_steps must be at least 1, got {cfg.diffusion_steps}")
    require(cfg.train_timesteps >= 2, f"train_timesteps must be at least 2, got {cfg.train_timesteps}")
    require(cfg.preview_steps <= cfg.train_timesteps,
            f"preview_steps {cfg.preview_steps} exceeds train_timesteps {cfg.train_timesteps}")
    require(0 < cfg.beta_start < cfg.beta_end < 1,
            f"need 0 < beta_start < beta_end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    require(0 <= cfg.class_dropout < 1, f"class_dropout must be in [0, 1), got {cfg.class_dropout}")
    require(0 <= cfg.unet_dropout < 1, f"unet_dropout must be in [0, 1), got {cfg.unet_dropout}")
    require(0 <= cfg.ema_decay <= 1, f"ema_decay must be in [0, 1], got {cfg.ema_decay}")
    require(cfg.ema_power > 0, f"ema_power must be positive, got {cfg.ema_power}")
    require(not (cfg.resume and cfg.overwrite), "give --resume or --overwrite, not both")
    for name in ("vae_batch_size", "batch_size"):
        require(getattr(cfg, name) % world_size == 0,
                f"{name} {getattr(cfg, name)} is the global batch under torchrun and must split evenly over "
                f"the {world_size} processes")
    check_architecture(cfg)


def absolute_paths(values: dict) -> dict:
    """Paths are kept absolute, so that a run compares and resumes from any working folder."""
    for key in ("data_dir", "class_csv"):
        if values.get(key) is not None:
            values[key] = str(Path(values[key]).expanduser().resolve())
    return values


def merged_config(cfg: SimpleNamespace, run_dir: Path, may_change: set[str]) -> SimpleNamespace:
    """The configuration of a run that is continued: its config.yaml, then the values given now.

    A value given now that differs from the run's is an error unless it only changes the length or
    the output of the run (FREE_KEYS) or belongs to a stage that starts afresh (``may_change``).
    """
    saved = absolute_paths(read_yaml(run_dir / "config.yaml", OPTIONS))
    given = {}
    if cfg.config is not None:
        given.update(read_yaml(Path(cfg.config), OPTIONS))
    given.update({name: getattr(cfg, name) for name in cfg.explicit if name in FILE_KEYS})
    given = absolute_paths(given)
    changed = [f"  {key}: {saved[key]!r} in the run, {value!r} now" for key, value in sorted(given.items())
               if key in saved and value != saved[key] and key not in FREE_KEYS | may_change]
    if changed:
        raise ConfigError(f"the run in {run_dir} was made with other settings (its config.yaml); a "
                          "continued run keeps them:\n" + "\n".join(changed)
                          + "\n(use another --out-dir, or --overwrite to start over)")
    values = {o.name: getattr(cfg, o.name) for o in OPTIONS}
    values.update(saved)
    values.update(given)
    return SimpleNamespace(**values, config=cfg.config, explicit=cfg.explicit)


def load_data(cfg: SimpleNamespace):
    if cfg.data_dir is None:
        raise ConfigError("give --data-dir (the dataset folder whose training images the model learns)")
    class_names = cfg.class_names if cfg.class_conditioning else []
    class_csv = cfg.class_csv if cfg.class_conditioning else None
    return load_training_set(cfg.data_dir, cfg.split, class_names, class_csv, progress=cfg.progress,
                             split_name=cfg.split_name, holdout=cfg.holdout)


def new_run_info(cfg: SimpleNamespace, data) -> dict:
    counts = [data.labels.count(k) for k in range(len(data.class_names))] if data.labels is not None else []
    return {"kind": KIND, "version": 1, "image_size": cfg.image_size, "channels": IMAGE_CHANNELS,
            "latent_channels": cfg.vae_latent_channels, "latent_size": latent_size(cfg),
            "latent_scaling_factor": None, "class_names": data.class_names, "class_counts": counts,
            "data_dir": str(Path(cfg.data_dir).resolve()), "split": cfg.split,
            "train_file": str(data.train_file), "val_file": str(data.val_file) if data.val_file else None,
            "train_ids": data.ids, "vae_step": 0, "diffusion_step": 0}


def remove_diffusion_outputs(run_dir: Path, info: dict) -> None:
    for name in (UNET_DIR, EMA_DIR, SCHEDULER_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for path in [run_dir / DIFFUSION_STATE, run_dir / "losses_diffusion.csv", run_dir / "losses_diffusion.png",
                 *(run_dir / PREVIEW_DIR).glob("diffusion_*.png")]:
        path.unlink(missing_ok=True)
    info.update(diffusion_step=0, latent_scaling_factor=None)
    write_run_info(run_dir, info)


def prepare_run(cfg: SimpleNamespace, run_dir: Path, world_size: int = 1):
    """Decide what the command means for the run folder; return (cfg, ldm.json dict, training set).

    Nothing is written or deleted before the configuration and the data have been checked. Under
    torchrun rank 0 alone calls this (see utils.distributed.on_main_rank).
    """

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out-dir {run_dir} is a file, not a folder")
    is_run = (run_dir / RUN_INFO).is_file()
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run:
        segmenter = " (it holds checkpoint_last.pt: a segmenter run of train.py?)" \
            if (run_dir / "checkpoint_last.pt").exists() else ""
        raise ConfigError(f"--out-dir {run_dir} exists and is not a train_ldm.py run folder (no {RUN_INFO})"
                          f"{segmenter}; " + ("--resume continues a run folder of train_ldm.py" if cfg.resume
                                             else "choose another folder (nothing was changed)"))
    wants_diffusion = cfg.stage in ("diffusion", "all")
    if is_run:
        info = read_run_info(run_dir)
        has_diffusion = (run_dir / DIFFUSION_STATE).is_file()
        if cfg.overwrite and cfg.stage != "diffusion":
            is_run = False  # started over below, once the data are checked
        elif not cfg.resume and not cfg.overwrite and not (cfg.stage == "diffusion" and not has_diffusion):
            raise ConfigError(f"{run_dir} already holds a run; give --resume to continue it or "
                              "--overwrite to start it over")
    if not is_run:
        if cfg.resume:
            raise ConfigError(f"--resume: there is no run to continue in {run_dir}")
        if cfg.stage == "diffusion":
            raise ConfigError(f"--stage diffusion needs a run folder with a trained autoencoder and "
                              f"{run_dir} holds none: train it with --stage vae first, or use --stage all")
        data = load_data(cfg)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        info = new_run_info(cfg, data)
        save_yaml(file_values(cfg, OPTIONS), run_dir / "config.yaml")
        write_run_info(run_dir, info)
        return cfg, info, data

    fresh_diffusion = wants_diffusion and (cfg.overwrite or not has_diffusion)
    cfg = merged_config(cfg, run_dir, DIFFUSION_KEYS if fresh_diffusion else set())
    check_values(cfg, world_size)
    vae_step, diffusion_step = info["vae_step"], 0 if fresh_diffusion else info["diffusion_step"]
    if cfg.vae_steps < vae_step:
        raise ConfigError(f"the run's autoencoder has trained {vae_step} steps, more than --vae-steps {cfg.vae_steps}")
    if cfg.diffusion_steps < diffusion_step:
        raise ConfigError(f"the run's denoiser has trained {diffusion_step} steps, more than "
                          f"--diffusion-steps {cfg.diffusion_steps}")
    if cfg.stage == "diffusion" and vae_step < cfg.vae_steps:
        raise ConfigError(f"the run's autoencoder has trained {vae_step} of {cfg.vae_steps} steps: "
                          "finish it first with --stage vae --resume (or --stage all --resume)")
    if cfg.stage != "diffusion" and vae_step < cfg.vae_steps and has_diffusion:
        raise ConfigError(f"the run's denoiser was trained on the latents of its autoencoder at step {vae_step}; "
                          "training the autoencoder further would invalidate it (use --overwrite to start over)")
    data = load_data(cfg)
    if data.ids != info["train_ids"]:
        raise ConfigError(f"the training list {data.train_file} changed since the run in {run_dir} started; "
                          "a continued run must learn from the same images")
    info["data_dir"] = cfg.data_dir  # where the memorisation check of sample_ldm.py finds the images
    if fresh_diffusion:  # classes matter to the denoiser only, which starts afresh here
        fresh = new_run_info(cfg, data)
        info.update(class_names=fresh["class_names"], class_counts=fresh["class_counts"])
    elif data.class_names != info["class_names"]:
        raise ConfigError(f"the classes of the training images changed since the run in {run_dir} started "
                          f"({info['class_names']} then, {data.class_names} now)")
    if cfg.overwrite:
        remove_diffusion_outputs(run_dir, info)
    save_yaml(file_values(cfg, OPTIONS), run_dir / "config.yaml")
    write_run_info(run_dir, info)
    return cfg, info, data


# ----------------------------------------------------------------------------------------------
# shared training pieces
# ----------------------------------------------------------------------------------------------

class LossLog:
    """Averages of the losses over each window of ``log_every`` steps, kept in the state file so
    that a resumed run's curves continue exactly from its checkpoint.

    Under torchrun each process holds the losses of its own slice of the batch; a window's means
    are averaged over the processes (equal slices: the mean over the global batch), so every rank
    records the same row and every rank stops at the same step when one of them went non-finite.
    """

    def __init__(self, what: str, history: list[dict] | None = None):
        self.what = what
        self.history = list(history or [])
        self.window: dict[str, list] = defaultdict(list)

    def add(self, **values) -> None:
        for key, value in values.items():
            self.window[key].append(value.detach())

    def flush(self, step: int, state_path: Path) -> dict:
        """Record the window's means; a non-finite loss stops the run, its last checkpoint untouched."""
        means, first_bad = {}, None
        for key, values in self.window.items():
            values = torch.stack(values).float().cpu()
            means[key] = float(values.mean())
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):  # the key's values are those of the window's last len(values) steps
                at = step - len(values) + 1 + int(bad[0])
                first_bad = at if first_bad is None else min(first_bad, at)
        self.window.clear()
        ranks = distributed.gather_objects((means, first_bad))
        row = {"step": step, **{k: sum(m[k] for m, _ in ranks) / len(ranks) for k in means}}
        bad_steps = [b for _, b in ranks if b is not None]
        if bad_steps or not all(math.isfinite(v) for v in row.values()):
            first = min(bad_steps) if bad_steps else step
            kept = (f"its last checkpoint {state_path} is untouched" if state_path.is_file()
                    else "no checkpoint was written")
            terms = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
            raise FloatingPointError(f"non-finite {self.what} loss at step {first} (means of steps up to {step}: "
                                     f"{terms}): stopped; {kept}. A lower learning rate or --grad-clip needs a "
                                     "new run (--overwrite)")
        self.history.append(row)
        return row

    def write(self, run_dir: Path, stage: str, title: str, panels: dict[str, dict[str, str]]) -> None:
        """losses_<stage>.csv and losses_<stage>.png; panels: {panel title: {curve label: column}}."""
        if not self.history:
            return
        columns = ["step"] + sorted({k for row in self.history for k in row} - {"step"})
        with (run_dir / f"losses_{stage}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        figure = {}
        for panel, curves in panels.items():
            drawn = {label: ([r["step"] for r in self.history if column in r],
                             [r[column] for r in self.history if column in r]) for label, column in curves.items()}
            drawn = {label: xy for label, xy in drawn.items() if xy[0]}
            if drawn:
                figure[panel] = drawn
        plot_curves(run_dir / f"losses_{stage}.png", figure, xlabel="step", title=f"{title} training losses")


def due(step: int, every: int, last: int) -> bool:
    """After ``step`` steps: every ``every`` steps and always at the end (every = 0: only the end)."""
    return step == last or (every > 0 and step % every == 0)


def optimizer_and_schedule(parameters, lr: float, cfg: SimpleNamespace, betas=(0.9, 0.999), weight_decay=None):
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=betas,
                                  weight_decay=cfg.weight_decay if weight_decay is None else weight_decay)
    return optimizer, get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)


def optimizer_update(loss: torch.Tensor, parameters, optimizer, schedule, grad_clip: float) -> None:
    """One update of a stage: backward, gradient-norm clipping (grad_clip > 0), AdamW and schedule steps."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    schedule.step()


def read_state(path: Path, kind: str, what: str):
    """The state file --resume continues from, or None before the stage's first checkpoint."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path, kind)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; expected the {what} training state that train_ldm.py writes there "
                              f"(kind {kind!r}). The run cannot continue from it: start the stage over with "
                              "--overwrite, or use another --out-dir") from None


def rank_rng_state(saved, ctx) -> dict:
    """This process's RNG state from a state file (one per rank): its own when the number of
    processes is unchanged, else rank 0's (a run resumed on another number of processes)."""
    states = saved if isinstance(saved, list) else [saved]
    return states[ctx.rank] if len(states) == ctx.world_size else states[0]


def check_finite_weights(modules, step: int, state_path: Path, device) -> None:
    """Never checkpoint non-finite weights (a finite loss can still step to them): they would
    poison --resume. Every rank raises together."""
    bad = any(not torch.isfinite(p).all() for m in modules if m is not None for p in m.parameters())
    if distributed.any_rank(bad, device):
        kept = (f"its last checkpoint {state_path} is untouched" if state_path.is_file()
                else "no checkpoint was written")
        raise FloatingPointError(f"non-finite weights after step {step}: stopped; {kept}. A lower learning "
                                 "rate or --grad-clip needs a new run (--overwrite)")


def wrap_ddp(module, ctx, device):
    """DistributedDataParallel under torchrun (gradients averaged over the processes), else the module."""
    if not ctx.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def stop_now(stop, ctx, device) -> bool:
    """Whether to stop after this step: a signal reached this process or, under torchrun, any."""
    return distributed.any_rank(bool(stop), device) if ctx.enabled else bool(stop)


def stopped(stop, what: str, step: int, run_dir: Path, stage: str, ctx) -> int:
    """Report a stop by a signal; the exit status 128 + signal number (the same on every rank)."""
    number = max(distributed.gather_objects(stop.signal_number))
    if ctx.is_main:
        launcher = f"torchrun --nproc_per_node {ctx.world_size}" if ctx.enabled else "python"
        print(f"{what}: stopped by {signal.Signals(number).name} at step {step}; checkpoint written. Continue "
              f"with:\n  {launcher} train_ldm.py --out-dir {run_dir} --stage {stage} --resume", file=sys.stderr)
    return 128 + number


def report_speed(name: str, last_step: int, timer: tuple[int, float] | None) -> None:
    """Steps per second since the end of this invocation's first step (start-up and warm-up left out)."""
    if timer is None or last_step <= timer[0]:
        return
    steps, seconds = last_step - timer[0], time.perf_counter() - timer[1]
    print(f"{name}: {steps} steps in {seconds:.1f} s ({steps / seconds:.2f} it/s, after the first step)")


@contextlib.contextmanager
def ema_weights(ema, model):
    """``model`` holds the EMA weights inside the block, its own again after it."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


class Stage:
    """The skeleton both stages share, so that a change to it is made once: the state file that
    --resume continues from, the restored weights, optimizers and random state, and after each
    training step the progress bar, loss records, previews, checkpoints (weights checked finite,
    models and state written, ldm.json updated), a stop on a signal and at the end the speed report.

    Use: ``stage = Stage(...)``; return when ``stage.finished()``; build the networks;
    ``stage.restore(model=..., optimizer=..., ...)`` (the parts kept in the state file);
    ``stage.begin(save_models, save_preview, panels, postfix)``; after each step
    ``if stage.after_step(step): break``; ``return stage.finish()``.
    """

    def __init__(self, name: str, what: str, total: int, cfg: SimpleNamespace, run_dir: Path, info: dict,
                 ctx, device, stop):
        self.name, self.what, self.total, self.cfg = name, what, total, cfg  # name: "vae" or "diffusion"
        self.run_dir, self.info, self.ctx, self.device, self.stop = run_dir, info, ctx, device, stop
        state_file, self.kind = STATE_FILES[name]
        self.state_path = run_dir / state_file
        self.state = read_state(self.state_path, self.kind, what)
        self.start = self.state["step"] if self.state else 0
        self.log = LossLog(what, self.state["history"] if self.state else None)
        self.parts: dict = {}

    def finished(self) -> bool:
        """True (and said) when the stage has already trained its steps."""
        if self.start >= self.total and self.ctx.is_main:
            print(f"{self.what}: already trained for {self.start} steps")
        return self.start >= self.total

    def restore(self, **parts) -> None:
        """Keep ``parts`` (objects with state_dict / load_state_dict, or None) in the state file under
        their names, and load them and the random state from it when the stage is continued."""
        self.parts = parts
        if not self.state:
            return
        for key, part in parts.items():
            if part is not None:
                part.load_state_dict(self.state[key])
        set_rng_state(rank_rng_state(self.state["rng"], self.ctx))
        if self.ctx.is_main:
            print(f"{self.what}: resuming at step {self.start} of {self.total}")

    def begin(self, save_models, save_preview, panels: dict[str, dict[str, str]], postfix) -> None:
        """Start the loop. ``save_models()`` writes the networks into the run folder (rank 0),
        ``save_preview(step)`` a preview grid (rank 0), ``panels`` are the loss plot's panels and
        ``postfix(row)`` the progress bar's figures."""
        self.save_models, self.save_preview, self.panels, self.postfix = save_models, save_preview, panels, postfix
        if self.ctx.is_main:
            (self.run_dir / PREVIEW_DIR).mkdir(exist_ok=True)
        self.bar = tqdm(total=self.total, initial=self.start, desc=self.what, dynamic_ncols=True,
                        disable=not (self.cfg.progress and self.ctx.is_main))
        self.done, self.stopping, self.timer = self.start, False, None

    def save_checkpoint(self, step: int) -> None:
        modules = [p for p in self.parts.values() if isinstance(p, torch.nn.Module)]
        check_finite_weights(modules, step, self.state_path, self.device)
        rng = distributed.gather_objects(rng_state())  # one per rank
        self.info[f"{self.name}_step"] = step
        if not self.ctx.is_main:
            return
        self.save_models()
        atomic_save({"kind": self.kind, "step": step,
                     **{key: part.state_dict() if part is not None else None for key, part in self.parts.items()},
                     "history": self.log.history, "rng": rng}, self.state_path)
        write_run_info(self.run_dir, self.info)
        self.log.write(self.run_dir, self.name, self.what, self.panels)

    def after_step(self, step: int) -> bool:
        """The bookkeeping after training step ``step``; True when the loop must stop."""
        cfg, done = self.cfg, step + 1
        self.done = done
        self.stopping = stop_now(self.stop, self.ctx, self.device)  # read once, agreed by every rank
        self.bar.update(1)
        checkpoint = due(done, cfg.checkpoint_every, self.total) or self.stopping
        # the losses are checked before any checkpoint: a non-finite one never overwrites a good state
        if due(done, cfg.log_every, self.total) or checkpoint:
            self.bar.set_postfix(self.postfix(self.log.flush(done, self.state_path)))
        if due(done, cfg.sample_every, self.total) and self.ctx.is_main:
            self.save_preview(done)
        if checkpoint:
            self.save_checkpoint(done)
        if self.timer is None and not self.stopping:
            self.timer = (done, time.perf_counter())  # the speed report leaves the first step out
        return self.stopping

    def finish(self) -> int:
        """0, or 128 + the signal number when a signal stopped the stage early."""
        self.bar.close()
        distributed.barrier()  # rank 0 has written this stage's models before any rank reads them
        if self.stopping and self.done < self.total:
            stage = self.name if self.cfg.stage == self.name else "all"
            return stopped(self.stop, self.what, self.done, self.run_dir, stage, self.ctx)
        if self.ctx.is_main:
            report_speed(self.what, self.total, self.timer)
        return 0


def kl_per_pixel(kl: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The KL term as the autoencoder's loss weighs it: the KL summed over the latent (per image)
    divided by the pixels of one image, C x H x W.

    medfusion and Stable Diffusion add kl_weight x (KL summed over the latent) to a reconstruction
    loss *summed* over the pixels (both averaged over the batch). The reconstruction terms here are
    means over the pixels, i.e. that sum divided by C x H x W; dividing the KL by the same number
    keeps their ratio, so kl_weight = 1e-6 means here what it means there, at any image size.
    (Without it the KL would weigh C x H x W times more: 65,536 x at 256x256.)"""
    return kl / images[0].numel()


def vae_losses(vae_pass, disc, images, noise, cfg: SimpleNamespace, device, amp_dtype, adversarial: bool):
    """The autoencoder's loss of one step: L1 + (1 - SSIM) + KL / pixels (+ the generator's hinge term when
    ``adversarial``). ``noise``: this process's unit posterior noise. Returns (loss, reconstruction,
    the logged terms). benchmarks/bench_ldm.py times it."""
    with autocast(device, amp_dtype):
        moments, reconstruction = vae_pass(images, noise)
    reconstruction = reconstruction.float()
    l1 = (reconstruction - images).abs().mean()
    one_minus_ssim = 1 - ssim(reconstruction, images)
    kl = DiagonalGaussianDistribution(moments.float()).kl().mean()  # summed over the latent, mean over images
    loss = (cfg.l1_weight * l1 + cfg.ssim_weight * one_minus_ssim
            + cfg.kl_weight * kl_per_pixel(kl, images))
    terms = {"l1": l1, "one_minus_ssim": one_minus_ssim, "kl": kl}
    if adversarial:
        disc.requires_grad_(False)  # the generator term trains the autoencoder only
        with autocast(device, amp_dtype):
            generator_loss = -disc(reconstruction).float().mean()
        disc.requires_grad_(True)
        loss = loss + cfg.disc_weight * generator_loss
        terms["generator"] = generator_loss
    return loss, reconstruction, terms


def discriminator_loss(disc_pass, images, reconstruction, device, amp_dtype):
    """Hinge loss of the patch discriminator, real and (detached) fake images in one forward:
    DDP synchronises one backward per forward."""
    with autocast(device, amp_dtype):
        real, fake = disc_pass(torch.cat([images, reconstruction.detach()])).float().chunk(2)
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def diffusion_loss(denoiser, scheduler, means, stds, labels_of, batch, rng, scaling: float, cfg: SimpleNamespace,
                   device, amp_dtype, null_label: int, mine: slice = slice(0, None, 1)):
    """The denoiser's loss of one step on the encoded training set (posterior ``means``, ``stds`` of
    each image and its mirror image). ``batch``: the global StepBatchSampler batch; ``mine``: this
    process's items of it. Every random number is drawn for the whole batch and sliced: each item
    gets the numbers it gets in a single-process run. benchmarks/bench_ldm.py times it."""
    size = len(batch)
    index = torch.tensor([i for i, _ in batch], device=device)[mine]
    flip = torch.tensor([int(f) for _, f in batch], device=device)[mine]
    mean, std = means[index, flip], stds[index, flip]
    shape = (size, *means.shape[2:])
    latents = (mean + std * torch.randn(shape, generator=rng, device=device)[mine]) * scaling
    noise = torch.randn(shape, generator=rng, device=device)[mine]
    timesteps = torch.randint(0, cfg.train_timesteps, (size,), generator=rng, device=device)[mine]
    labels = None
    if labels_of is not None:
        dropped = (torch.rand(size, generator=rng, device=device) < cfg.class_dropout)[mine]
        labels = torch.where(dropped, torch.full_like(index, null_label), labels_of[index])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    with autocast(device, amp_dtype):
        prediction = denoiser(noisy, timesteps, class_labels=labels).sample.float()
    return F.l1_loss(prediction, target) if cfg.diffusion_loss == "l1" else F.mse_loss(prediction, target)


# ----------------------------------------------------------------------------------------------
# stage 1a: the autoencoder
# ----------------------------------------------------------------------------------------------

def train_vae(cfg: SimpleNamespace, run_dir: Path, info: dict, data, device, ctx, stop) -> int:
    """Train (or continue) the autoencoder, then measure it on the validation images; 0, or
    128 + signal number when stopped by a signal."""
    stage = Stage("vae", "autoencoder", cfg.vae_steps, cfg, run_dir, info, ctx, device, stop)
    if stage.finished():
        if ctx.is_main and not (run_dir / VAE_METRICS).is_file():  # e.g. stopped before its evaluation
            evaluate_vae(load_model("vae", run_dir / VAE_DIR, "autoencoder").to(device).eval(), data, cfg, run_dir,
                         device)
        distributed.barrier()
        return 0
    amp_dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device)
    optimizer, schedule = optimizer_and_schedule(vae.parameters(), cfg.vae_lr, cfg)
    disc = disc_optimizer = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    stage.restore(model=vae, optimizer=optimizer, schedule=schedule, disc=disc, disc_optimizer=disc_optimizer)
    vae_pass = wrap_ddp(AutoencoderPass(vae), ctx, device)
    disc_pass = wrap_ddp(disc, ctx, device) if disc is not None else None

    dataset = TrainingImages(data.paths, data.labels, cfg.image_size)
    sampler = StepBatchSampler(len(dataset), cfg.vae_batch_size, cfg.seed, stage.start, cfg.vae_steps,
                               ctx.rank, ctx.world_size)
    # The loader's own generator seeds its workers: it leaves the global RNG alone (exact resume).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(derived_seed(cfg.seed, stage.start, STREAM_VAE)))
    latent_shape = (cfg.vae_latent_channels, latent_size(cfg), latent_size(cfg))
    preview = torch.stack([dataset[(i, False)][0] for i in range(min(cfg.preview_images, len(dataset)))]) \
        if cfg.preview_images > 0 and ctx.is_main else None

    def save_preview(step: int) -> None:
        if preview is not None:
            grid = image_grid(list(to_uint8(preview)) + list(to_uint8(reconstruct(vae, preview.to(device)))),
                              columns=len(preview))
            save_image(run_dir / PREVIEW_DIR / f"vae_step{step:07d}.png", grid)

    vae.train()
    stage.begin(lambda: save_model(vae, run_dir / VAE_DIR), save_preview,
                {"total": {"loss": "loss"}, "reconstruction": {"L1": "l1", "1 - SSIM": "one_minus_ssim"},
                 "KL (summed over the latent, per image)": {"KL": "kl"},
                 "adversarial": {"generator": "generator", "discriminator": "discriminator"}},
                postfix=lambda row: dict(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}",
                                         ssim=f"{1 - row['one_minus_ssim']:.3f}"))
    for step, (images, _) in zip(range(stage.start, cfg.vae_steps), loader):
        images = images.to(device, non_blocking=True)
        rng = step_generator(cfg.seed, step, STREAM_VAE, device)
        # the posterior noise of the whole batch, then this rank's slice: the same numbers for each
        # image as in a single-process run
        noise = torch.randn((cfg.vae_batch_size, *latent_shape), generator=rng, device=device)
        adversarial = disc is not None and step >= cfg.disc_start
        loss, reconstruction, terms = vae_losses(vae_pass, disc, images, noise[ctx.rank::ctx.world_size], cfg,
                                                 device, amp_dtype, adversarial)
        optimizer_update(loss, vae.parameters(), optimizer, schedule, cfg.grad_clip)
        if adversarial:
            disc_loss = discriminator_loss(disc_pass, images, reconstruction, device, amp_dtype)
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            disc_optimizer.step()
            terms["discriminator"] = disc_loss
        stage.log.add(loss=loss, **terms)
        if stage.after_step(step):
            break
    code = stage.finish()
    if code == 0 and ctx.is_main:
        evaluate_vae(vae.eval(), data, cfg, run_dir, device)
    distributed.barrier()  # the other ranks wait for the evaluation (rank 0) before the next stage
    return code


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstruction of ``images`` from the posterior mean, in fp32."""
    return decode(vae, vae.encode(images.float()).latent_dist.mode())


def evaluate_vae(vae, data, cfg: SimpleNamespace, run_dir: Path, device, batch_size: int = 16) -> dict | None:
    """PSNR and SSIM of the autoencoder's reconstructions of the split's validation images (never
    trained on: this measures what it does on images it has not seen), means over the images,
    written to <run>/vae_metrics.json and printed. None when the split has no validation images."""
    if not data.val_paths:
        print(f"autoencoder: no validation images (no {data.val_file or 'validation list'}): "
              f"{VAE_METRICS} not written")
        return None
    images = TrainingImages(data.val_paths, None, cfg.image_size)
    psnrs, ssims = [], []
    for first in tqdm(range(0, len(images), batch_size), desc="autoencoder on the validation images", leave=False,
                      disable=not cfg.progress):
        batch = torch.stack([images[(i, False)][0]
                             for i in range(first, min(first + batch_size, len(images)))]).to(device)
        reconstruction = reconstruct(vae, batch).clamp(-1, 1)
        psnrs.append(psnr(reconstruction, batch))
        ssims.append(ssim(reconstruction, batch, reduction="none"))
    metrics = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
               "images": len(images), "image_size": cfg.image_size, "val_file": str(data.val_file),
               "vae_step": cfg.vae_steps, "data_range": "images in [-1, 1] (range 2), reconstruction clamped; "
               "posterior mean decoded in fp32; SSIM with an 11x11 gaussian window (sigma 1.5)"}
    write_json(run_dir / VAE_METRICS, metrics)
    print(f"autoencoder on the {len(images)} validation images of {Path(data.val_file).name} (never trained on): "
          f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} ({run_dir / VAE_METRICS})")
    return metrics


# ----------------------------------------------------------------------------------------------
# stage 1b: the denoiser on the frozen autoencoder's latents
# ----------------------------------------------------------------------------------------------

def encode_training_set(vae, dataset, device, batch_size: int, progress: bool = True):
    """Posterior mean and std of every training image and of its mirror image: (N, 2, C, h, w) each.

    The autoencoder is frozen, so each image is encoded once (fp32) instead of at every step.
    Under torchrun every process encodes all images in the same batches as a single process: the
    latents, and the latent scaling factor, are those of a single-process run.
    """

    items = [(i, flip) for i in range(len(dataset)) for flip in (False, True)]
    means, stds = [], []
    with torch.no_grad():
        for first in tqdm(range(0, len(items), batch_size), desc="encoding training images", leave=False,
                          disable=not progress):
            images = torch.stack([dataset[item][0] for item in items[first:first + batch_size]]).to(device)
            posterior = vae.encode(images).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    shape = (len(dataset), 2, *means[0].shape[1:])
    return torch.cat(means).reshape(shape), torch.cat(stds).reshape(shape)


def train_diffusion(cfg: SimpleNamespace, run_dir: Path, info: dict, data, device, ctx, stop) -> int:
    """Train (or continue) the denoiser on the frozen autoencoder's latents; 0, or 128 + signal
    number when stopped by a signal."""
    stage = Stage("diffusion", "denoiser", cfg.diffusion_steps, cfg, run_dir, info, ctx, device, stop)
    if stage.finished():
        return 0
    amp_dtype = autocast_dtype(cfg.precision, device)
    vae = load_model("vae", run_dir / VAE_DIR, "autoencoder").to(device).eval().requires_grad_(False)
    dataset = TrainingImages(data.paths, data.labels, cfg.image_size)
    means, stds = encode_training_set(vae, dataset, device, cfg.batch_size, cfg.progress and ctx.is_main)
    if info["latent_scaling_factor"] is None:
        # rank 0's value on every rank (GPUs may differ in the last bits): the one written to ldm.json
        info["latent_scaling_factor"] = distributed.broadcast_object(latent_scaling_factor(means))
        if ctx.is_main:
            write_run_info(run_dir, info)
    scaling = info["latent_scaling_factor"]
    if ctx.is_main:
        print(f"latent scaling factor: {scaling:.5f} (1 / std of the training latents)")

    num_classes = len(data.class_names)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, num_classes).to(device)
    # every rank keeps the EMA of the same (synchronised) weights: the copies stay identical
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power, foreach=True)
    scheduler = noise_scheduler(cfg)
    optimizer, schedule = optimizer_and_schedule(unet.parameters(), cfg.lr, cfg)
    stage.restore(model=unet, ema=ema, optimizer=optimizer, schedule=schedule)
    ema.to(device)
    denoiser = wrap_ddp(unet, ctx, device)

    labels_of = torch.tensor(data.labels, device=device) if data.labels is not None else None
    null_label = num_classes  # the extra embedding: "no class" (classifier-free guidance)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, stage.start, cfg.diffusion_steps)
    mine = slice(ctx.rank, None, ctx.world_size)  # this rank's items of each global batch
    latent_shape = means.shape[2:]
    preview_noise = torch.randn((cfg.preview_images, *latent_shape),
                                generator=torch.Generator().manual_seed(derived_seed(cfg.seed, 0, STREAM_PREVIEW)))
    preview_labels = (torch.arange(cfg.preview_images, device=device) % num_classes) if num_classes else None

    def save_preview(step: int) -> None:
        if cfg.preview_images == 0:
            return
        unet.eval()
        with ema_weights(ema, unet):
            images = generate(unet, vae, sampling_scheduler("ddim", scheduler.config), preview_noise.to(device),
                              preview_labels, null_label, 1.0, cfg.preview_steps, scaling, amp_dtype)
        unet.train()
        save_image(run_dir / PREVIEW_DIR / f"diffusion_step{step:07d}.png", image_grid(list(images), columns=8))

    def save_models() -> None:
        save_model(unet, run_dir / UNET_DIR)
        with ema_weights(ema, unet):
            save_model(unet, run_dir / EMA_DIR)
        save_model(scheduler, run_dir / SCHEDULER_DIR)

    unet.train()
    stage.begin(save_models, save_preview, {"denoising loss": {cfg.diffusion_loss: "loss"}},
                postfix=lambda row: dict(loss=f"{row['loss']:.4f}"))
    for step in range(stage.start, cfg.diffusion_steps):
        rng = step_generator(cfg.seed, step, STREAM_DIFFUSION, device)
        loss = diffusion_loss(denoiser, scheduler, means, stds, labels_of, sampler.batch(step), rng, scaling, cfg,
                              device, amp_dtype, null_label, mine)
        optimizer_update(loss, unet.parameters(), optimizer, schedule, cfg.grad_clip)
        ema.step(unet.parameters())
        stage.log.add(loss=loss)
        if stage.after_step(step):
            break
    return stage.finish()


# ----------------------------------------------------------------------------------------------

def train(cfg: SimpleNamespace, ctx, device) -> int:
    """Run the stages the configuration asks for; the exit status (0, or 128 + signal number when
    stopped by a signal)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from config, never downloaded


    diffusers_logging.set_verbosity_error()
    check_values(cfg, ctx.world_size)
    cfg.data_dir = absolute_paths({"data_dir": cfg.data_dir})["data_dir"]
    cfg.class_csv = absolute_paths({"class_csv": cfg.class_csv})["class_csv"]
    if cfg.out_dir is None:
        if cfg.data_dir is None:
            raise ConfigError("give --out-dir (the run folder) or --data-dir (to name it runs/ldm_<dataset>_<split>)")
        cfg.out_dir = f"runs/ldm_{dataset_name(cfg.data_dir)}_{cfg.split}"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    run_dir = Path(cfg.out_dir)
    # From here a signal only sets a flag: the run folder is never left half-prepared, and the
    # training loops act on it after their current step.
    with StopRequest() as stop:
        # rank 0 checks the data and settles the run folder; the others get its outcome (or its error)
        cfg, info, data = distributed.on_main_rank(lambda: prepare_run(cfg, run_dir, ctx.world_size), ctx)
        if ctx.is_main:
            counts = parameter_counts(cfg, len(info["class_names"]))
            classes = (f"{len(info['class_names'])} classes ({', '.join(info['class_names'])})"
                       if info["class_names"] else "unconditional")
            where = f"{device} x {ctx.world_size} processes" if ctx.enabled else str(device)
            print(f"run {run_dir}: {len(data.ids)} training images of {data.train_file.name}, {classes}, on {where}")
            print(f"autoencoder {counts['vae']:,} parameters, denoiser {counts['unet']:,} parameters; latents "
                  f"{info['latent_channels']}x{info['latent_size']}x{info['latent_size']} for images "
                  f"{cfg.image_size}x{cfg.image_size}", flush=True)
        if cfg.stage in ("vae", "all"):
            code = train_vae(cfg, run_dir, info, data, device, ctx, stop)
            if code:
                return code
        if cfg.stage in ("diffusion", "all"):
            code = train_diffusion(cfg, run_dir, info, data, device, ctx, stop)
            if code:
                return code
    if ctx.is_main:
        print(f"done: {run_dir}" + (f" (sample with: python sample_ldm.py --checkpoint {run_dir} --out-dir <folder>)"
                                    if cfg.stage != "vae" else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; the exit status. Bad input raises ConfigError / DataError / CheckpointError and a
    diverged run FloatingPointError: utils.cli.run_cli turns them into one error line (status 2, 3)."""

    cfg = parse_config(OPTIONS, __doc__, argv, epilog=EPILOG)
    ctx, device = distributed.setup(resolve_device(cfg.device))
    try:
        return train(cfg, ctx, device)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
