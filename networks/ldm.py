"""Stage 1 of MGCC: the networks of the latent diffusion model, built from the configuration.

diffusers' AutoencoderKL and UNet2DModel (no hub download), the noise schedulers, the optional
patch discriminator of the autoencoder loss, the optimizer, the encoded training set, and the
checks of the sizes. The other concerns of stage 1 have their own homes: generation/losses.py
(the losses of both stages), generation/sampling.py (the denoising loop and the seeds of the
images), generation/image_quality.py (SSIM, PSNR, memorisation, C2ST, the autoencoder's evaluation),
generation/run.py (the run folder and the stages' skeleton).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from networks import count_parameters
from utils.config import ConfigError

IMAGE_CHANNELS = 1  # ultrasound images are grayscale
# A mask-conditioned denoiser (conditioning: mask) takes two channels more than the latent: the mask at the
# latent's size (each cell's lesion fraction, in [0, 1]) and a "mask known" channel (1; 0 where the mask is
# dropped for classifier-free guidance). The second channel keeps "no mask" apart from "no lesion" (an empty
# mask, as BUSI's normal images have), which a single channel of zeros would confuse.
MASK_CHANNELS = 2
CONDITIONINGS = ("none", "mask")

# Independent random streams of train_ldm.py, derived from (seed, step, stream) with
# utils.runtime.step_generator: a resumed run draws exactly the numbers an uninterrupted one would,
# whatever happened before (workers, previews, restarts).
STREAM_VAE, STREAM_DIFFUSION, STREAM_PREVIEW = 1, 2, 3


# ----------------------------------------------------------------------------------------------
# networks and schedulers, built from the configuration
# ----------------------------------------------------------------------------------------------

def latent_size(cfg: SimpleNamespace) -> int:
    """AutoencoderKL halves the resolution in every encoder block but the last."""
    return cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)


def vae_config(cfg: SimpleNamespace) -> dict[str, Any]:
    blocks = len(cfg.vae_channels)
    return dict(in_channels=IMAGE_CHANNELS, out_channels=IMAGE_CHANNELS,
                down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                block_out_channels=tuple(cfg.vae_channels), layers_per_block=cfg.vae_layers_per_block,
                latent_channels=cfg.vae_latent_channels, norm_num_groups=cfg.vae_norm_groups,
                sample_size=cfg.image_size, mid_block_add_attention=cfg.vae_mid_attention)


def condition_channels(cfg: SimpleNamespace) -> int:
    """Input channels the denoiser takes besides the latent: MASK_CHANNELS for a mask-conditioned model."""
    return MASK_CHANNELS if getattr(cfg, "conditioning", "none") == "mask" else 0


def mask_channels(fractions: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The denoiser's extra input of a mask-conditioned model: (B, 2, h, w) from the masks at the latent's
    size ``fractions`` (B, 1, h, w, lesion fraction per cell) and ``known`` (B,) bool: where False (the mask
    dropped, classifier-free guidance) both channels are 0, else (fraction, 1)."""
    keep = known.to(fractions.dtype).view(-1, 1, 1, 1)
    return torch.cat([fractions * keep, keep.expand_as(fractions)], dim=1)


def unet_config(cfg: SimpleNamespace, num_classes: int) -> dict[str, Any]:
    """The denoiser on the latents. A conditional model gets one class embedding more than there
    are classes: the last one is the "no class" label of classifier-free guidance. A mask-conditioned
    one takes the mask channels concatenated to its input (segmentation-guided diffusion, Konz et al.
    2024), and still predicts the latent's channels."""
    blocks = len(cfg.unet_channels)
    return dict(sample_size=latent_size(cfg), in_channels=cfg.vae_latent_channels + condition_channels(cfg),
                out_channels=cfg.vae_latent_channels,
                down_block_types=("DownBlock2D",) * blocks, up_block_types=("UpBlock2D",) * blocks,
                block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
                norm_num_groups=cfg.unet_norm_groups, add_attention=cfg.unet_mid_attention,
                dropout=cfg.unet_dropout, num_class_embeds=num_classes + 1 if num_classes else None)


def build_vae(cfg: SimpleNamespace):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**vae_config(cfg))


