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
  3. predict.py of each arm's selected checkpoint on the split's val ids, at each image's own size
Every stage is the project's real script, run as a subprocess with its command printed. The output
folder gets results.csv (one row per run: arm, split, seed), results.md (mean ± std over runs, the
difference to the baseline paired by (split, seed) with a 95 % Student-t confidence interval, the
generator's figures, the project's git commit) and results.png. --seeds A B C repeats every arm
per seed; --schedule-scale S runs every arm at S x the published schedule, its curves kept.

Rerunning the same command skips finished stages and resumes an interrupted one (Ctrl-C or SIGTERM
stops the running stage at a checkpoint). An option changed since, or a change in what a stage read
(its config file's contents, a split file, an image: compared by SHA-256), would make finished work
stale: that is an error naming the stage and what changed, never a silent reuse. Before starting, the planned stages are
printed with an estimated time (from a short benchmark of each step on the device, or from stages of
the same kind already finished in --out-dir); at the end, the measured times.

Stages side by side: --jobs N runs up to N ready stages at once on this node, each on its own GPU or
share of the CPU's threads (utils/parallel.py); --launcher slurm submits each stage as a SLURM job
through submitit, with the stages' dependencies, and returns; rerun to see the jobs and, once they
have ended, to collect the results (utils/cluster.py). The results are the sequential run's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from dataloaders.duplicates import DUPLICATES_ADVICE, split_leak_note
from dataloaders.io import DataError, dataset_name, find_cases, image_folder, note, read_id_list, split_file, split_files
from dataloaders.splits import holdout_size
from methods import METHODS
from utils import results
from utils.clean_subset import CLEAN_COLUMNS, clean_fields, clean_section
from utils.cli import run_cli
from utils.config import ConfigError, at_least, checked, file_values, greater_than, parse_config, read_yaml, save_yaml
from utils.runtime import resolve_device
from utils.cluster import LAUNCHERS
from utils.locks import hold
from utils.stages import Ledger, Stage, check_plan, child_environment, execute, format_seconds

ROOT = Path(__file__).resolve().parent
ARMS = ("supervised", "mgcc-real", "mgcc-synthetic")  # the default arms: the paper's own comparison
NETWORKS = ("mgcc", "unet")
UNLABELED = ("real", "synthetic")
BASELINES = ("supervised", "supervised-unet")


@dataclass(frozen=True)
class Arm:
    """One training configuration of the comparison: a method on a network with real or synthetic unlabeled images."""
    method: str
    network: str = "mgcc"
    unlabeled: str | None = None  # None for supervised

    @property
    def name(self) -> str:
        return "-".join([self.method] + (["unet"] if self.network == "unet" else []) + ([self.unlabeled] if self.unlabeled else []))

    def flags(self, samples: Path) -> list[str]:
        # the paper's arms keep their --mode flags: their finished stages in an existing --out-dir stay valid
        if self.network == "mgcc" and self.method in ("supervised", "mgcc"):
            chosen = ["--mode", self.method]
        else:
            chosen = ["--method", self.method, "--network", self.network]
        if self.unlabeled == "synthetic":
            return chosen + ["--unlabeled-dir", str(samples), "--no-unlabeled-from-train"]
        return chosen + (["--unlabeled-from-train"] if self.unlabeled == "real" else [])


def make_arms(methods, networks, unlabeled) -> list[Arm]:
    """Every valid (network, method, unlabeled) combination, baselines first; mgcc only on its network."""
    arms = []
    for network in networks:
        for method in methods:
            if method == "supervised":
                arms.append(Arm(method, network))
            elif not (method == "mgcc" and network != "mgcc"):
                arms.extend(Arm(method, network, kind) for kind in unlabeled)
    return arms


def parse_arm(name: str) -> Arm:
    """An arm from its name (supervised-unet, mgcc-real, mean-teacher-unet-synthetic...)."""
    rest, unlabeled, network = name, None, "mgcc"
    for kind in UNLABELED:
        if rest.endswith("-" + kind):
            rest, unlabeled = rest[:-len(kind) - 1], kind
    if rest.endswith("-unet"):
        rest, network = rest[:-5], "unet"
    arm = Arm(rest, network, unlabeled)
    if rest not in METHODS or (rest == "supervised") != (unlabeled is None) or (rest == "mgcc" and network != "mgcc"):
        raise ConfigError(f"--arms {name}: not an arm; arms are <method>[-unet][-real|-synthetic] with a method of "
                          f"{', '.join(METHODS)} (supervised without -real/-synthetic, mgcc without -unet), e.g. "
                          "supervised-unet, cct-real, unimatch-unet-synthetic")
    return arm
PRESETS = {  # stage-2 config, stage-1 config, synthetic images per split
    "busi": dict(config=ROOT / "configs" / "busi.yaml", ldm_config=ROOT / "configs" / "ldm_busi.yaml", num_samples=1000),
    "demo": dict(config=ROOT / "configs" / "demo.yaml", ldm_config=ROOT / "configs" / "ldm_demo.yaml", num_samples=128),
}


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
                        help="arms to run, by name: <method>[-unet][-real|-synthetic] (default: those of --methods, "
                             "--networks and --unlabeled)")
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
                             "configs/ldm_busi.yaml, for a GPU) or demo (configs/demo.yaml and "
                             "configs/ldm_demo.yaml: 64x64, minutes on a CPU) (default: busi)")
    parser.add_argument("--config", type=Path, default=None, help="train.py config (default: the preset's)")
    parser.add_argument("--ldm-config", type=Path, default=None, help="train_ldm.py config (default: the preset's)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="synthetic images per split (default: the preset's, busi 1000, demo 128)")
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
                        help="more flags for every train.py run, e.g. \"--width 16\"")
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
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command_line = shlex.join(["python", "reproduce.py", *args.argv])
    try:
        args.gpus = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {args.gpus}: a comma-separated list of GPU indices was expected, e.g. 0,1") from None
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and args.launcher != "local":
        raise ConfigError(f"--jobs {args.jobs} is for --launcher local: with {args.launcher}, the cluster runs the jobs")
    preset = PRESETS[args.preset]
    args.config = args.config or preset["config"]
    args.ldm_config = args.ldm_config or preset["ldm_config"]
    args.num_samples = args.num_samples or preset["num_samples"]
    if args.labeled is not None and args.labeled_fraction is not None:
        raise ConfigError("give --labeled-fraction or --labeled N (labeled lists), not both")
    if args.labeled is not None and args.labeled < 1:
        raise ConfigError(f"--labeled must be a positive number of images, got {args.labeled}")
    if args.labeled is None and args.labeled_fraction is None:
        import train
        args.labeled_fraction = read_yaml(args.config, train.OPTIONS).get("labeled_fraction", 0.5)
    args.labels = (f"labeled lists of {args.labeled}" if args.labeled is not None
                   else f"labeled fraction {args.labeled_fraction:g}")
    args.out_dir = args.out_dir or Path("runs") / (f"{dataset_name(args.data_dir)}_n{args.labeled}" if args.labeled
                                                   else f"{dataset_name(args.data_dir)}_l{args.labeled_fraction:g}")
    if args.arms:
        chosen = [parse_arm(name) for name in args.arms]
        args.arms = [arm for arm in make_arms(METHODS, NETWORKS, UNLABELED) if arm in chosen]  # in the table's order
    else:
        args.arms = make_arms(args.methods, args.networks, args.unlabeled or (UNLABELED if args.generator else ["real"]))
    for arm in args.arms:
        if arm.unlabeled == "synthetic" and not args.generator:
            raise ConfigError(f"--arms {arm.name} needs the generator: drop --no-generator")
    args.arm_of = {arm.name: arm for arm in args.arms}
    args.arms = [arm.name for arm in args.arms]
    for name in ("train_args", "ldm_args", "sample_args"):
        try:
            setattr(args, name, shlex.split(getattr(args, name)))
        except ValueError as error:  # an unclosed quote: shlex says "No closing quotation"
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)!r} cannot be split into flags as a "
                              f"shell would: {error}; close the quote (or quote the whole value once)") from None
    if args.schedule_scale is not None and not args.schedule_scale > 0:
        raise ConfigError(f"--schedule-scale must be positive, got {args.schedule_scale:g}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice would repeat a run")
    if args.spacing_mm and args.spacing_csv:
        raise ConfigError("give --spacing-mm or --spacing-csv, not both")
    args.predict_args = ((["--spacing-mm", *map("{:g}".format, args.spacing_mm)] if args.spacing_mm else [])
                         + (["--spacing-csv", str(args.spacing_csv.resolve())] if args.spacing_csv else [])
                         + (["--nsd-tolerance", f"{args.nsd_tolerance:g}"] if args.nsd_tolerance is not None else []))
    return args


