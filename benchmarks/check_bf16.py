"""Does bf16 autocast change MGCC's training step? Losses and gradient agreement against fp32.

    python benchmarks/check_bf16.py                      # CPU, width 8, 64x64 phantom batches
    python benchmarks/check_bf16.py --device cuda --width 64 --image-size 256

Phantom images (4 labeled + 4 unlabeled, official normalisation) through the MGCC step of train.py,
at the same weights. It prints the loss terms in fp32 and in bf16 (+ channels_last), then the cosine
similarity of the step's parameter gradient to the fp32 one, for the whole network and its encoder:
  - bf16, same batch and perturbation draw (what bf16 changes);
  - fp32 + channels_last, same draw: the memory format alone (the perturbations draw in NCHW order, so
    the same elements are dropped: ~1);
  - bf16 with the image's first convolution in bf16 too, as plain autocast does (what
    networks.mgcc.Float32Conv2d prevents);
  - fp32 with another perturbation draw, and fp32 on another batch: the step's own randomness and
    SGD's minibatch noise, for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.datasets import normalize  # noqa: E402
from dataloaders.phantom import make_phantom  # noqa: E402
from networks.mgcc import Float32Conv2d, MGCCNet  # noqa: E402
from methods.losses import mgcc_losses  # noqa: E402


def phantom_batch(rng: np.random.Generator, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """8 official-normalised phantom images and the masks of the first 4."""
    pairs = [make_phantom(rng, (size, size), malignant=bool(i % 2), sector=False) for i in range(8)]
    images = torch.stack([torch.from_numpy(normalize(np.repeat(im[..., None], 3, 2), "official")) for im, _ in pairs])
    masks = torch.stack([torch.from_numpy((m > 127).astype(np.float32))[None] for _, m in pairs[:4]])
    return images.to(device), masks.to(device)


@contextmanager
def first_conv_in_autocast(model: MGCCNet):
    """Run the image's Float32Conv2d as a plain Conv2d (bf16 under autocast), as the official code would."""
    conv = model.encoder.stages[0][0]
    assert isinstance(conv, Float32Conv2d)
    conv.__class__ = nn.Conv2d
    try:
        yield
    finally:
        conv.__class__ = Float32Conv2d


def step_gradient(model, batch, dtype, draw: int, channels_last: bool | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The MGCC step's loss terms and its gradient (float64, by parameter name) at the model's weights;
    channels_last: None follows the precision (bf16 with it, fp32 without)."""
    images, masks = batch
    channels_last = dtype is not None if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).zero_grad(set_to_none=True)
    torch.manual_seed(draw)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        losses = mgcc_losses(model, images.contiguous(memory_format=fmt), masks, 7.0)
    losses[0].backward()
    grads = {name: p.grad.double().flatten().clone() for name, p in model.named_parameters() if p.grad is not None}
    return [x.item() for x in losses], grads


def cosine(a: dict, b: dict, prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    return F.cosine_similarity(torch.cat([a[k] for k in keys]), torch.cat([b[k] for k in keys]), dim=0).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--width", type=int, default=8, help="first-stage width (default: 8)")
    parser.add_argument("--image-size", type=int, default=64, help="square image size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and the weights (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the bf16 + channels_last step's "
                        "loss terms and gradient cosines beside fp32's) instead of the tables")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    batch, other_batch = phantom_batch(rng, args.image_size, device), phantom_batch(rng, args.image_size, device)
    torch.manual_seed(args.seed)
    model = MGCCNet(3, args.width).to(device)

    loss_fp32, fp32 = step_gradient(model, batch, None, draw=1)
    loss_bf16, bf16 = step_gradient(model, batch, torch.bfloat16, draw=1)
    with first_conv_in_autocast(model):
        loss_plain, plain = step_gradient(model, batch, torch.bfloat16, draw=1)
    _, fp32_last = step_gradient(model, batch, None, draw=1, channels_last=True)  # the layout alone: ~1
    _, other_draw = step_gradient(model, batch, None, draw=2)
    _, other_images = step_gradient(model, other_batch, None, draw=1)

    if args.json:
        print(json.dumps({"check": "step", "loss_fp32": loss_fp32[0], "loss_bf16": loss_bf16[0],
                          "loss_terms_fp32": loss_fp32, "loss_terms_bf16": loss_bf16,
                          "cosine_network": cosine(fp32, bf16), "cosine_encoder": cosine(fp32, bf16, "encoder."),
                          "cosine_network_fp32_channels_last": cosine(fp32, fp32_last),
                          "cosine_network_other_draw": cosine(fp32, other_draw),
                          "cosine_network_other_batch": cosine(fp32, other_images)}))
        return 0
    print(f"MGCC step on {device}, width {args.width}, {args.image_size}x{args.image_size}, batch 4 + 4 phantom images")
    print(f"{'':44s} {'loss':>9s} {'sup':>9s} {'cons':>9s}")
    for name, terms in [("fp32", loss_fp32), ("bf16 + channels_last", loss_bf16),
                        ("bf16 + channels_last, first conv in bf16", loss_plain)]:
        print(f"{name:44s} {terms[0]:9.5f} {terms[1]:9.5f} {terms[2]:9.5f}")
    print(f"\n{'gradient cosine to the fp32 step':44s} {'network':>9s} {'encoder':>9s}")
    for name, grads in [("bf16 + channels_last", bf16), ("bf16 + channels_last, first conv in bf16", plain),
                        ("fp32 + channels_last (same draw)", fp32_last),
                        ("fp32, another perturbation draw", other_draw), ("fp32, another batch", other_images)]:
        print(f"{name:44s} {cosine(fp32, grads):9.3f} {cosine(fp32, grads, 'encoder.'):9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