def build_unet(cfg: SimpleNamespace, num_classes: int):
    from diffusers import UNet2DModel
    return UNet2DModel(**unet_config(cfg, num_classes))


def noise_scheduler(cfg: SimpleNamespace):
    """The training noise schedule. No clipping: latents are not bounded to [-1, 1]. Trailing
    timestep spacing lets DDIM / DPM-Solver start from the last (pure-noise) step."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="trailing")


def sampling_scheduler(name: str, training_config: dict):
    """DDIM or DPM-Solver++ on the noise schedule the denoiser was trained with."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    if name == "ddim":
        return DDIMScheduler.from_config(training_config)
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(training_config, algorithm_type="dpmsolver++")
    raise ConfigError(f"scheduler {name!r} unknown; choose ddim or dpmsolver")


def optimizer_and_schedule(parameters, lr: float, cfg: SimpleNamespace, betas=(0.9, 0.999), weight_decay=None):
    """AdamW and its learning-rate schedule (linear warm-up over cfg.warmup_steps, then constant), as
    both stages of train_ldm.py train."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=betas,
                                  weight_decay=cfg.weight_decay if weight_decay is None else weight_decay)
    return optimizer, get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)


def parameter_counts(cfg: SimpleNamespace, num_classes: int) -> dict[str, int]:
    """Parameters of both networks, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {"vae": count_parameters(build_vae(cfg)), "unet": count_parameters(build_unet(cfg, num_classes))}


def check_architecture(cfg: SimpleNamespace) -> None:
    """Catch sizes diffusers would reject with an obscure message, naming the option at fault."""
    for name in ("vae_channels", "unet_channels"):
        widths = getattr(cfg, name)
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"{name} must be a non-empty list of positive widths, got {widths}")
    for widths, groups in (("vae_channels", "vae_norm_groups"), ("unet_channels", "unet_norm_groups")):
        bad = [w for w in getattr(cfg, widths) if w % getattr(cfg, groups)]
        if getattr(cfg, groups) <= 0 or bad:
            raise ConfigError(f"every width of {widths} {getattr(cfg, widths)} must be a multiple of "
                              f"{groups} = {getattr(cfg, groups)} (group normalisation)")
    down = 2 ** (len(cfg.vae_channels) - 1)
    if cfg.image_size <= 0 or cfg.image_size % down:
        raise ConfigError(f"image_size {cfg.image_size} must be a multiple of {down} "
                          f"(the autoencoder halves it {len(cfg.vae_channels) - 1} times)")
    unet_down = 2 ** (len(cfg.unet_channels) - 1)
    if latent_size(cfg) % unet_down:
        raise ConfigError(f"latent size {latent_size(cfg)} (image_size / {down}) must be a multiple of "
                          f"{unet_down} (the denoiser halves it {len(cfg.unet_channels) - 1} times)")


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al.): one realness score per overlapping patch of the image.

    Optional adversarial term of the autoencoder loss; diffusers has no such module. Group
    normalisation instead of batch normalisation: no running statistics to keep in step."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = IMAGE_CHANNELS):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False),
                       nn.GroupNorm(min(32, out // 4) or 1, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class AutoencoderPass(nn.Module):
    """One training pass of the autoencoder as a single ``forward``: encode, sample the posterior
    with the given unit noise, decode. DistributedDataParallel synchronises the gradients of what
    runs through ``forward`` only, and AutoencoderKL's own forward draws its noise itself; here the
    caller draws it (the same numbers for an image whatever the number of processes)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(posterior parameters: mean and log-variance stacked on dim 1, reconstruction)."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # = posterior.sample()
        return posterior.parameters, self.vae.decode(latents).sample


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the training latents, so that the denoiser sees unit-variance data (LDM, §4.3.2)."""
    std = float(latents.float().std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"training latents have std {std}: the autoencoder is degenerate")
    return 1.0 / std


def encode_training_set(vae, dataset, device, batch_size: int, progress: bool = True):
    """Posterior mean and std of every training image and of its mirror image: (N, 2, C, h, w) each.

    The autoencoder is frozen, so each image is encoded once (fp32) instead of at every step.
    Under torchrun every process encodes all images in the same batches as a single process: the
    latents, and the latent scaling factor, are those of a single-process run.
    """
    from tqdm import tqdm

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
