"""The networks, and nothing else: the MGCC segmenter (mgcc.py, official.py, perturbations.py), its
U-Net (unet.py) and stage 1's latent diffusion model (ldm.py), never downloaded. Their losses are in
methods/ and generation/, their training in segmenter/ and generation/."""
from torch import nn

from utils.runtime import hub_offline

hub_offline()  # before any diffusers module: stage 1's networks are built from their configuration


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
