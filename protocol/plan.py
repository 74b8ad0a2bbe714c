"""Every stage of the protocol, in the order they run, and the scripts' resolved settings.

A stage is one run of a project script (protocol/ledger.py): per split, train_ldm.py and sample_ldm.py
(stage 1, unless --no-generator), then per seed and arm train.py and predict.py on the val ids. The
scripts' option schemas come from the library modules that define them (train.py's from
segmenter/options.py, train_ldm.py's from generation/config.py, sample_ldm.py's from
generation/sampling_config.py), so that nothing here imports a script.
"""
from __future__ import annotations

import re
from pathlib import Path

from dataloaders.io import DataError, dataset_name, find_cases, image_folder, note, read_id_list, split_file
from generation import config as ldm_config, sampling_config
from segmenter import options as segmenter_options
from utils.config import file_values, parse_config

from .ledger import Stage

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {  # stage-2 config, stage-1 config, synthetic images per split
    "busi": dict(config=ROOT / "configs" / "busi.yaml", ldm_config=ROOT / "configs" / "ldm_busi.yaml", num_samples=1000),
    "demo": dict(config=ROOT / "configs" / "demo.yaml", ldm_config=ROOT / "configs" / "ldm_demo.yaml", num_samples=128),
    "cpu": dict(config=ROOT / "configs" / "cpu.yaml", ldm_config=ROOT / "configs" / "ldm_demo.yaml", num_samples=256),
}
# each script's option schema, by the script's name in a stage's command
SCRIPT_OPTIONS = {"train.py": segmenter_options.OPTIONS, "train_ldm.py": ldm_config.OPTIONS,
                  "sample_ldm.py": sampling_config.OPTIONS}


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
        for folder in [*(getattr(cfg, "unlabeled_dir", []) or []), getattr(cfg, "synthetic_pairs", None)]:
            if folder is not None and Path(folder).is_dir():
                files.update({str(p): p for p in image_folder(folder)})
        if getattr(cfg, "labeled_list", None) and stage.command[0] == "train_ldm.py":  # the pairs' generator
            files[str(cfg.labeled_list)] = Path(cfg.labeled_list)
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


def torchrun_launcher(nproc_per_node: int) -> list[str]:
    """The interpreter's arguments that run a stage under torchrun with N processes ([] for one)."""
    return (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
            if nproc_per_node > 1 else [])


def resumable(script: str, folder: Path, shown: list[str], *state_files: str):
    """Stage.resume of a script that continues from ``folder`` with --resume once a state file is there."""
    def resume():
        if any((folder / name).is_file() for name in state_files):
            return [script, "--out-dir", str(folder), "--resume", *shown]
        return None
    return resume


def generator_stages(args, data: Path, run: Path, i: int, name: str, shown: list[str],
                     mask_values: str = "binary") -> list[Stage]:
    """Stage 1 of split i: train_ldm.py on the split's training ids, then sample_ldm.py (and with -pairs arms,
    the mask-conditioned generator, reading the masks as the arms do, and its pairs)."""
    ldm, samples = run / "ldm", run / "samples"
    seeds = args.seeds or [args.seed]  # stage 1 once per split, with the first seed
    seed = ["--seed", str(seeds[0])] if seeds[0] is not None else []
    # the generator must not see the ids an arm selects on: its samples would carry them into training
    holdout = ["--holdout", f"{args.holdout:g}"] if args.holdout else []
    torchrun = torchrun_launcher(args.nproc_per_node)
    return [
        Stage(f"split{i}/ldm", ["train_ldm.py", "--config", str(args.ldm_config.resolve()), "--data-dir", str(data),
                                "--split", str(i), "--split-name", name, *holdout, "--out-dir", str(ldm), *seed,
                                *args.ldm_args, *shown],
              ldm, resume=resumable("train_ldm.py", ldm, shown, "state_vae.pt", "state_diffusion.pt"),
              launcher=torchrun),
        Stage(f"split{i}/samples", ["sample_ldm.py", "--checkpoint", str(ldm), "--num-images", str(args.num_samples),
                                    "--out-dir", str(samples), *seed, *args.sample_args, *shown],
              samples, depends=[f"split{i}/ldm"], launcher=torchrun)] + (
        pairs_stages(args, data, run, i, name, shown, mask_values) if getattr(args, "pairs", False) else [])