def find_splits(data_dir: Path, requested: list[int] | None, name: str | None) -> tuple[str, list[int]]:
    """(split-file prefix, split numbers): the requested splits, or every split whose train and val files
    are both present. The prefix is --split-name, else the folder's name, else the only one there."""
    pattern = re.compile(r"(.+)_train(\d+)\.txt")
    found = {}  # prefix -> split numbers with both files
    for path in data_dir.glob("*_train*.txt"):
        if (m := pattern.fullmatch(path.name)) and split_file(data_dir, "val", int(m[2]), m[1]).is_file():
            found.setdefault(m[1], []).append(int(m[2]))
    if name is None:
        name = dataset_name(data_dir)
        if name not in found and len(found) == 1:
            name = next(iter(found))
            note(f"split files: using {name}_train<i>.txt (none is named after the folder; --split-name {name} "
                 "says so explicitly)")
        elif name not in found and found:
            raise DataError(f"{data_dir} holds the split files of several names ({', '.join(sorted(found))}): "
                            "choose one with --split-name")
    if requested:
        for i in requested:
            for part in ("train", "val"):
                if not split_file(data_dir, part, i, name).is_file():
                    raise DataError(f"split {i}: {split_file(data_dir, part, i, name)} not found")
        return name, sorted(set(requested))
    if not found.get(name):
        raise DataError(f"no split files {name}_train<i>.txt with {name}_val<i>.txt in {data_dir}: "
                        f"run python split.py --data-dir {data_dir}")
    return name, sorted(found[name])


