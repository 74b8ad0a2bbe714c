"""The settings of stage 1 (train_ldm.py): its options (flags, YAML keys and --help), their checks,
and which of them a continued run may change.

Library code, so that the benchmarks (benchmarks/bench_ldm.py) and reproduce.py read a stage-1
configuration exactly as train_ldm.py does.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from dataloaders.io import MASK_VALUES, MAX_IMAGE_PIXELS_OPTION
from networks.ldm import CONDITIONINGS, check_architecture
from utils.config import ConfigError, Option, optional, read_yaml

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
    Option("conditioning", "none", "what the denoiser is conditioned on besides the class: none, or mask (the "
           "lesion mask brought to the latent's size, concatenated to its input as extra channels; it then learns "
           "from the labeled images only, labeled_fraction or labeled_list as train.py selects them, while the "
           "autoencoder learns from every training image). sample_ldm.py then makes image-mask pairs",
           choices=CONDITIONINGS),
    Option("mask_dropout", 0.1, "conditioning mask: probability of dropping the mask during training, so that "
           "the denoiser also learns unconditionally (classifier-free guidance, sample_ldm.py --guidance-scale)"),
    Option("labeled_fraction", 0.5, "conditioning mask: the denoiser learns from the first labeled_fraction of "
           "the training list (less the holdout), the images train.py --labeled-fraction labels"),
    Option("labeled_list", None, "conditioning mask: file of the labeled ids (train.py --labeled-list) instead "
           "of labeled_fraction", type=optional(str)),
    Option("mask_values", "binary", "conditioning mask: how masks are read, as train.py --mask-values",
           choices=MASK_VALUES),
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
    Option("precision", "auto", "autocast precision: auto (bf16 on a CUDA GPU of compute capability 8.0 or newer, else fp32), bf16 or fp32",
           choices=("auto", "bf16", "fp32")),
    Option("num_workers", 4, "data-loader worker processes (autoencoder stage; per process under torchrun)"),
    Option("log_every", 50, "steps between loss records (CSV and PNG plot)"),
    Option("sample_every", 2000, "steps between preview grids (reconstructions / samples); 0 = only at the end"),
    Option("checkpoint_every", 2000, "steps between checkpoints (always at the end)"),
    Option("preview_images", 8, "images in a preview grid"),
    Option("preview_steps", 50, "DDIM steps of the preview samples"),
    Option("progress", True, "show progress bars", in_file=False),
    MAX_IMAGE_PIXELS_OPTION,
    Option("tensorboard", True, "write TensorBoard logs to <out-dir>/tensorboard/vae and .../diffusion (losses, lr, "
           "the autoencoder's val PSNR/SSIM, the preview grids); rank 0 only", in_file=False),
]
# May differ on --resume: they change how long or how visibly the run goes, not what it learns.
FREE_KEYS = {"vae_steps", "diffusion_steps", "precision", "num_workers", "log_every", "sample_every",
             "checkpoint_every", "preview_images", "preview_steps",
             "data_dir", "class_csv"}  # moved files: the ids and classes are checked against ldm.json
# May differ from the run's config.yaml when the diffusion stage starts fresh on a trained autoencoder.
DIFFUSION_KEYS = {"unet_channels", "unet_layers_per_block", "unet_norm_groups", "unet_mid_attention",
                  "unet_dropout", "batch_size", "lr", "train_timesteps", "beta_schedule", "beta_start", "beta_end",
                  "prediction_type", "diffusion_loss", "class_dropout", "ema_decay", "ema_power",
                  "class_conditioning", "conditioning", "mask_dropout", "labeled_fraction", "labeled_list",
                  "mask_values"}


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
    require(0 <= cfg.mask_dropout < 1, f"mask_dropout must be in [0, 1), got {cfg.mask_dropout}")
    require(0 < cfg.labeled_fraction <= 1, f"labeled_fraction must be in (0, 1], got {cfg.labeled_fraction}")
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
    for key in ("data_dir", "class_csv", "labeled_list"):
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
    given.update({name: getattr(cfg, name) for name in cfg.explicit if name in {o.name for o in OPTIONS if o.in_file}})
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