def arm_labels(args, data: Path, i: int, name: str) -> list[str]:
    """The labeled images of split i's arms: the split's labeled list, or the head of its training list."""
    return (["--labeled-list", str(labeled_list_file(data, name, i, args.labeled))] if args.labeled
            else ["--labeled-fraction", f"{args.labeled_fraction:g}"])


def pairs_stages(args, data: Path, run: Path, i: int, name: str, shown: list[str], mask_values: str) -> list[Stage]:
    """The pairs of split i (arms ending in -pairs): a mask-conditioned train_ldm.py on the arms' labeled images
    (its autoencoder on all the split's training ids but the holdout), then sample_ldm.py's image-mask pairs."""
    ldm, pairs = run / "ldm-pairs", run / "pairs"
    seeds = args.seeds or [args.seed]
    seed = ["--seed", str(seeds[0])] if seeds[0] is not None else []
    holdout = ["--holdout", f"{args.holdout:g}"] if args.holdout else []
    torchrun = torchrun_launcher(args.nproc_per_node)
    return [
        Stage(f"split{i}/ldm-pairs", ["train_ldm.py", "--config", str(args.ldm_config.resolve()), "--data-dir",
                                      str(data), "--split", str(i), "--split-name", name, *holdout, "--conditioning",
                                      "mask", *arm_labels(args, data, i, name), "--mask-values", mask_values,
                                      "--out-dir", str(ldm), *seed,
                                      *args.ldm_args, *shown],
              ldm, resume=resumable("train_ldm.py", ldm, shown, "state_vae.pt", "state_diffusion.pt"),
              launcher=torchrun),
        Stage(f"split{i}/pairs", ["sample_ldm.py", "--checkpoint", str(ldm), "--num-images", str(args.num_samples),
                                  "--out-dir", str(pairs), *seed, *args.sample_args, *shown],
              pairs, depends=[f"split{i}/ldm-pairs"], launcher=torchrun)]


def arm_stages(args, data: Path, run: Path, i: int, name: str, shown: list[str], mask_values: str) -> list[Stage]:
    """Stage 2 of split i: per seed and arm, train.py, then predict.py of its selected checkpoint on the val ids."""
    samples = run / "samples"
    scale = ["--schedule-scale", f"{args.schedule_scale:g}"] if args.schedule_scale is not None else []
    torchrun = torchrun_launcher(args.nproc_per_node)
    # every arm labels the same images: the split's labeled list, or the head of its training list
    labels = arm_labels(args, data, i, name)
    stages = []
    for s in args.seeds or [args.seed]:  # None: each config's own
        # with --seeds, each seed's runs in their own folder; the generator is the split's one
        where, prefix = (run / f"seed{s}", f"split{i}/seed{s}") if args.seeds else (run, f"split{i}")
        arm_seed = ["--seed", str(s)] if s is not None else []
        for arm in args.arms:
            folder = where / arm
            synthetic = args.arm_of[arm].unlabeled == "synthetic"
            pairs = args.arm_of[arm].pairs
            stages.append(Stage(
                f"{prefix}/{arm}", ["train.py", "--config", str(args.config.resolve()), "--data-dir", str(data),
                                    "--split", str(i), "--split-name", name, *labels, "--holdout", f"{args.holdout:g}",
                                    *args.arm_of[arm].flags(samples, run / "pairs"), *arm_seed, *scale,
                                    *args.train_args, "--mask-values", mask_values, "--out-dir", str(folder), *shown],
                folder, depends=([f"split{i}/samples"] if synthetic else []) + ([f"split{i}/pairs"] if pairs else []),
                resume=resumable("train.py", folder, shown, "checkpoint_last.pt"), launcher=torchrun))
            # predict.py takes the image size, channels and normalisation from the checkpoint
            stages.append(Stage(
                f"{prefix}/{arm}/predict", ["predict.py", "--checkpoint", str(folder / "checkpoint_best.pt"),
                                            "--input-dir", str(data), "--ids", str(split_file(data, "val", i, name)),
                                            "--masks-dir", str(data / "masks" / "0"), "--mask-values", mask_values,
                                            # every id the split's runs and generator trained on: the clean subset
                                            "--trained-ids", str(split_file(data, "train", i, name)),
                                            *args.predict_args, "--output-dir", str(where / f"{arm}_val"), *shown],
                where / f"{arm}_val", depends=[f"{prefix}/{arm}"], overwrite_flag=None))
    return stages