def split_inputs(data: Path, i: int, name: str) -> dict[str, Path]:
    """The files every stage of split i reads: its two split files, and the image and mask of each id
    they list, named relative to the data folder (for the ledger's digest)."""
    files = {}
    cases = find_cases(data)
    for part in ("train", "val"):
        path = split_file(data, part, i, name)
        files[path.name] = path
        for case_id in read_id_list(path):
            for file in cases.get(case_id, ()):
                files[str(file.relative_to(data))] = file
    return files


def stage_reads(stage: Stage, data: Path, i: int, name: str):
    """Stage.reads of a stage of split i: its resolved configuration (none for predict.py, whose options
    are all in its command) and the split's files, with the images of any --unlabeled-dir of train.py."""
    def reads():
        files = split_inputs(data, i, name)
        if stage.command[0] == "predict.py":
            return None, files
        cfg = stage_config(stage)
        for folder in getattr(cfg, "unlabeled_dir", []) or []:
            if Path(folder).is_dir():
                files.update({str(p): p for p in image_folder(folder)})
        if getattr(cfg, "class_csv", None):
            files[str(cfg.class_csv)] = Path(cfg.class_csv)
        return config_values(stage, cfg), files
    return reads


def labeled_list_file(data_dir: Path, name: str, split: int, count: int) -> Path:
    """split.py --labeled's file: <name>_train<i>_labeled<N>.txt; missing, an error that says how to write it."""
    path = data_dir / f"{name}_train{split}_labeled{count}.txt"
    if not path.is_file():
        raise DataError(f"split {split}: labeled list {path} not found: write it with python split.py --data-dir "
                        f"{data_dir} --labeled {count}")
    return path


def plan(args, name: str, splits: list[int], device: str) -> list[Stage]:
    """Every stage of the protocol, in the order they run."""
    data, out = args.data_dir.resolve(), args.out_dir.resolve()
    shown = ["--device", device] + ([] if args.progress else ["--no-progress"])
    seeds = args.seeds or [args.seed]  # None: each config's own
    seed = ["--seed", str(seeds[0])] if seeds[0] is not None else []
    split_name = ["--split-name", name]
    mask_values = args.mask_values or mask_values_of(args)
    scale = ["--schedule-scale", f"{args.schedule_scale:g}"] if args.schedule_scale is not None else []
    # the generator must not see the ids an arm selects on: its samples would carry them into training
    holdout = ["--holdout", f"{args.holdout:g}"] if args.holdout else []
    torchrun = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
                if args.nproc_per_node > 1 else [])

    def resumable(script: str, folder: Path, *state_files: str):
        def resume():
            if any((folder / name).is_file() for name in state_files):
                return [script, "--out-dir", str(folder), "--resume", *shown]
            return None
        return resume

    stages = []

    def add(stage: Stage, i: int) -> None:
        stage.reads = stage_reads(stage, data, i, name)
        stages.append(stage)

    for i in splits:
        run = out / f"split{i}"
        ldm, samples = run / "ldm", run / "samples"
        if args.generator:
            add(Stage(
                f"split{i}/ldm", ["train_ldm.py", "--config", str(args.ldm_config.resolve()), "--data-dir", str(data),
                                  "--split", str(i), *split_name, *holdout, "--out-dir", str(ldm), *seed, *args.ldm_args, *shown],
                ldm, resume=resumable("train_ldm.py", ldm, "state_vae.pt", "state_diffusion.pt"), launcher=torchrun), i)
            add(Stage(
                f"split{i}/samples", ["sample_ldm.py", "--checkpoint", str(ldm), "--num-images", str(args.num_samples),
                                      "--out-dir", str(samples), *seed, *args.sample_args, *shown],
                samples, depends=[f"split{i}/ldm"], launcher=torchrun), i)
        # every arm labels the same images: the split's labeled list, or the head of its training list
        labels = (["--labeled-list", str(labeled_list_file(data, name, i, args.labeled))] if args.labeled
                  else ["--labeled-fraction", f"{args.labeled_fraction:g}"])
        for s in seeds:
            # with --seeds, each seed's runs in their own folder; the generator is the split's one
            where, prefix = (run / f"seed{s}", f"split{i}/seed{s}") if args.seeds else (run, f"split{i}")
            arm_seed = ["--seed", str(s)] if s is not None else []
            for arm in args.arms:
                folder = where / arm
                synthetic = args.arm_of[arm].unlabeled == "synthetic"
                add(Stage(
                    f"{prefix}/{arm}", ["train.py", "--config", str(args.config.resolve()), "--data-dir", str(data),
                                        "--split", str(i), *split_name, *labels, "--holdout", f"{args.holdout:g}",
                                        *args.arm_of[arm].flags(samples), *arm_seed, *scale, *args.train_args,
                                        "--mask-values", mask_values,
                                        "--out-dir", str(folder), *shown],
                    folder, depends=[f"split{i}/samples"] if synthetic else [],
                    resume=resumable("train.py", folder, "checkpoint_last.pt"), launcher=torchrun), i)
                # predict.py takes the image size, channels and normalisation from the checkpoint
                add(Stage(
                    f"{prefix}/{arm}/predict", ["predict.py", "--checkpoint", str(folder / "checkpoint_best.pt"),
                                                "--input-dir", str(data), "--ids", str(split_file(data, "val", i, name)),
                                                "--masks-dir", str(data / "masks" / "0"), "--mask-values", mask_values,
                                                # every id the split's runs and generator trained on: the clean subset
                                                "--trained-ids", str(split_file(data, "train", i, name)),
                                                *args.predict_args, "--output-dir", str(where / f"{arm}_val"), *shown],
                    where / f"{arm}_val", depends=[f"{prefix}/{arm}"], overwrite_flag=None), i)
    return stages


