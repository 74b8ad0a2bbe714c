"""Does bf16 autocast change MGCC's training step? Losses and gradient agreement against fp32.

    python benchmarks/check_bf16.py                      # CPU, width 8, 64x64 phantom batch
    python benchmarks/check_bf16.py --device cuda --width 64 --image-size 256

One batch of phantom images (4 labeled + 4 unlabeled) through the MGCC step of train.py, at the
same weights: the loss terms in fp32 and in bf16 (+ channels_last), and the cosine similarity of the
full parameter gradient between
  - fp32 and bf16 with the same perturbation draw (what bf16 changes), and
  - two fp32 steps with different perturbation draws (the step's own randomness, for scale).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.datasets import normalize  # noqa: E402
from dataloaders.phantom import make_phantom  # noqa: E402
from networks.mgcc import MGCCNet  # noqa: E402
from train import mgcc_losses  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--width", type=int, default=8, help="first-stage width (default: 8)")
    parser.add_argument("--image-size", type=int, default=64, help="square image size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch and the weights (default: 0)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    pairs = [make_phantom(rng, (args.image_size,) * 2, malignant=bool(i % 2), sector=False) for i in range(8)]
    images = torch.stack([torch.from_numpy(normalize(np.repeat(im[..., None], 3, 2), "official")) for im, _ in pairs])
    masks = torch.stack([torch.from_numpy((m > 127).astype(np.float32))[None] for _, m in pairs])[:4]
    images, masks = images.to(device), masks.to(device)
    torch.manual_seed(args.seed)
    model = MGCCNet(3, args.width).to(device)

    def step(dtype, draw):
        fmt = torch.channels_last if dtype is not None else torch.contiguous_format
        model.to(memory_format=fmt).zero_grad(set_to_none=True)
        torch.manual_seed(draw)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = mgcc_losses(model, images.contiguous(memory_format=fmt), masks, 7.0)
        losses[0].backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return [x.item() for x in losses], grads

    (fp32, g_fp32), (bf16, g_bf16), (_, g_other) = step(None, 1), step(torch.bfloat16, 1), step(None, 2)
    print(f"MGCC step on {device}, width {args.width}, {args.image_size}x{args.image_size}, batch 4 + 4 phantom images")
    print(f"{'':28s} {'loss':>9s} {'sup':>9s} {'cons':>9s}")
    print(f"{'fp32':28s} {fp32[0]:9.5f} {fp32[1]:9.5f} {fp32[2]:9.5f}")
    print(f"{'bf16 + channels_last':28s} {bf16[0]:9.5f} {bf16[1]:9.5f} {bf16[2]:9.5f}")
    print(f"gradient cosine, fp32 vs bf16 (same draw):       {F.cosine_similarity(g_fp32, g_bf16, dim=0).item():.3f}")
    print(f"gradient cosine, fp32 draw 1 vs draw 2 (scale):  {F.cosine_similarity(g_fp32, g_other, dim=0).item():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
