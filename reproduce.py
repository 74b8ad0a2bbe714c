"""The paper's protocol in one command: every split, every arm, one results table.

    python reproduce.py --data-dir inputs/BUSI --labeled-fraction 0.5 --out-dir runs/busi_l0.5
    python reproduce.py --data-dir inputs/BUSI --preset demo --splits 1 --device cpu     # a CPU-sized try

For each split (default: every <name>_train<i>.txt with its <name>_val<i>.txt):
  1. stage 1   train_ldm.py on the split's training ids, then sample_ldm.py   (--no-generator: skipped)
  2. stage 2   train.py once per arm, all with the same labels, seed and schedule. The default arms:
                 supervised      the baseline: the labeled images alone
                 mgcc-real       MGCC, the training images left unlabeled as unlabeled data (the official code)
                 mgcc-synthetic  MGCC, the split's synthetic images as unlabeled data (the paper)
               --methods M ... x --networks mgcc unet x --unlabeled real synthetic make other arms, named
               <method>[-unet][-real|-synthetic]: e.g. supervised-unet, cct-real (CCT on the MGCC
               network), unimatch-unet-synthetic. results.md gives each arm's paired difference to
               supervised (the MGCC network) and to supervised-unet, where they ran.
               An arm named with -pairs at the end (--arms supervised-pairs mgcc-real-pairs ...) also trains
               on the split's synthetic image-mask pairs (train.py --synthetic-pairs): stage 1 then adds a
               mask-conditioned train_ldm.py on the arms' labeled images and its sample_ldm.py pairs, and,
               with the supervised arm, predict.py of its checkpoint on the pairs and on the unconditional
               samples against the pairs' masks (the mask fidelity, in results.md).
  3. predict.py of each arm's selected checkpoint on the split's val ids, at each image's own size
Every stage is the project's real script, run as a subprocess with its command printed. The output
folder gets results.csv (one row per run: arm, split, seed), results.md (mean ± std over runs, the
difference to the baseline paired by (split, seed) with a 95 % Student-t confidence interval, the
generator's figures, the project's git commit), results.png and results_curves.png (each run's
selection IoU over its iterations, one panel per arm). --seeds A B C repeats every arm
per seed; --schedule-scale S runs every arm at S x the published schedule, its curves kept.

Rerunning the same command skips finished stages and resumes an interrupted one (Ctrl-C or SIGTERM
stops the running stage at a checkpoint). An option changed since, or a change in what a stage read
(its config file's contents, a split file, an image: compared by SHA-256), would make finished work
stale: that is an error naming the stage and what changed, never a silent reuse. Before starting, the planned stages are
printed with an estimated time (from a short benchmark of each step on the device, or from stages of
the same kind already finished in --out-dir); at the end, the measured times.

Stages side by side: --jobs N runs up to N ready stages at once on this node, each on its own GPU or
share of the CPU's threads (protocol/parallel.py); --launcher slurm submits each stage as a SLURM job
through submitit, with the stages' dependencies, and returns; rerun to see the jobs and, once they
have ended, to collect the results (protocol/cluster.py). The results are the sequential run's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dataloaders.duplicates import leak_note
from dataloaders.io import note
from methods import METHODS
from protocol import options
from protocol.arms import NETWORKS, UNLABELED
from protocol.cluster import LAUNCHERS
from protocol.ledger import Ledger, check_plan
from protocol.parallel import node_slots
from protocol.plan import PRESETS, find_splits, plan
from protocol.report import write_results
from protocol.runner import print_times, refuse_if_jobs_active, run_here, run_one_stage, submit_jobs
from utils.cli import run_cli
from utils.config import ConfigError, at_least, checked, greater_than
from utils.locks import hold


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data-dir", type=Path, required=True, help="dataset folder with images/, masks/0/ and "
                        "the split files <name>_train<i>.txt / <name>_val<i>.txt (split.py writes them)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where every run goes (default: runs/<name>_l<labeled fraction>)")
    parser.add_argument("--labeled-fraction", type=float, default=None,
                        help="labeled share of each training list, the same for every arm (default: the stage-2 "
                             "config's: 0.5 in configs/busi.yaml, 0.25 in configs/demo.yaml)")
    parser.add_argument("--labeled", type=int, default=None, metavar="N",
                        help="label the N ids of each split's <name>_train<i>_labeled<N>.txt (split.py --labeled N "
                             "writes them) in every arm, instead of a labeled fraction (default: none)")
    parser.add_argument("--splits", type=int, nargs="+", default=None,
                        help="split numbers (default: every split whose train and val files are present)")
    parser.add_argument("--split-name", default=None, metavar="NAME",
                        help="prefix of the split files, NAME_train<i>.txt (default: the data folder's name "
                             "lower-cased, or the only prefix there)")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help="arms to run, by name: <method>[-unet][-real|-synthetic][-pairs] (-pairs: with the "
                             "split's synthetic image-mask pairs as extra labeled data, docs/protocol.md) (default: "
                             "those of --methods, --networks and --unlabeled)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["supervised", "mgcc"],
                        help="methods of the arms (default: supervised mgcc)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=["mgcc"],
                        help="networks of the arms: mgcc, and unet (MGCC's encoder and decoder without the ConvMixer "
                             "stages; the paper's comparison ran on it) (default: mgcc)")
    parser.add_argument("--unlabeled", nargs="+", choices=UNLABELED, default=None,
                        help="unlabeled images of the semi-supervised arms: real (the training ids left unlabeled) "
                             "and synthetic (the split's generated images) (default: both; without the generator, real)")
    parser.add_argument("--no-generator", dest="generator", action="store_false",
                        help="skip stage 1 (no synthetic images, so no mgcc-synthetic arm)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="busi",
                        help="names both stage configs and the number of samples: busi (configs/busi.yaml and "
                             "configs/ldm_busi.yaml, for a GPU), demo (configs/demo.yaml and configs/ldm_demo.yaml: "
                             "64x64, minutes on a CPU) or cpu (configs/cpu.yaml and configs/ldm_demo.yaml: 64x64, "
                             "800 iterations with the ramp compressed so the unlabeled terms act; the CPU results "
                             "page) (default: busi)")
    parser.add_argument("--config", type=Path, default=None, help="train.py config (default: the preset's)")
    parser.add_argument("--ldm-config", type=Path, default=None, help="train_ldm.py config (default: the preset's)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="synthetic images per split (default: the preset's, busi 1000, demo 128, cpu 256)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="select each arm's checkpoint on the last F of the training list and evaluate the "
                             "val ids once (default: 0, the official protocol: selection on the val ids)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None,
                       help="seed of every stage (default: each config's own)")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                       help="repeats: every arm once per split and seed, in split<i>/seed<S>/<arm>; stage 1 once per "
                            "split, with the first seed. results.md then pairs each arm with the baseline by (split, "
                            "seed) and gives a 95%% confidence interval of the difference")
    parser.add_argument("--mask-values", choices=("binary", "threshold", "nonzero"), default=None,
                        help="how masks are read, for every training and predict stage: binary (0/255), threshold "
                             "(> 127) or nonzero (> 0: 0/1 masks, label maps) (default: the stage-2 config's, binary "
                             "in configs/busi.yaml)")
    parser.add_argument("--schedule-scale", type=float, default=None, metavar="S",
                        help="every train.py run at S x its schedule: S x the iterations, with the consistency ramp, "
                             "learning-rate decay and evaluation interval scaled so that lambda(t/T) and lr(t/T) are "
                             "the published curves (train.py --schedule-scale) (default: the stage-2 config's: 1 in "
                             "configs/busi.yaml, 0.03 in configs/demo.yaml)")
    parser.add_argument("--train-args", default="", metavar="FLAGS",
                        help="more flags for every train.py run, e.g. \"--width 16\" (one word, quoted; the word after "
                             "--train-args, --ldm-args or --sample-args is its value even when it starts with '-', "
                             "e.g. --train-args --no-tensorboard; each is checked against its script's options "
                             "before any stage starts)")
    parser.add_argument("--ldm-args", default="", metavar="FLAGS",
                        help="more flags for train_ldm.py, e.g. \"--vae-steps 2000 --image-size 64\"")
    parser.add_argument("--sample-args", default="", metavar="FLAGS",
                        help="more flags for sample_ldm.py, e.g. \"--scheduler dpmsolver --steps 20\"")
    parser.add_argument("--spacing-mm", type=checked(float, greater_than(0)), nargs="+", default=None, metavar="MM",
                        help="pixel spacing in mm (one number, or row and column), passed to predict.py: HD95 and ASD "
                             "in mm (default: pixels)")
    parser.add_argument("--spacing-csv", type=Path, default=None,
                        help="per-image pixel spacing (CSV id,spacing_mm), passed to predict.py")
    parser.add_argument("--nsd-tolerance", type=checked(float, at_least(0)), default=None,
                        help="NSD tolerance passed to predict.py, in mm with a spacing, else pixels (default: 2 pixels)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per training stage, each run under torchrun (default: 1; under torchrun, "
                             "its --nproc_per_node)")
    parallel = parser.add_argument_group(
        "running stages side by side (docs/gpu-and-clusters.md)")
    parallel.add_argument("--jobs", type=int, default=1, metavar="N",
                          help="run up to N ready stages at once on this node, each on its own GPU (--gpus) or, on "
                               "the CPU, with 1/N of the cores' threads; a stage's output goes to <its folder>.log "
                               "(default: 1, one stage after another, its output here)")
    parallel.add_argument("--gpus", default=None, metavar="LIST",
                          help="with --jobs: the GPUs to use, e.g. 0,1,2,3 (indices of the visible ones; default: all)")
    parallel.add_argument("--launcher", choices=LAUNCHERS, default="local",
                          help="local: run the stages here; slurm: submit every stage not done as a SLURM job "
                               "through submitit, with the stages' dependencies, and return (rerun the command to "
                               "see the jobs, and once they have ended to collect the results); submitit-local: "
                               "the same jobs through submitit's local executor, on this machine (default: local)")
    parallel.add_argument("--slurm-partition", default=None, help="SLURM partition of the jobs (default: the cluster's)")
    parallel.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MINUTES",
                          help="time limit of each job; a stage still running at its end checkpoints and its job "
                               "is requeued to resume it (default: 1440)")
    parallel.add_argument("--slurm-gpus-per-job", type=int, default=None, metavar="N",
                          help="GPUs of each job (default: --nproc-per-node, 0 with --device cpu; each job "
                               "resolves --device auto on its own node, so a login node without a GPU submits GPU "
                               "jobs; submitit-local: --nproc-per-node where this machine has CUDA, else 0)")
    parallel.add_argument("--slurm-options", type=Path, default=None, metavar="YAML",
                          help="more submitit SlurmExecutor options, e.g. mem: 32G, cpus_per_task: 8, account: X, "
                               "additional_parameters: {constraint: a100} (default: none)")
    parallel.add_argument("--stage", default=None, metavar="NAME",
                          help="run only this stage of the plan (what each cluster job runs), e.g. "
                               "split1/mgcc-real; the stages it reads must be done")
    parser.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                        help="benchmark the steps on the device to print an estimated time first (default: on)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars of the stages (default: on)")
    args = parser.parse_args(options.join_passed_values(list(sys.argv[1:] if argv is None else argv)))
    options.complete(args, argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return 0  # under torchrun, local rank 0 runs every stage with torchrun; the others have nothing to do
    if os.environ.get("WORLD_SIZE", "1") != os.environ.get("LOCAL_WORLD_SIZE", "1"):
        raise ConfigError("reproduce.py runs on one node: start it with torchrun --nnodes 1 (or with python and "
                          "--nproc-per-node)")
    args.nproc_per_node = args.nproc_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = args.device
    name, splits = find_splits(args.data_dir, args.splits, args.split_name)
    stages = plan(args, name, splits, device)
    ledger = Ledger(args.out_dir.resolve() / "stages.json")
    slots = node_slots(args.jobs, device, args.gpus, args.nproc_per_node) if args.jobs > 1 or args.gpus is not None \
        else None
    if args.stage:
        return run_one_stage(args, stages, ledger)
    # one command drives a folder at a time (the jobs it submitted update the ledger themselves)
    hold(args.out_dir.resolve(), "protocol folder")
    refuse_if_jobs_active(args, ledger)
    statuses = check_plan(stages, ledger)
    print(f"reproduce: {args.data_dir} -> {args.out_dir} | splits {', '.join(map(str, splits))} | arms "
          f"{', '.join(args.arms)} | {args.labels} | "
          f"{'holdout ' + format(args.holdout, 'g') if args.holdout else 'selection on val (official)'}", flush=True)
    note(f"near-duplicates across the splits: {leak_note(args.data_dir, splits, name)}")
    if args.launcher != "local":
        if submit_jobs(args, stages, ledger, statuses, device):
            return 0
    elif code := run_here(args, stages, ledger, statuses, device, slots):
        return code
    ledger.reload()
    out = write_results(args, splits, ledger, device)
    print_times(stages, ledger, args.jobs)
    print(f"\n{(out / 'results.md').read_text()}\nwrote {out / 'results.csv'}, {out / 'results.md'}, "
          f"{out / 'results.png'}, {out / 'results_curves.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
