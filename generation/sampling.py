"""Sampling the latent diffusion model: the seeds of the images, the denoising loop with
classifier-free guidance, and the decoder (always fp32).

Image n of a sampling run with seed s is made from numbers derived from (s, n) alone
(:func:`image_seed`): the same image whatever the batch it is denoised in, the number of images
or processes, and no image shared between two seeds (s + n would make ``--seed 0`` and
``--seed 4`` share all but four images).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from networks.ldm import mask_channels
from utils.runtime import autocast, derived_seed

# the random streams of one image: its initial noise, (class "all") its class and (pairs) its mask's layout
IMAGE_NOISE, IMAGE_CLASS, IMAGE_MASK = 0, 1, 2


def image_seed(seed: int, index: int, stream: int = IMAGE_NOISE) -> int:
    """The 63-bit seed of image ``index``'s ``stream`` in a sampling run with ``seed``."""
    return derived_seed(seed, index, stream)


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Unit-variance latent noise of the images ``indices`` (one CPU generator per image: the
    same numbers on any device and in any batch), stacked: (len(indices), *shape) on the CPU."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(image_seed(seed, n)))
                      for n in indices])


def image_class(seed: int, index: int, frequencies: np.ndarray) -> int:
    """Class of image ``index`` drawn with the given frequencies from its own seed."""
    return int(np.random.default_rng(image_seed(seed, index, IMAGE_CLASS)).choice(len(frequencies), p=frequencies))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Nx1xHxW in [-1, 1] -> uint8 NxHxW."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The autoencoder's images of ``latents`` in fp32, also inside a bf16 autocast region: the
    decoder is a small part of the cost, and bf16 would round the gray levels people look at."""
    with torch.autocast(latents.device.type, enabled=False):
        return vae.decode(latents.float()).sample.float()


def guidance_inputs(labels: torch.Tensor | None, null_label: int | None, masks: torch.Tensor | None, guided: bool):
    """The class labels and mask channels of a denoising step: the conditional ones, and with ``guided`` the
    unconditional ones after them (no class, no mask: both dropped, as the training's dropout does)."""
    known = torch.ones(len(masks), dtype=torch.bool, device=masks.device) if masks is not None else None
    condition = mask_channels(masks, known) if masks is not None else None
    if not guided:
        return labels, condition
    if labels is not None:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    if condition is not None:
        condition = torch.cat([condition, mask_channels(torch.zeros_like(masks), ~known)])
    return labels, condition


@torch.no_grad()
def generate(unet, vae, scheduler, noise: torch.Tensor, labels: torch.Tensor | None, null_label: int | None,
             guidance_scale: float, num_steps: int, scaling_factor: float, amp_dtype: torch.dtype | None,
             progress: bool = False, masks: torch.Tensor | None = None) -> np.ndarray:
    """Denoise ``noise`` (latent-shaped, unit variance) in ``num_steps`` and decode to uint8 images.

    The denoiser runs under ``amp_dtype`` autocast (None: fp32), the decoder in fp32. ``masks``: (B, 1,
    h, w) lesion fractions at the latent's size for a mask-conditioned denoiser (networks/ldm.py
    mask_channels). With ``labels`` or ``masks`` and a guidance scale other than 1, classifier-free
    guidance: the conditional and the unconditional (no class, no mask) predictions are made in one batch
    and mixed as u + s (c - u).
    """
    from tqdm import tqdm

    device = noise.device
    scheduler.set_timesteps(num_steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    guided = (labels is not None or masks is not None) and guidance_scale != 1.0
    step_labels, condition = guidance_inputs(labels, null_label, masks, guided)
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(latents, t)
        if guided:
            model_input = torch.cat([model_input, model_input])
        if condition is not None:
            model_input = torch.cat([model_input, condition.to(model_input.dtype)], dim=1)
        with autocast(device, amp_dtype):
            out = unet(model_input, t, class_labels=step_labels).sample.float()
        if guided:
            conditional, unconditional = out.chunk(2)
            out = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(out, t, latents).prev_sample
    return to_uint8(decode(vae, latents / scaling_factor))