def stage_kind(name: str) -> str:
    """'mgcc-real/predict' of 'split2/seed5/mgcc-real/predict': the stage without its split and seed."""
    return re.sub(r"^split\d+/(seed-?\d+/)?", "", name)


def stage2_config(args):
    """The stage-2 configuration every arm shares: its config file, --schedule-scale, then --train-args."""
    import train
    scale = ["--schedule-scale", f"{args.schedule_scale:g}"] if args.schedule_scale is not None else []
    return parse_config(train.OPTIONS, "", ["--config", str(args.config), *scale, *args.train_args])


def mask_values_of(args) -> str:
    """The stage-2 configuration's mask_values, which every training and predict stage must share."""
    return stage2_config(args).mask_values


def config_values(stage: Stage, cfg) -> dict:
    """The resolved configuration of a stage as its config.yaml holds it."""
    import sample_ldm
    import train
    import train_ldm
    module = {"train.py": train, "train_ldm.py": train_ldm, "sample_ldm.py": sample_ldm}[stage.command[0]]
    return file_values(cfg, module.OPTIONS)


def stage_config(stage: Stage):
    """The resolved configuration of a training or sampling stage, as its script would resolve it."""
    script, argv = stage.command[0], stage.command[1:]
    if script == "train.py":
        import train as module
    elif script == "train_ldm.py":
        import train_ldm as module
    else:
        import sample_ldm as module
    return parse_config(module.OPTIONS, "", argv)


def benchmark(script: str, flags: list[str]) -> tuple[list[dict], float]:
    """(rows of a benchmark script's --json output, the script's wall time in seconds)."""
    print(f"timing the step for the estimate (--no-estimate skips this): benchmarks/{script} {shlex.join(flags)}",
          flush=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags, "--json"], cwd=ROOT,
                            env=child_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks/{script} failed: {result.stderr.strip()[-500:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], time.monotonic() - started


# Warm steps timed per benchmark on a CPU (a GPU: the scripts' own counts, 10 + 50). Three warm-up and
# ten timed steps: the first steps of a process are the slow ones (allocator, caches), and three
# timed steps were one slow outlier away from a wrong estimate (issue 17: 78 min for a 9-minute arm).
CPU_WARMUP, CPU_STEPS = 3, 10


def forward_flops_per_image(cfg) -> float:
    """FLOPs of one eval-mode forward pass of the segmenter on one image (what evaluation and predict.py
    run), counted at 32x32 and scaled by the pixels: every layer is a convolution or pointwise."""
    from torch.utils.flop_counter import FlopCounterMode
    from networks.mgcc import MGCCNet

    model = MGCCNet(in_channels=cfg.in_channels, width=cfg.width, mixer_depth=cfg.mixer_depth,
                    mixer_kernel=cfg.mixer_kernel).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.in_channels, 32, 32))
    return counter.get_total_flops() * (cfg.image_size / 32) ** 2


