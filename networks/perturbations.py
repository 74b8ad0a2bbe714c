"""Feature perturbations of MGCC's auxiliary decoders (paper Sec. 3.2; cf. cross-consistency training).

Each one maps a feature map (N, C, H, W) to a perturbed one and draws its randomness with torch on the
feature's own device (the official code draws on the CPU with numpy and copies, which syncs the host),
so the global torch RNG (saved in checkpoints) makes a run reproducible. Each is applied to every
encoder feature separately, with fresh randomness per feature and call, as in the official code.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureDropout(nn.Module):
    """Drop the most active regions: zero x where its channel mean reaches gamma * that sample's max.

    gamma ~ U(low, high) is one scalar per call, shared by the batch (official: 0.7 .. 0.9).
    """

    def __init__(self, low: float = 0.7, high: float = 0.9):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = x.mean(dim=1, keepdim=True)
        max_per_sample = attention.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
        gamma = torch.empty((), device=x.device).uniform_(self.low, self.high)  # float32 in any precision
        keep = attention < max_per_sample * gamma
        return x * keep.to(x.dtype)


class AlwaysOnDropout(nn.Module):
    """Element-wise dropout with rescaling, always on (official: F.dropout(x, p=0.3), training=True).

    Always on, even in eval mode, because it defines the auxiliary view rather than regularising.
    """

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.dropout's own mask: the mask is drawn in NCHW order (a contiguous float32 tensor) whatever x's memory
        # format and dtype, so channels_last and bf16 runs drop the elements an fp32 NCHW run drops (F.dropout
        # draws in memory order). On the CPU the same numbers as F.dropout of a contiguous fp32 x.
        keep = torch.empty(x.shape, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * keep.to(x.dtype)


class FeatureNoise(nn.Module):
    """Multiplicative uniform noise: x + x * n, n ~ U(-r, r) of shape (C, H, W) shared by the batch."""

    def __init__(self, uniform_range: float = 0.3):
        super().__init__()
        self.uniform_range = uniform_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # drawn in float32 so that bf16 autocast sees the same noise as fp32
        noise = torch.empty(x.shape[1:], device=x.device).uniform_(-self.uniform_range, self.uniform_range)
        return x + x * noise.to(x.dtype).unsqueeze(0)
