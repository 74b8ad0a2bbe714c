"""The networks: the MGCC segmenter (mgcc.py, official.py, perturbations.py) and stage 1's latent
diffusion model (ldm.py, ldm_losses.py, ldm_sampling.py), never downloaded."""
from torch import nn

from utils.runtime import hub_offline

hub_offline()  # before any diffusers module: stage 1's networks are built from their configuration


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