def c2st_seconds(count: int, device: str) -> float:
    """The C2ST of sample_ldm.py on ``count`` images per set: its classifier's steps, timed here."""
    from generation.image_quality import C2ST_EPOCHS, TwoSampleClassifier
    import sample_ldm

    if count < sample_ldm.C2ST_FOLDS:
        return 0.0
    classifier = TwoSampleClassifier()
    optimizer = torch.optim.Adam(classifier.parameters())
    images, labels = torch.zeros(32, 1, sample_ldm.MEMORISATION_SIZE, sample_ldm.MEMORISATION_SIZE), torch.zeros(32)
    for k in range(CPU_WARMUP + CPU_STEPS):
        if k == CPU_WARMUP:
            started = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_image = (time.perf_counter() - started) / (CPU_STEPS * 32)
    folds = sample_ldm.C2ST_FOLDS  # each fold trains on (folds - 1) / folds of the 2 x count images
    return folds * C2ST_EPOCHS * 2 * count * (folds - 1) / folds * per_image


def estimate(stages: list[Stage], statuses: dict[str, str], ledger: Ledger, device: str, nproc: int) -> None:
    """Fill in each pending stage's estimated seconds: from a finished stage of the same kind in this
    out-dir when there is one (its measured wall time), else from a model of the stage:

    - start-up: the wall time of the benchmark's own process less its timed work (Python, torch and the
      script's imports, building the networks): each stage pays it once;
    - training: iterations x the time of a warm step (CPU_WARMUP + CPU_STEPS on a CPU), plus each
      evaluation's forward passes over the selection images (and the final one over the val images),
      timed as the step's time x (forward FLOPs / step FLOPs);
    - stage 1: the autoencoder's and denoiser's steps x their warm step times; sampling: images / the
      sampling rate, plus the C2ST's classifier steps (timed) and nothing for the memorisation report
      (one matrix product);
    - predict.py: the val images' forward passes, as evaluations.
    Data checks and image decoding are left out (seconds for BUSI's 647 images).
    """
    from dataloaders.splits import load_run_data

    cuda = resolve_device(device).type == "cuda"
    variant = "bf16 + channels_last" if cuda else "fp32 eager"  # train.py's and train_ldm.py's defaults there
    counts = [] if cuda else ["--steps", str(CPU_STEPS), "--warmup", str(CPU_WARMUP)]
    measured, cache = {}, {}
    for stage in stages:
        kind = stage_kind(stage.name)
        seconds = ledger.seconds(stage.name)
        if seconds is not None:
            measured.setdefault(kind, seconds)
    if not cuda and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: this machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): the "
              "steps timed now run slower than on an idle machine, and the estimate can be off by more than 2x "
              "either way (the other work may end)", flush=True)

    def train_rates(cfg) -> dict:
        import train
        train.resolve_method(cfg)  # each arm's own method and network
        key = ("train", cfg.method, cfg.network, cfg.width, cfg.image_size, cfg.batch_size, cfg.labeled_batch_size,
               cfg.in_channels)
        if key not in cache:
            flags = ["--device", device, "--method", cfg.method, "--network", cfg.network, "--width", str(cfg.width),
                     "--image-size",
                     str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--labeled-batch-size",
                     str(cfg.labeled_batch_size), "--variants", variant, *counts]
            (row,), wall = benchmark("bench_train.py", flags)
            step = 1 / row["it_per_s"]
            timed = (CPU_WARMUP + CPU_STEPS + 1) * step if not cuda else 61 * step
            cache[key] = {"step": step, "startup": max(wall - timed, 0.0),
                          "image": step * forward_flops_per_image(cfg) / (row["tflop_per_step"] * 1e12)}
        return cache[key]

    def ldm_rates(ldm_cfg, sampling_steps: int | None) -> dict:
        """Steps/s of the autoencoder and the denoiser (sampling_steps None), or images/s of sampling."""
        import train_ldm
        key = ("ldm", sampling_steps)
        if key not in cache:
            with tempfile.TemporaryDirectory() as tmp:
                save_yaml(file_values(ldm_cfg, train_ldm.OPTIONS), Path(tmp) / "ldm.yaml")
                common = ["--config", str(Path(tmp) / "ldm.yaml"), "--device", device, "--variants", variant,
                          "--no-progress"]
                if sampling_steps is None:
                    rows, wall = benchmark("bench_ldm.py", [*common, "--what", "all", "--ddim-steps", "0",
                                                            "--dpmsolver-steps", "0", *counts])
                    rates = {row["benchmark"].split()[0]: row["it_per_s"] for row in rows}
                    warm = CPU_WARMUP + CPU_STEPS + 1 if not cuda else 61  # + the step whose FLOPs are counted
                    timed = sum(warm / rates[k] for k in ("autoencoder", "denoiser"))
                else:  # one warm-up batch, one timed, one counted (bench_ldm.py's own counts on a CPU)
                    rows, wall = benchmark("bench_ldm.py", [*common, "--what", "sampling", "--ddim-steps",
                                                            str(sampling_steps), "--dpmsolver-steps", "0"])
                    rates = {"sampling": rows[0]["it_per_s"]}
                    timed = (3 if not cuda else 7) * 16 / rates["sampling"]
                rates["startup"] = max(wall - timed, 0.0)
            cache[key] = rates
        return cache[key]

    for stage in stages:
        if statuses[stage.name] == "done":
            continue
        kind = stage_kind(stage.name)
        if kind in measured:
            stage.estimate, stage.estimate_source = measured[kind], "a finished stage of this kind"
            continue
        if kind.endswith("predict"):
            train_stage = next(s for s in stages if s.name == stage.name.rsplit("/", 1)[0])
            cfg = stage_config(train_stage)
            data = load_run_data(cfg.data_dir, cfg.split, cfg.labeled_fraction, cfg.holdout, [], False,
                                 need_unlabeled=False, check_files=False, split_name=cfg.split_name,
                                 labeled_list=getattr(cfg, "labeled_list", None))
            rates = train_rates(cfg)
            stage.estimate = rates["startup"] + len(data.report or data.selection) * rates["image"]
            stage.estimate_source = "model: start-up + forward passes"
            continue
        cfg = stage_config(stage)
        if kind in ("ldm", "samples"):
            ldm_cfg = stage_config(next(s for s in stages if s.name == stage.name.replace(kind, "ldm")))
            rates = ldm_rates(ldm_cfg, cfg.steps if kind == "samples" else None)
            if kind == "ldm":
                stage.estimate = (rates["startup"] + ldm_cfg.vae_steps / rates["autoencoder"]
                                  + ldm_cfg.diffusion_steps / rates["denoiser"])
            else:
                train_ids = len(read_id_list(split_file(ldm_cfg.data_dir, "train", ldm_cfg.split, ldm_cfg.split_name)))
                stage.estimate = (rates["startup"] + cfg.num_images / rates["sampling"]
                                  + (c2st_seconds(min(cfg.num_images, train_ids), device) if cfg.c2st else 0))
        else:
            data = load_run_data(cfg.data_dir, cfg.split, cfg.labeled_fraction, cfg.holdout, [], False,
                                 need_unlabeled=False, check_files=False, split_name=cfg.split_name,
                                 labeled_list=getattr(cfg, "labeled_list", None))
            schedule = train_schedule(cfg, len(data.labeled))
            rates = train_rates(cfg)
            evaluations = math.ceil(schedule.iterations / schedule.eval_every)
            stage.estimate = (rates["startup"] + schedule.iterations * rates["step"]
                              + (evaluations * len(data.selection) + len(data.report or data.selection)) * rates["image"])
        stage.estimate /= nproc
        stage.estimate_source = "model: start-up + warm steps" + (f", / {nproc} processes" if nproc > 1 else "")


