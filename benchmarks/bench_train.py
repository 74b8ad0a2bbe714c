"""Time train.py's MGCC training step: steady-state iterations per second, memory, FLOP rate.

    python benchmarks/bench_train.py                         # published size on CUDA, small on CPU
    python benchmarks/bench_train.py --device cpu --width 16 --image-size 128 --steps 5
    python benchmarks/bench_train.py --json                  # one JSON line per variant

Each variant runs the step of train.py (same model, loss, SGD update; inputs already on the device,
so the data loader is not timed) for --warmup steps, then --steps timed steps with device
synchronisation, and prints one table at the end. FLOPs of one step are counted with
torch.utils.flop_counter (forward and backward).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks.mgcc import MGCCNet  # noqa: E402
from train import mgcc_losses, supervised_losses  # noqa: E402
from utils.runtime import autocast_dtype  # noqa: E402

# dense bf16 peak (TFLOP/s) of devices this project is measured on, for the fraction column
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# the official training loop as published, on an H100 at the published size (../shared/reference)
OFFICIAL_H100_IT_PER_S = 3.55
VARIANTS = {
    "fp32 eager": dict(dtype=None, channels_last=False, compile=False),
    "bf16 + channels_last": dict(dtype=torch.bfloat16, channels_last=True, compile=False),
    "bf16 + channels_last + compile": dict(dtype=torch.bfloat16, channels_last=True, compile=True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda[:N]")
    parser.add_argument("--width", type=int, default=None, help="first-stage width (default: 64 on CUDA, 16 on CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default: 256 on CUDA, 128 on CPU)")
    parser.add_argument("--mode", choices=("mgcc", "supervised"), default="mgcc",
                        help="train.py's step to time: mgcc, or the supervised baseline's (labeled images only, "
                             "main decoder only) (default: mgcc)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--labeled-batch-size", type=int, default=4, help="labeled images per step (default: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 2 on CPU)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="variants to run (default: all on CUDA; the eager ones on CPU)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per variant instead of a table")
    args = parser.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.device = device
    args.width = args.width or (64 if cuda else 16)
    args.image_size = args.image_size or (256 if cuda else 128)
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.variants = args.variants or (list(VARIANTS) if cuda else list(VARIANTS)[:2])
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, args) -> dict:
    spec = VARIANTS[name]
    device = args.device
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = MGCCNet(in_channels=3, width=args.width).to(device).train()
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model, mode=args.compile_mode) if spec["compile"] else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                                fused=device.type == "cuda" or None)
    # the baseline's batch is the labeled part alone, as in train.py
    batch_size = args.batch_size if args.mode == "mgcc" else args.labeled_batch_size
    images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    masks = (torch.rand(args.labeled_batch_size, 1, args.image_size, args.image_size, device=device) > 0.5).float()

    def losses(net):
        return mgcc_losses(net, images, masks, 7.0) if args.mode == "mgcc" else supervised_losses(net, images, masks)

    def step():
        with torch.autocast(device.type, dtype=spec["dtype"], enabled=spec["dtype"] is not None):
            loss, _, _ = losses(forward)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    synchronize(device)
    with FlopCounterMode(display=False) as counter:  # on the eager model: compile hides the ops
        with torch.autocast(device.type, dtype=spec["dtype"], enabled=spec["dtype"] is not None):
            loss, _, _ = losses(model)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"variant": name, "mode": args.mode, "it_per_s": 1 / seconds, "ms_per_step": 1000 * seconds, "peak_mem_gib": peak,
            "tflops": flops / seconds / 1e12, "tflop_per_step": flops / 1e12}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    args = parse_args(argv)
    name = device_name(args.device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for variant in args.variants:
        row = run_variant(variant, args)
        row["fraction_of_bf16_peak"] = row["tflops"] / peak if peak else None
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"\n{'MGCC' if args.mode == 'mgcc' else 'supervised baseline'} training step on {name}: width {args.width}, batch {args.batch_size} "
              f"({args.labeled_batch_size} labeled), {args.image_size}x{args.image_size}, "
              f"{args.steps} timed steps after {args.warmup} warm-up; torch {torch.__version__}")
        print(f"{'variant':34s} {'it/s':>8s} {'ms/step':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'of bf16 peak':>13s}")
        for r in rows:
            frac = f"{100 * r['fraction_of_bf16_peak']:.1f}%" if r["fraction_of_bf16_peak"] else "n/a"
            print(f"{r['variant']:34s} {r['it_per_s']:8.2f} {r['ms_per_step']:9.1f} {r['peak_mem_gib']:9.2f} "
                  f"{r['tflops']:8.3f} {frac:>13s}")
        print(f"FLOPs per step (forward + backward): {rows[0]['tflop_per_step']:.3f} TFLOP")
        # auto: bf16 and channels_last on a CUDA GPU with bf16, fp32 and the plain layout on CPU
        default = "bf16 + channels_last" if autocast_dtype("auto", args.device) is not None else "fp32 eager"
        print(f"train.py's default here (--precision auto, --channels-last auto, no --compile): {default}")
        if "H100" in name and (args.width, args.image_size, args.batch_size) == (64, 256, 8):
            print("against the official loop on an H100 (3.55 it/s): " + ", ".join(
                f"{r['variant']} {r['it_per_s'] / OFFICIAL_H100_IT_PER_S:.2f}x" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
