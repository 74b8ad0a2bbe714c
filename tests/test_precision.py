"""bf16 autocast (+ channels_last) computes the fp32 MGCC step within bf16 tolerance.

Run on the CPU, whose autocast follows the same bf16 rules as CUDA's; the perturbation noise is drawn
in float32, so both precisions see the same random numbers. The images carry the official
normalisation (values ~1e-2), which is what made plain bf16 autocast lose the image in the first
convolution (networks.mgcc.Float32Conv2d).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from conftest import ROOT
from networks.mgcc import Float32Conv2d, MGCCNet
from utils.runtime import autocast_dtype


def load_check_bf16():
    spec = importlib.util.spec_from_file_location("check_bf16", ROOT / "benchmarks" / "check_bf16.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step():
    """fp32 and bf16 steps of a width-8 network on a 64x64 phantom batch, and the check's helpers."""
    check = load_check_bf16()
    batch = check.phantom_batch(np.random.default_rng(0), 64, "cpu")
    torch.manual_seed(0)
    model = MGCCNet(in_channels=3, width=8)
    return check, model, batch, check.step_gradient(model, batch, None, draw=1)


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_bf16_step_loss_matches_fp32(step):
    check, model, batch, (fp32_losses, _) = step
    bf16_losses, _ = check.step_gradient(model, batch, torch.bfloat16, draw=1)
    torch.testing.assert_close(torch.tensor(bf16_losses), torch.tensor(fp32_losses), rtol=1e-2, atol=1e-3)
    assert bf16_losses != fp32_losses  # bf16 really ran


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_bf16_step_gradient_follows_fp32(step):
    """With the image's convolution in float32 the bf16 gradient points where fp32's does; with it in
    bf16 (plain autocast) the encoder's gradient is almost unrelated to the fp32 one."""
    check, model, batch, (_, fp32) = step
    _, bf16 = check.step_gradient(model, batch, torch.bfloat16, draw=1)
    with check.first_conv_in_autocast(model):
        _, plain = check.step_gradient(model, batch, torch.bfloat16, draw=1)
    assert isinstance(model.encoder.stages[0][0], Float32Conv2d)  # restored
    # measured 0.794 / 0.678 with the float32 conv, 0.408 / 0.072 without it
    assert check.cosine(fp32, bf16) > 0.7 and check.cosine(fp32, bf16, "encoder.") > 0.55
    assert check.cosine(fp32, plain, "encoder.") < 0.3


def test_first_conv_is_float32_under_autocast():
    conv = Float32Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8) / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert torch.nn.Conv2d.forward(conv, x).dtype == torch.bfloat16  # what plain autocast gives
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.Conv2d.forward(conv, x), rtol=0, atol=0)


def test_auto_precision_is_bf16_only_on_cuda_gpus_with_native_bf16(monkeypatch):
    """auto: bf16 from compute capability 8.0 (Ampere) on; is_bf16_supported() also says True on a V100 or a T4,
    where bf16 is emulated, so it is not what decides."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulated counts too
    for capability, expected in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 0), None), ((7, 5), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, c=capability: c)
        assert autocast_dtype("auto", cuda) is expected, capability
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp32", cuda) is None