def train_schedule(cfg, labeled: int):
    """train.py's schedule of a stage (iterations, evaluation interval), with its schedule scale."""
    from dataloaders.samplers import batches_per_epoch
    from utils.schedule import scaled_schedule

    iterations = cfg.iterations or round(cfg.base_iterations * labeled_share(cfg))
    eval_every = batches_per_epoch(labeled, cfg.labeled_batch_size) if cfg.eval_every == "epoch" else cfg.eval_every
    return scaled_schedule(getattr(cfg, "schedule_scale", 1), iterations, cfg.consistency_ramp_every,
                           eval_every, cfg.checkpoint_every)


def labeled_share(cfg) -> float:
    """The labeled fraction a train.py stage will have: its labeled list's share of the training ids outside the
    holdout (train.py's iterations default scales with it), or its labeled_fraction."""
    if not getattr(cfg, "labeled_list", None):
        return cfg.labeled_fraction
    train_ids = read_id_list(split_files(cfg.data_dir, cfg.split, cfg.split_name)[0])
    return len(read_id_list(cfg.labeled_list)) / (len(train_ids) - holdout_size(len(train_ids), cfg.holdout))


def print_plan(stages: list[Stage], statuses: dict[str, str]) -> None:
    print(f"\n{'stage':32s} {'status':8s} {'estimate':>10s}  from")
    for stage in stages:
        print(f"{stage.name:32s} {statuses[stage.name]:8s} {format_seconds(stage.estimate):>10s}  "
              f"{stage.estimate_source}")
    pending = [s.estimate for s in stages if statuses[s.name] != "done" and s.estimate is not None]
    if pending:
        print(f"estimated time of what remains: {format_seconds(sum(pending))} (start-up, steps, evaluations and "
              "sampling; data checks and image decoding come on top)", flush=True)


def device_description(device: str) -> str:
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def stage_devices(ledger: Ledger) -> str:
    """The devices the cluster jobs recorded for their stages ('' for a local run, whose device is this host's)."""
    return "; ".join(sorted({entry["device"] for entry in ledger.stages.values() if entry.get("device")}))


