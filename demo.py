"""The whole method in one command, on phantom data, on a laptop CPU.

    python demo.py                 # split 1 at 48x48 on a CPU: stage 1, then three arms
    python demo.py --quick         # every stage at a tiny size on 2 splits (CI's end-to-end test)

Two stages make the data, then reproduce.py runs the paper's protocol with its demo preset
(configs/demo.yaml, configs/ldm_demo.yaml), every stage the project's real script (the commands are
printed):
  1. python -m dataloaders.phantom   synthetic B-mode images with exact lesion masks
  2. split.py                        the published 70/30 protocol
  3. reproduce.py --preset demo      per split: the latent diffusion model, its samples, then the
                                     supervised baseline, MGCC on the real unlabeled images and MGCC
                                     on the synthetic ones, each segmenting the val ids
The phantom images are 48x48, and the demo shrinks the preset's stages to them (the flags are in
SETTINGS below and in the printed commands): stage 1 at 48x48 with 400 autoencoder and 500 denoiser
steps, the segmenters on the published schedule scaled by 0.02 (200 of the 10,000 iterations of a
quarter of the labels; lambda(t/T) and lr(t/T) are the published curves). Meant to finish within
5 minutes on an idle 2-core CPU. reproduce.py's time estimate is left out here (--no-estimate: it
benchmarks each kind of step before the first stage starts, minutes on a CPU); every stage runs as it
would without it, and the measured time of each is printed at the end, with reproduce.py's results
table and the paths of the pictures. Like reproduce.py, a rerun skips what is finished and continues
what was interrupted. The phantom data are for demonstration
only: numbers on them say nothing about ultrasound.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import reproduce
from utils.cli import run_cli
from protocol.ledger import Ledger, Stage, check_plan, execute
from utils.config import NON_NEGATIVE, ConfigError, checked

ROOT = Path(__file__).resolve().parent

# sizes of the full demo and of --quick (a smoke test of every stage boundary, on two splits)
SETTINGS = {
    "full": dict(images=160, size=48, splits=[1], reproduce=[
        "--ldm-args", "--image-size 48 --vae-steps 400 --diffusion-steps 500",
        "--schedule-scale", "0.02", "--train-args", "--image-size 48"]),
    "quick": dict(images=24, size=32, splits=[1, 2], reproduce=[
        "--labeled-fraction", "0.5", "--ldm-config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--num-samples", "8",
        "--ldm-args", "--vae-steps 4 --diffusion-steps 4 --image-size 32",
        "--sample-args", "--steps 10",
        "--schedule-scale", "1", "--train-args", "--iterations 4 --eval-every 2 --width 4 --image-size 32"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="where everything goes (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two splits: checks that every stage runs (CI)")
    parser.add_argument("--device", default="cpu", help="device for every stage (default: cpu; auto uses CUDA if present)")
    parser.add_argument("--seed", type=checked(int, NON_NEGATIVE), default=0,
                        help="seed of the phantom data (default: 0)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                        help="progress bars of the stages (default: off, the commands and results are shown)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    out = args.out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {args.out_dir} is a file, not a folder; choose another --out-dir")
    data = out / "phantom"
    data_stages = [
        Stage("phantom", ["-m", "dataloaders.phantom", "--out-dir", str(data), "--num-images", str(s["images"]),
                          "--height", str(s["size"]), "--width", str(s["size"]), "--seed", str(args.seed)], data),
        Stage("split", ["split.py", "--data-dir", str(data)], data / "phantom_val1.txt", depends=["phantom"]),
    ]
    ledger = Ledger(out / "stages.json")
    code = execute(data_stages, ledger, check_plan(data_stages, ledger), ROOT)
    if code != 0:
        return code
    code = reproduce.main(["--data-dir", str(data), "--out-dir", str(out), "--preset", "demo", "--device", args.device,
                           "--splits", *map(str, s["splits"]), *s["reproduce"], "--no-estimate",
                           "--progress" if args.progress else "--no-progress"])
    if code != 0:
        return code
    first = out / f"split{s['splits'][0]}"
    print("\npictures:")
    for label, path in [("phantom images", data / "preview.png"),
                        ("LDM reconstructions", first / "ldm" / "previews"),
                        ("LDM sample grid", first / "samples" / "grid.png"),
                        ("synthetic images", first / "samples" / "images"),
                        ("MGCC curves", first / "mgcc-synthetic" / "curves.png"),
                        ("overlays", first / "mgcc-synthetic_val" / "overlays"),
                        ("results figure", out / "results.png")]:
        print(f"  {label:20s} {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
