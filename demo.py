"""The whole method in one command, on phantom data, on a laptop CPU, in minutes.

    python demo.py                 # about 10 minutes on 2 CPU cores
    python demo.py --quick         # a smoke run of every stage (CI), under a minute or two

Every stage is the project's real script, run as a user would run it (the commands are printed):
  1. python -m dataloaders.phantom   synthetic B-mode images with exact lesion masks
  2. split.py                        the published 70/30 protocol, split 1 used
  3. train_ldm.py                    stage 1: latent diffusion model on the training ids only
  4. sample_ldm.py                   synthetic images for the unlabeled set
  5. train.py --mode mgcc            stage 2: MGCC with the synthetic images as unlabeled data
  6. train.py --mode supervised      the baseline on the same labels
  7. predict.py (both models)        masks, overlays and metrics on the val ids
and prints a table of val IoU and Dice for both, then the paths of what it wrote.
The phantom data are for demonstration only: numbers on them say nothing about ultrasound.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# sizes of the full demo and of --quick (a smoke test of every stage boundary)
SETTINGS = {
    "full": dict(images=160, size=64, ldm_vae_steps=500, ldm_diffusion_steps=600, samples=128,
                 iterations=600, eval_every=100, width=16, labeled_fraction=0.25),
    "quick": dict(images=24, size=32, ldm_vae_steps=4, ldm_diffusion_steps=4, samples=8,
                  iterations=4, eval_every=2, width=4, labeled_fraction=0.5),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="where everything goes (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every stage runs and fits (CI)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier demo in --out-dir first")
    parser.add_argument("--device", default="cpu", help="device for every stage (default: cpu; auto uses CUDA if present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom data and of every stage (default: 0)")
    return parser.parse_args(argv)


def run(step: str, *args) -> None:
    """Run one stage as a subprocess, showing the command; stop the demo if it fails."""
    command = [sys.executable, *map(str, args)]
    print(f"\n=== {step}\n$ {shlex.join(['python', *map(str, args)])}", flush=True)
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo stopped: {step} failed with exit status {result.returncode}")


def main(argv=None) -> int:
    args = parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    out = args.out_dir.resolve()
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"error: {out} is not empty: use --overwrite to replace the earlier demo")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, ldm, synth = out / "phantom", out / "ldm", out / "synthetic"
    common = ["--device", args.device, "--no-progress"]
    started = time.time()

    run("1/7 phantom data", "-m", "dataloaders.phantom", "--out-dir", data, "--num-images", s["images"],
        "--height", s["size"], "--width", s["size"], "--seed", args.seed)
    run("2/7 split files", "split.py", "--data-dir", data)
    run("3/7 stage 1: latent diffusion model", "train_ldm.py", "--config", ROOT / "configs" / "ldm_demo.yaml",
        "--data-dir", data, "--split", 1, "--out-dir", ldm, "--image-size", s["size"], "--vae-steps",
        s["ldm_vae_steps"], "--diffusion-steps", s["ldm_diffusion_steps"], "--seed", args.seed, *common)
    run("4/7 stage 1: sampling", "sample_ldm.py", "--checkpoint", ldm, "--num-images", s["samples"],
        "--out-dir", synth, "--seed", args.seed, *common)
    segmenter = ["--config", ROOT / "configs" / "demo.yaml", "--data-dir", data, "--split", 1,
                 "--iterations", s["iterations"], "--eval-every", s["eval_every"], "--width", s["width"],
                 "--image-size", s["size"], "--labeled-fraction", s["labeled_fraction"], "--seed", args.seed, *common]
    run("5/7 stage 2: MGCC", "train.py", *segmenter, "--mode", "mgcc", "--unlabeled-dir", synth, "--out-dir", out / "mgcc")
    run("6/7 stage 2: supervised baseline", "train.py", *segmenter, "--mode", "supervised", "--out-dir", out / "supervised")
    results = {}
    for mode in ("mgcc", "supervised"):
        run(f"7/7 prediction on the val ids ({mode})", "predict.py", "--checkpoint", out / mode / "checkpoint_best.pt",
            "--input-dir", data, "--ids", data / "phantom_val1.txt", "--masks-dir", data / "masks" / "0",
            "--output-dir", out / f"predictions_{mode}", "--device", args.device, "--no-progress")
        results[mode] = json.loads((out / f"predictions_{mode}" / "metrics.json").read_text())

    minutes = (time.time() - started) / 60
    labeled = json.loads((out / "mgcc" / "metrics.json").read_text())
    print(f"\nMGCC demo on phantom data ({s['images']} images {s['size']}x{s['size']}, labeled fraction "
          f"{s['labeled_fraction']}, {s['samples']} synthetic unlabeled images, {s['iterations']} iterations): "
          f"{minutes:.1f} min")
    report = json.loads((synth / "report.json").read_text())
    if report["c2st_accuracy"] is not None:
        print(f"synthetic images: C2ST accuracy {report['c2st_accuracy']:.3f} against the training images (0.5 = "
              f"indistinguishable, 1.0 = trivially told apart); sample grid {synth / 'grid.png'}")
    print(f"{'model':24s} {'val IoU':>8s} {'val Dice':>9s}")
    for mode, name in (("mgcc", "MGCC (semi-supervised)"), ("supervised", "supervised baseline")):
        print(f"{name:24s} {results[mode]['iou']:8.4f} {results[mode]['dice']:9.4f}")
    print(f"(metrics of checkpoint_best on the {results['mgcc']['images']} val images at their own size; selected on "
          f"the same val list, as the official protocol: optimistic. MGCC trained {labeled['iterations']} iterations.)")
    previews = {kind: sorted((ldm / "previews").glob(f"{kind}_step*.png"))[-1:] for kind in ("vae", "diffusion")}
    print("\nwritten:")
    for label, path in [("phantom preview", data / "preview.png"),
                        *[("VAE reconstructions", g) for g in previews["vae"]],
                        *[("LDM preview grid", g) for g in previews["diffusion"]],
                        ("LDM sample grid", synth / "grid.png"), ("LDM quality report", synth / "report.json"),
                        ("LDM loss curves", ldm / "losses_diffusion.png"),
                        ("synthetic images", synth / "images"), ("MGCC curves", out / "mgcc" / "curves.png"),
                        ("baseline curves", out / "supervised" / "curves.png"),
                        ("predicted masks", out / "predictions_mgcc" / "masks"),
                        ("overlays", out / "predictions_mgcc" / "overlays"),
                        ("metrics", out / "predictions_mgcc" / "metrics.json")]:
        print(f"  {label:20s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
