"""Stage 1 of MGCC: the losses of the latent diffusion model's two training stages.

- the autoencoder: L1 + (1 - SSIM) + KL / pixels (+ the patch discriminator's hinge terms), each
  term one named line, the total one formula (:func:`vae_losses`, :func:`discriminator_loss`);
- the denoiser: :class:`LatentDiffusionLoss`, whose state (the encoded training set, the noise
  schedule, the classes, the latent scaling) lives on the module, as lucidrains'
  ``GaussianDiffusion.p_losses``; a step is ``loss(denoiser, batch, rng)``.

train_ldm.py trains with them and benchmarks/bench_ldm.py times them: the same code.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from generation.image_quality import ssim
from networks.ldm import mask_channels
from utils.runtime import autocast


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
    the logged terms)."""
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


def batch_on_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (index, flipped) pairs of a batch as two long tensors on ``device``: one copy, and on a GPU from
    pinned memory without waiting for the device (a copy from pageable memory waits for the queued steps)."""
    pairs = torch.tensor([(i, int(f)) for i, f in batch], dtype=torch.long)
    if device.type == "cuda":
        pairs = pairs.pin_memory()
    return pairs.to(device, non_blocking=device.type == "cuda").unbind(1)


class LatentDiffusionLoss(nn.Module):
    """The denoiser's loss on the encoded training set: posterior ``means`` and ``stds`` of each
    training image and its mirror image, (N, 2, C, h, w) each, on the training device.

    ``labels_of``: each image's class (None: unconditional); ``null_label``: the "no class" label
    that classifier-free guidance trains with probability ``cfg.class_dropout``; ``masks_of``: each image's
    mask at the latent's size, concatenated to the noisy latent (None: not mask-conditioned), dropped
    with probability ``cfg.mask_dropout`` (independently of the class); ``scaling``: the
    latent scaling factor; ``mine``: this process's items of each global batch (under torchrun).
    Every random number is drawn for the whole batch and sliced: each item gets the numbers it gets
    in a single-process run.
    """

    def __init__(self, scheduler, means: torch.Tensor, stds: torch.Tensor, labels_of: torch.Tensor | None,
                 scaling: float, cfg: SimpleNamespace, null_label: int, mine: slice = slice(0, None, 1),
                 masks_of: torch.Tensor | None = None):
        super().__init__()
        self.scheduler, self.scaling, self.null_label, self.mine = scheduler, scaling, null_label, mine
        self.timesteps, self.class_dropout = cfg.train_timesteps, cfg.class_dropout
        self.mask_dropout = getattr(cfg, "mask_dropout", 0.0)
        self.prediction_type, self.kind = cfg.prediction_type, cfg.diffusion_loss
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("stds", stds, persistent=False)
        self.register_buffer("labels_of", labels_of, persistent=False)
        # a mask-conditioned denoiser: each item's mask at the latent's size, as it is and mirrored (N, 2, 1, h, w)
        self.register_buffer("masks_of", masks_of, persistent=False)

    def forward(self, denoiser, batch, rng: torch.Generator | None, amp_dtype=None) -> torch.Tensor:
        """The loss of one step; ``batch``: the global StepBatchSampler batch of (index, flipped) pairs."""
        device, mine, size = self.means.device, self.mine, len(batch)
        index, flip = (column[mine] for column in batch_on_device(batch, device))
        shape = (size, *self.means.shape[2:])
        mean, std = self.means[index, flip], self.stds[index, flip]
        latents = (mean + std * torch.randn(shape, generator=rng, device=device)[mine]) * self.scaling
        noise = torch.randn(shape, generator=rng, device=device)[mine]
        timesteps = torch.randint(0, self.timesteps, (size,), generator=rng, device=device)[mine]
        labels = None
        if self.labels_of is not None:
            dropped = (torch.rand(size, generator=rng, device=device) < self.class_dropout)[mine]
            labels = torch.where(dropped, torch.full_like(index, self.null_label), self.labels_of[index])
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.masks_of is not None:  # drawn after the others: an unconditional run's numbers stay as they were
            known = (torch.rand(size, generator=rng, device=device) >= self.mask_dropout)[mine]
            noisy = torch.cat([noisy, mask_channels(self.masks_of[index, flip], known)], dim=1)
        target = (noise if self.prediction_type == "epsilon"
                  else self.scheduler.get_velocity(latents, noise, timesteps))
        with autocast(device, amp_dtype):
            prediction = denoiser(noisy, timesteps, class_labels=labels).sample.float()
        return F.l1_loss(prediction, target) if self.kind == "l1" else F.mse_loss(prediction, target)
