"""Time train.py's training of a method (--method, default MGCC): its step alone (synthetic inputs), or its whole loop (--loop).

    python benchmarks/bench_train.py                         # the step; published size on CUDA, small on CPU
    python benchmarks/bench_train.py --device cpu --width 16 --image-size 128 --steps 5
    python benchmarks/bench_train.py --json                  # one JSON line per variant
    python benchmarks/bench_train.py --method unimatch --network unet   # a comparison method's step
    python benchmarks/bench_train.py --loop --data-dir inputs/BUSI   # train.py's loop on real data

The step: each variant builds train.py's method (segmenter.training.MethodTraining: the same model, loss, SGD
update, poly schedule and consistency weight, wrapped and compiled as train.py does; inputs already
on the device, so no data is loaded), runs --warmup steps, then --steps timed steps with device
synchronisation (utils.benchmarking, the runner bench_ldm.py shares), and prints one table at the
end. FLOPs of one step are counted with torch.utils.flop_counter (forward and backward). warmup_s
(--json) is the warm-up's wall time: compilation falls in it. The default variants are those train.py trains with: on a CPU fp32 eager alone.

The loop (--loop): each variant runs train.py itself (this checkout's, or --train-py another
checkout's, in a subprocess) on --data-dir for --warmup + --steps iterations, evaluating every
--eval-every, and times the iterations after the warm-up from the times train.py logs at its
evaluations (metrics.jsonl): data, step, loss read-backs, periodic evaluation and checkpoints, all
of it. Compilation and the first evaluations fall in the warm-up. --warmup and --steps must be
multiples of --eval-every. Peak memory: CUDA's, as train.py logged it at its last evaluation (NaN on a
CPU, or where that train.py logs none).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the library modules (utils/, networks/, dataloaders/, methods/)
from methods import METHODS  # noqa: E402
from networks.unet import NETWORKS  # noqa: E402
from utils.benchmarking import (VARIANTS, bf16_peak, counted_flops, default_variants, device_name,  # noqa: E402
                                memory_format, time_steps)
from utils.config import parse_config  # noqa: E402
from utils.distributed import Context  # noqa: E402
from utils.runtime import autocast_dtype, resolve_device  # noqa: E402
from segmenter.options import OPTIONS  # noqa: E402
from segmenter.training import MethodTraining  # noqa: E402

# the official training loop as published, on an H100 at the published size (../shared/reference)
OFFICIAL_H100_IT_PER_S = 3.55


def train_flags(spec: dict, compile_mode: str) -> list[str]:
    """train.py's flags for a variant."""
    flags = ["--precision", "bf16" if spec["dtype"] is not None else "fp32",
             "--channels-last", "on" if spec["channels_last"] else "off"]
    if spec["compile"] is not None:
        scope, mode = spec["compile"]
        flags += ["--compile", "--compile-scope", scope, "--compile-mode", compile_mode if mode == "default" else mode]
    return flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda[:N]")
    parser.add_argument("--width", type=int, default=None, help="first-stage width (default: 64 on CUDA, 16 on CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default: 256 on CUDA, 128 on CPU)")
    parser.add_argument("--method", choices=list(METHODS), default=None,
                        help="train.py's --method whose step to time (default: --mode's)")
    parser.add_argument("--mode", choices=("mgcc", "supervised"), default="mgcc",
                        help="--method's alias for mgcc and the supervised baseline (labeled images only, main "
                             "decoder only) (default: mgcc)")
    parser.add_argument("--network", choices=NETWORKS, default="mgcc", help="train.py's --network (default: mgcc)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--labeled-batch-size", type=int, default=4, help="labeled images per step (default: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on CUDA, 5 on CPU; "
                        "--loop: 400 on CUDA, 100 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 2 on CPU; "
                        "--loop: one --eval-every)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="variants to run (default: the first three on CUDA; on CPU fp32 eager, what "
                             "train.py trains with there)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the 'compile' variant "
                        "(default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per variant instead of a table")
    loop = parser.add_argument_group("the real loop (--loop)")
    loop.add_argument("--loop", action="store_true", help="time train.py's own loop instead of the synthetic step")
    loop.add_argument("--data-dir", default=None, help="dataset folder for --loop (train.py's --data-dir)")
    loop.add_argument("--eval-every", type=int, default=None, help="train.py's --eval-every (default: 200 on "
                      "CUDA, train.py's default; 50 on CPU)")
    loop.add_argument("--train-py", type=Path, default=None, help="run this train.py (another checkout, e.g. "
                      "an earlier commit) instead of this checkout's")
    loop.add_argument("--train-args", default="", help="further train.py flags, one string, e.g. "
                      "'--data-on-device off --num-workers 4'")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = device
    args.method = args.method or args.mode
    if args.method == "mgcc" and args.network != "mgcc":
        parser.error("--method mgcc needs --network mgcc")
    args.width = args.width or (64 if cuda else 16)
    args.image_size = args.image_size or (256 if cuda else 128)
    if args.loop:
        if args.data_dir is None:
            parser.error("--loop needs --data-dir")
        args.eval_every = args.eval_every or (200 if cuda else 50)
        args.steps = args.steps or (400 if cuda else 100)
        args.warmup = args.warmup if args.warmup is not None else args.eval_every
        if args.warmup % args.eval_every or args.steps % args.eval_every or not args.warmup:
            parser.error(f"--loop times from one evaluation to another: --warmup ({args.warmup}, > 0) and --steps "
                         f"({args.steps}) must be multiples of --eval-every ({args.eval_every})")
        args.variants = args.variants or default_variants(device, list(VARIANTS)[:3])  # CUDA graphs: ask by name
        return args
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.variants = args.variants or default_variants(device, list(VARIANTS)[:3])  # CUDA graphs: ask by name
    return args


def run_variant(name: str, args) -> dict:
    """train.py's step of one variant: its method built from train.py's options, timed on a fixed batch."""
    spec, device = VARIANTS[name], args.device
    cfg = parse_config(OPTIONS, "", [*train_flags(spec, args.compile_mode), "--method", args.method, "--network",
                                     args.network, "--width", str(args.width), "--batch-size", str(args.batch_size),
                                     "--labeled-batch-size", str(args.labeled_batch_size)])
    gc.collect()  # the previous variant's model, optimizer state and compiled code: not in this one's peak
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    method = MethodTraining(cfg, Context(), device, iterations=args.warmup + args.steps + 1)
    method.begin()
    # the baseline's batch is the labeled part alone, as in train.py
    batch_size = args.labeled_batch_size + method.unlabeled_batch_size()
    fmt = memory_format(spec)
    images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    masks = (torch.rand(args.labeled_batch_size, 1, args.image_size, args.image_size, device=device) > 0.5).float()
    ramped = 10 ** 9  # the step at the ramped-up unlabeled weight and the EMA teacher's final decay

    def losses():  # on the eager method: compile hides the ops
        method.module.before_step(ramped)  # bcp: its self-training phase
        consistency = torch.full((), method.module.consistency_weight(ramped), device=device)
        with torch.autocast(device.type, dtype=spec["dtype"], enabled=spec["dtype"] is not None):
            loss = method.module(images, masks, consistency)["loss"]
        loss.backward()

    flops = counted_flops(losses)
    method.optimizer.zero_grad(set_to_none=True)
    timed = time_steps(lambda: method.train_step(images, masks, ramped)["loss"], device, args.warmup, args.steps)
    seconds = timed["seconds"]
    return {"variant": name, "mode": args.mode, "method": args.method, "network": args.network, "it_per_s": 1 / seconds,
            "ms_per_step": timed["ms_per_step"], "peak_mem_gib": timed["peak_mem_gib"],
            "tflops": flops / seconds / 1e12, "tflop_per_step": flops / 1e12, "warmup_s": timed["warmup_s"]}


def method_flags(args) -> list[str]:
    """train.py's flags for the method; --mode for the two it always had (an earlier --train-py knows only them)."""
    if args.network == "mgcc" and args.method in ("mgcc", "supervised"):
        return ["--mode", args.method]
    return ["--method", args.method, "--network", args.network]


def run_loop(name: str, args) -> dict:
    """train.py's loop for --warmup + --steps iterations; it/s over the iterations after the warm-up."""
    device = args.device
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        out = Path(tmp) / "run"
        argv = ["--data-dir", str(args.data_dir), "--out-dir", str(out), "--width", str(args.width),
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                "--labeled-batch-size", str(args.labeled_batch_size), *method_flags(args),
                "--iterations", str(args.warmup + args.steps),
                "--eval-every", str(args.eval_every), "--device", str(device), "--no-progress",
                *train_flags(VARIANTS[name], args.compile_mode), *args.train_args.split()]
        started = time.time()
        script = (args.train_py or ROOT / "train.py").resolve()
        # train.py's messages go to stderr: not in the table or the JSON
        code = subprocess.run([sys.executable, str(script), *argv], cwd=script.parent, stdout=sys.stderr).returncode
        if code != 0:
            raise SystemExit(f"error: train.py exited {code} for variant {name!r}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        times = {r["iteration"]: r["time"] for r in records}
        peak = records[-1].get("peak_mem_gib", float("nan"))  # CUDA's, as train.py logged it at its last evaluation
    seconds = (times[args.warmup + args.steps] - times[args.warmup]) / args.steps
    # start-up (data, compilation) and the warm-up iterations: decides whether compiling pays on a run
    warmup_s = times[args.warmup] - started
    return {"variant": name, "it_per_s": 1 / seconds, "ms_per_step": 1000 * seconds, "peak_mem_gib": peak,
            "warmup_s": warmup_s, "train_flags": " ".join(train_flags(VARIANTS[name], args.compile_mode))}


def published_size(args) -> bool:
    return (args.width, args.image_size, args.batch_size, args.labeled_batch_size) == (64, 256, 8, 4)


def print_loop_table(rows: list[dict], args, name: str) -> None:
    source = args.train_py or "train.py (this checkout)"
    print(f"\n{source}'s training loop on {name}: {args.data_dir}, width {args.width}, batch {args.batch_size} "
          f"({args.labeled_batch_size} labeled), {args.image_size}x{args.image_size}, evaluation every "
          f"{args.eval_every}; {args.steps} timed iterations after {args.warmup}; {args.train_args or 'no other flags'}; "
          f"torch {torch.__version__}")
    print(f"{'variant':52s} {'it/s':>8s} {'ms/it':>9s} {'peak GiB':>9s} {'x official':>11s} {'start-up s':>11s}")
    for r in rows:
        print(f"{r['variant']:52s} {r['it_per_s']:8.2f} {r['ms_per_step']:9.1f} {r['peak_mem_gib']:9.2f} "
              f"{r['it_per_s'] / OFFICIAL_H100_IT_PER_S:11.2f} {r['warmup_s']:11.1f}")
    print("start-up s: from the start of train.py to the end of the warm-up iterations (data, compilation, warm-up)")
    if not ("H100" in name and published_size(args)):
        print(f"x official: against the official loop's {OFFICIAL_H100_IT_PER_S} it/s on an H100 at the published size "
              "(width 64, batch 4 + 4, 256x256); this run is not that setting")


def main(argv=None) -> int:
    args = parse_args(argv)
    name = device_name(args.device)
    if args.loop:
        rows = []
        for variant in args.variants:
            rows.append(run_loop(variant, args))
            rows[-1]["ratio_to_official"] = rows[-1]["it_per_s"] / OFFICIAL_H100_IT_PER_S
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
        if not args.json:
            print_loop_table(rows, args, name)
        return 0
    peak = bf16_peak(name)
    rows = []
    for variant in args.variants:
        row = run_variant(variant, args)
        row["fraction_of_bf16_peak"] = row["tflops"] / peak if peak else None
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        batch = args.batch_size if METHODS[args.method].uses_unlabeled else args.labeled_batch_size
        print(f"\n{args.method} training step ({args.network} network) on {name}: width {args.width}, batch {batch} "
              f"({args.labeled_batch_size} labeled), {args.image_size}x{args.image_size}, "
              f"{args.steps} timed steps after {args.warmup} warm-up; torch {torch.__version__}")
        print(f"{'variant':52s} {'it/s':>8s} {'ms/step':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'of bf16 peak':>13s}")
        for r in rows:
            frac = f"{100 * r['fraction_of_bf16_peak']:.1f}%" if r["fraction_of_bf16_peak"] else "n/a"
            print(f"{r['variant']:52s} {r['it_per_s']:8.2f} {r['ms_per_step']:9.1f} {r['peak_mem_gib']:9.2f} "
                  f"{r['tflops']:8.3f} {frac:>13s}")
        print(f"FLOPs per step (forward + backward): {rows[0]['tflop_per_step']:.3f} TFLOP")
        # auto: bf16 and channels_last on a CUDA GPU with bf16, fp32 and the plain layout on CPU
        default = "bf16 + channels_last" if autocast_dtype("auto", args.device) is not None else "fp32 eager"
        print(f"train.py's default here (--precision auto, --channels-last auto, no --compile): {default}")
        if "H100" in name and published_size(args):
            print("against the official loop on an H100 (3.55 it/s): " + ", ".join(
                f"{r['variant']} {r['it_per_s'] / OFFICIAL_H100_IT_PER_S:.2f}x" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