# the mask fidelity of the pairs (issue 31): a segmenter trained on the real labeled images alone (the
# supervised arm of the first seed) segments the pairs, and, for comparison, the unconditional generator's
# samples of the same names, each scored against the pair's mask: (stage name suffix, images, output folder)
FIDELITY = (("pairs/predict", "pairs", "pairs_fidelity"), ("samples/predict", "samples", "samples_fidelity"))


def fidelity_stages(args, data: Path, run: Path, i: int, shown: list[str]) -> list[Stage]:
    """predict.py on split i's pairs and samples against the pairs' masks, with the supervised arm's checkpoint;
    none unless the protocol has -pairs arms and the supervised arm."""
    if not getattr(args, "pairs", False) or "supervised" not in args.arms:
        return []
    seeds = args.seeds or [args.seed]
    where, prefix = (run / f"seed{seeds[0]}", f"split{i}/seed{seeds[0]}") if args.seeds else (run, f"split{i}")
    stages = []
    for suffix, images, folder in FIDELITY:
        stages.append(Stage(
            f"split{i}/{suffix}", ["predict.py", "--checkpoint", str(where / "supervised" / "checkpoint_best.pt"),
                                   "--input-dir", str(run / images), "--masks-dir", str(run / "pairs" / "masks" / "0"),
                                   "--no-overlays", *args.predict_args, "--output-dir", str(run / folder), *shown],
            run / folder, depends=[f"{prefix}/supervised", f"split{i}/pairs", f"split{i}/{images}"],
            overwrite_flag=None))
    return stages


def plan(args, name: str, splits: list[int], device: str) -> list[Stage]:
    """Every stage of the protocol, in the order they run."""
    data, out = args.data_dir.resolve(), args.out_dir.resolve()
    shown = ["--device", device] + ([] if args.progress else ["--no-progress"])
    mask_values = args.mask_values or mask_values_of(args)
    stages = []
    for i in splits:
        run = out / f"split{i}"
        split_stages = (generator_stages(args, data, run, i, name, shown, mask_values) if args.generator else []) \
            + arm_stages(args, data, run, i, name, shown, mask_values) \
            + fidelity_stages(args, data, run, i, shown)
        for stage in split_stages:
            stage.reads = stage_reads(stage, data, i, name)
            options = SCRIPT_OPTIONS.get(stage.command[0])
            stage.defaults = {o.name: o.default for o in options if o.in_file} if options else {}
        stages += split_stages
    return stages


def stage_kind(name: str) -> str:
    """'mgcc-real/predict' of 'split2/seed5/mgcc-real/predict': the stage without its split and seed."""
    return re.sub(r"^split\d+/(seed-?\d+/)?", "", name)


def stage2_config(args):
    """The stage-2 configuration every arm shares: its config file, --schedule-scale, then --train-args."""
    scale = ["--schedule-scale", f"{args.schedule_scale:g}"] if args.schedule_scale is not None else []
    return parse_config(SCRIPT_OPTIONS["train.py"], "", ["--config", str(args.config), *scale, *args.train_args])


def mask_values_of(args) -> str:
    """The stage-2 configuration's mask_values, which every training and predict stage must share."""
    return stage2_config(args).mask_values


def config_values(stage: Stage, cfg) -> dict:
    """The resolved configuration of a stage as its config.yaml holds it."""
    return file_values(cfg, SCRIPT_OPTIONS[stage.command[0]])


def stage_config(stage: Stage):
    """The resolved configuration of a training or sampling stage, as its script would resolve it."""
    script, argv = stage.command[0], stage.command[1:]
    return parse_config(SCRIPT_OPTIONS[script], "", argv)
