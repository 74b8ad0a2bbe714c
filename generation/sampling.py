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

from utils.runtime import autocast, derived_seed

# the random streams of one image: its initial noise and (class "all") its class
IMAGE_NOISE, IMAGE_CLASS = 0, 1


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


@torch.no_grad()
def generate(unet, vae, scheduler, noise: torch.Tensor, labels: torch.Tensor | None, null_label: int | None,
             guidance_scale: float, num_steps: int, scaling_factor: float, amp_dtype: torch.dtype | None,
             progress: bool = False) -> np.ndarray:
    """Denoise ``noise`` (latent-shaped, unit variance) in ``num_steps`` and decode to uint8 images.

    The denoiser runs under ``amp_dtype`` autocast (None: fp32), the decoder in fp32. With
    ``labels`` and a guidance scale other than 1, classifier-free guidance: the conditional and
    the "no class" predictions are made in one batch and mixed as u + s (c - u).
    """
    from tqdm import tqdm

    device = noise.device
    scheduler.set_timesteps(num_steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    guided = labels is not None and guidance_scale != 1.0
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(latents, t)
        if guided:
            both = torch.cat([labels, torch.full_like(labels, null_label)])
            with autocast(device, amp_dtype):
                out = unet(torch.cat([model_input, model_input]), t, class_labels=both).sample.float()
            conditional, unconditional = out.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        else:
            with autocast(device, amp_dtype):
                prediction = unet(model_input, t, class_labels=labels).sample.float()
        latents = scheduler.step(prediction, t, latents).prev_sample
    return to_uint8(decode(vae, latents / scaling_factor))
