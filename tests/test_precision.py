"""The bf16 option (autocast + channels_last) computes the fp32 step's loss within bf16 tolerance.

Run on the CPU, whose autocast follows the same bf16 rules as CUDA's; the perturbation noise is drawn
in float32, so both precisions see the same random numbers. (The gradients agree far less: see the
README's "Speed" section. That is why fp32 stays the default.)
"""
from __future__ import annotations

import torch

from networks.mgcc import MGCCNet
from train import mgcc_losses


def step_losses(model, images, masks, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    torch.manual_seed(1)  # the same perturbations in both runs
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return torch.stack(mgcc_losses(model, images.contiguous(memory_format=fmt), masks, 7.0))


def test_bf16_channels_last_step_loss_matches_fp32():
    torch.manual_seed(0)
    model = MGCCNet(in_channels=3, width=8)
    images = torch.randn(8, 3, 64, 64)
    masks = (torch.rand(4, 1, 64, 64) > 0.7).float()
    fp32 = step_losses(model, images, masks, None, False)
    bf16 = step_losses(model, images, masks, torch.bfloat16, True)
    torch.testing.assert_close(bf16, fp32, rtol=1e-2, atol=1e-3)  # loss, supervised, consistency
    assert not torch.equal(bf16, fp32)  # bf16 really ran