def collect(args, splits: list[int], ledger: Ledger) -> tuple[list[dict], dict[int, dict]]:
    """results rows (one per run: arm, split, seed) from each run's metrics.json files, and each
    split's generator figures."""
    rows, generators = [], {}
    out = args.out_dir.resolve()
    for i in splits:
        for s in args.seeds or [None]:
            where, prefix = (out / f"split{i}" / f"seed{s}", f"split{i}/seed{s}") if s is not None else \
                (out / f"split{i}", f"split{i}")
            for arm in args.arms:
                run = json.loads((where / arm / "metrics.json").read_text())
                val = json.loads((where / f"{arm}_val" / "metrics.json").read_text())
                seed = read_yaml(where / arm / "config.yaml", train_options()).get("seed")  # the seed it ran with
                rows.append({"arm": arm, "split": i, "seed": seed, **{m: val.get(m) for m in results.METRIC_NAMES},
                             "selected_iteration": run["best_iteration"], "iterations": run["iterations"],
                             "selection_set": run["selection_set"],
                             "train_seconds": round(ledger.seconds(f"{prefix}/{arm}") or 0, 1),
                             "predict_seconds": round(ledger.seconds(f"{prefix}/{arm}/predict") or 0, 1),
                             **clean_fields(val)})
        if args.generator:
            figures = {}
            for path in (out / f"split{i}" / "ldm" / "vae_metrics.json", out / f"split{i}" / "samples" / "report.json"):
                if path.is_file():
                    figures.update(json.loads(path.read_text()))
            generators[i] = figures
    return rows, generators


def train_options():
    import train
    return train.OPTIONS


