"""The U-Net of the paper's comparison: MGCCNet without its three ConvMixer stages.

The MGCC authors ran every compared semi-supervised method on a U-Net (official repository, issue 6):
an encoder and a decoder with skip connections, no global-context bottleneck. Here that network is
built from MGCCNet's own blocks (networks/mgcc.py): the same Encoder (widths w, 2w, 4w, 8w, 16w,
the image's convolution in float32) and the same Decoder (CMU-Net's, with its multi-scale attention
gates on the skips), so that ``unet`` versus ``mgcc`` differs by the ConvMixer stages alone.

``aux_decoders`` adds decoders of the same architecture for methods that need them (CCT: three).
Both networks share one interface for the methods (methods/): ``features(x)`` is the main decoder's
input, ``main_decoder`` and ``aux_decoders`` the decoders, ``model(x)`` the main decoder's logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .mgcc import Decoder, Encoder, MGCCNet

NETWORKS = ("mgcc", "unet")


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64, num_classes: int = 1, aux_decoders: int = 0):
        super().__init__()
        self.encoder = Encoder(in_channels, width)
        self.main_decoder = Decoder(width, num_classes)
        self.aux_decoders = nn.ModuleList(Decoder(width, num_classes) for _ in range(aux_decoders))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main_decoder(self.features(x))


def build_network(network: str, in_channels: int = 3, width: int = 64, mixer_depth: int = 3, mixer_kernel: int = 7,
                  aux_decoders: int = 0) -> nn.Module:
    """``network`` mgcc (MGCCNet: always its three auxiliary decoders, as the official network) or unet.

    A checkpoint holds ``network`` and ``model_args``, the other arguments (MGCCNet's own for mgcc)."""
    if network == "mgcc":
        return MGCCNet(in_channels=in_channels, width=width, mixer_depth=mixer_depth, mixer_kernel=mixer_kernel)
    if network == "unet":
        return UNet(in_channels=in_channels, width=width, aux_decoders=aux_decoders)
    raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