def project_version() -> str:
    """The git commit of this checkout (with '+ uncommitted changes' when tracked files differ from it),
    or 'unknown' outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def write_results(args, splits: list[int], ledger: Ledger, device: str) -> Path:
    rows, generators = collect(args, splits, ledger)
    out = args.out_dir.resolve()
    results.write_csv(rows, out / "results.csv", [*results.CSV_COLUMNS, *CLEAN_COLUMNS])
    results.write_csv(rows, out / "times.csv", results.TIME_COLUMNS)
    protocol = (f"checkpoint selected on the last {args.holdout:g} of each training list (holdout); the val ids "
                "evaluated once, by the selected checkpoint" if args.holdout else
                "checkpoint selected on the val ids, which are also the ids reported (the official protocol: "
                "optimistic)")
    seeds = (f"- Seeds: {', '.join(map(str, args.seeds))} (each arm once per split and seed; stage 1 once per split, "
             f"seed {args.seeds[0]})" if args.seeds else
             f"- Seed: {args.seed}" if args.seed is not None else "- Seed: each config's own")
    header = [f"# {dataset_name(args.data_dir)}: {args.labels}, "
              f"splits {', '.join(map(str, splits))}", "",
              f"- Protocol: {protocol}. Metrics per image at the image's own size (predict.py), then averaged.",
              f"- HD95 and ASD in {'mm' if args.spacing_mm or args.spacing_csv else 'pixels'}; NSD at a tolerance of "
              + (f"{args.nsd_tolerance:g} {'mm' if args.spacing_mm or args.spacing_csv else 'pixels'}"
                 if args.nsd_tolerance is not None else "2 pixels") + " (MONAI's definitions: docs/segmentation.md, Metrics).",
              f"- Stage 2 config: `{args.config.name}`{' + ' + shlex.join(args.train_args) if args.train_args else ''}"
              + (f"; stage 1: `{args.ldm_config.name}`{' + ' + shlex.join(args.ldm_args) if args.ldm_args else ''}, "
                 f"{args.num_samples} samples per split" if args.generator else "; no generator"),
              seeds,
              f"- Schedule: x {stage2_config(args).schedule_scale:g} of the published one (train.py --schedule-scale; "
              f"the iterations each run made are in the per-run table)",
              f"- Device: {stage_devices(ledger) or device_description(device)}; {date.today().isoformat()}",
              f"- Project version: {project_version()}",
              f"- Command: `{args.command_line}`"]
    (out / "results.md").write_text(results.markdown(rows, args.arms, generators, header, BASELINES)
                                    + clean_section(rows, args.arms))
    results.plot(rows, args.arms, out / "results.png",
                 f"{dataset_name(args.data_dir)}, {args.labels}: one point per run")
    return out


def run_one_stage(args, stages: list[Stage], ledger: Ledger) -> int:
    """--stage NAME: that stage alone, as a local run would run it (what each cluster job does)."""
    by_name = {stage.name: stage for stage in stages}
    if args.stage not in by_name:
        raise ConfigError(f"--stage {args.stage}: no such stage in this plan; its stages are "
                          + ", ".join(by_name))
    stage = by_name[args.stage]
    missing = [dep for dep in stage.depends if not ledger.stages.get(dep, {}).get("finished")]
    if missing:
        raise ConfigError(f"--stage {stage.name} reads {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not done yet")
    statuses = check_plan([stage], ledger)
    code = execute([stage], ledger, statuses, ROOT)
    if code == 0:  # the device the job ran on (results.md names it, not the device of the host that collects)
        described = device_description(args.device)
        with ledger.transaction():
            if stage.name in ledger.stages:
                ledger.stages[stage.name]["device"] = described
    return code


def submit_jobs(args, stages: list[Stage], ledger: Ledger, statuses: dict[str, str], device: str) -> int:
    """--launcher slurm | submitit-local: a job per stage not done; the number of jobs not ended."""
    from utils import cluster
    from utils.parallel import log_path

    gpus = cluster.job_gpus(args.launcher, device, args.slurm_gpus_per_job, args.nproc_per_node)
    executor = cluster.make_executor(args.launcher, args.out_dir.resolve() / "submitit", args.slurm_time,
                                     args.slurm_partition, gpus, args.slurm_options)
    command = lambda stage: [sys.executable, str(ROOT / "reproduce.py"), *args.argv, "--stage", stage.name,
                             "--no-estimate"]
    states = cluster.submit(stages, ledger, statuses, executor, args.launcher, command, Path.cwd(), log_path)
    if states:
        print(f"\n{'stage':32s} {'job':>10s}  state")
        for name, state in states.items():
            print(f"{name:32s} {ledger.jobs[name]['id']:>10s}  {state}")
        submitted = sum(state == "SUBMITTED" for state in states.values())
        print(f"\n{submitted} jobs submitted, {len(states) - submitted} queued or running before; rerun this command "
              f"to see them, and once they have ended to collect the results (job logs: {executor.folder})", flush=True)
    return len(states)


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
    slots = None
    if args.jobs > 1 or args.gpus is not None:
        from utils.parallel import node_slots
        slots = node_slots(args.jobs, device, args.gpus, args.nproc_per_node)
    if args.stage:
        return run_one_stage(args, stages, ledger)
    # one command drives a folder at a time (the jobs it submitted update the ledger themselves)
    hold(args.out_dir.resolve(), "protocol folder")
    if args.launcher == "local" and ledger.jobs:
        from utils.cluster import active_jobs
        if running := active_jobs(ledger):
            raise ConfigError(f"{len(running)} cluster jobs of {args.out_dir} have not ended ("
                              + ", ".join(f"{n}: job {i}" for n, i in list(running.items())[:5])
                              + "): rerun with their --launcher to see them, or cancel them first")
    statuses = check_plan(stages, ledger)
    print(f"reproduce: {args.data_dir} -> {args.out_dir} | splits {', '.join(map(str, splits))} | arms "
          f"{', '.join(args.arms)} | {args.labels} | "
          f"{'holdout ' + format(args.holdout, 'g') if args.holdout else 'selection on val (official)'}", flush=True)
    note("near-duplicates across the splits: " + "; ".join(split_leak_note(args.data_dir, i, name) for i in splits)
         + f": {DUPLICATES_ADVICE}")
    if args.launcher != "local":
        if submit_jobs(args, stages, ledger, statuses, device):
            return 0
    else:
        if args.estimate and any(status != "done" for status in statuses.values()):
            estimate(stages, statuses, ledger, device, args.nproc_per_node)
        print_plan(stages, statuses)
        if args.jobs > 1:
            from utils.parallel import run_side_by_side
            code = run_side_by_side(stages, ledger, statuses, ROOT, slots, live=args.progress and sys.stdout.isatty())
        else:
            code = execute(stages, ledger, statuses, ROOT)
        if code != 0:
            return code
    ledger.reload()
    out = write_results(args, splits, ledger, device)
    print(f"\n{'stage':32s} {'estimate':>10s} {'measured':>10s}")
    for stage in stages:
        print(f"{stage.name:32s} {format_seconds(stage.estimate):>10s} {format_seconds(ledger.seconds(stage.name)):>10s}")
    total = sum(ledger.seconds(s.name) or 0 for s in stages)
    estimated = [(s.estimate, ledger.seconds(s.name)) for s in stages if s.estimate is not None and ledger.seconds(s.name)]
    print(f"total measured: {format_seconds(total)}" + (
        f"; the stages estimated took {sum(m for _, m in estimated) / sum(e for e, _ in estimated):.2f} x their "
        "estimate" if estimated else "") + (f" (stage time summed: with --jobs {args.jobs} they overlapped)"
                                            if args.jobs > 1 else ""))
    print(f"\n{(out / 'results.md').read_text()}\nwrote {out / 'results.csv'}, {out / 'results.md'}, "
          f"{out / 'results.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
