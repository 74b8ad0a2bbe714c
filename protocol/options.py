"""reproduce.py's options, completed and checked once parsed: the preset's configs, the labels, the
output folder, the arms, the flags passed on to the scripts. Every bad value is one ConfigError."""
from __future__ import annotations

import contextlib
import io
import shlex
import sys
from pathlib import Path

from dataloaders.io import dataset_name
from methods import METHODS
from utils.config import ConfigError, parse_config, read_yaml

from .arms import NETWORKS, UNLABELED, make_arms, parse_arm
from .plan import PRESETS, SCRIPT_OPTIONS


def complete(args, argv=None) -> None:
    """Fill in what the options leave to the preset and the configs, and check their combinations."""
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command_line = shlex.join(["python", "reproduce.py", *args.argv])
    check_launch(args)
    preset = PRESETS[args.preset]
    args.config = args.config or preset["config"]
    args.ldm_config = args.ldm_config or preset["ldm_config"]
    args.num_samples = args.num_samples or preset["num_samples"]
    choose_labels(args)
    choose_arms(args)
    split_passed_flags(args)
    if args.schedule_scale is not None and not args.schedule_scale > 0:
        raise ConfigError(f"--schedule-scale must be positive, got {args.schedule_scale:g}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice would repeat a run")
    if args.spacing_mm and args.spacing_csv:
        raise ConfigError("give --spacing-mm or --spacing-csv, not both")
    args.predict_args = ((["--spacing-mm", *map("{:g}".format, args.spacing_mm)] if args.spacing_mm else [])
                         + (["--spacing-csv", str(args.spacing_csv.resolve())] if args.spacing_csv else [])
                         + (["--nsd-tolerance", f"{args.nsd_tolerance:g}"] if args.nsd_tolerance is not None else []))


def check_launch(args) -> None:
    """--gpus as a list of indices; --jobs with the local launcher only."""
    try:
        args.gpus = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {args.gpus}: a comma-separated list of GPU indices was expected, e.g. 0,1") from None
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and args.launcher != "local":
        raise ConfigError(f"--jobs {args.jobs} is for --launcher local: with {args.launcher}, the cluster runs the jobs")


def choose_labels(args) -> None:
    """--labeled N or a labeled fraction (the stage-2 config's by default), and the output folder named after it."""
    if args.labeled is not None and args.labeled_fraction is not None:
        raise ConfigError("give --labeled-fraction or --labeled N (labeled lists), not both")
    if args.labeled is not None and args.labeled < 1:
        raise ConfigError(f"--labeled must be a positive number of images, got {args.labeled}")
    if args.labeled is None and args.labeled_fraction is None:
        args.labeled_fraction = read_yaml(args.config, SCRIPT_OPTIONS["train.py"]).get("labeled_fraction", 0.5)
    args.labels = (f"labeled lists of {args.labeled}" if args.labeled is not None
                   else f"labeled fraction {args.labeled_fraction:g}")
    args.out_dir = args.out_dir or Path("runs") / (f"{dataset_name(args.data_dir)}_n{args.labeled}" if args.labeled
                                                   else f"{dataset_name(args.data_dir)}_l{args.labeled_fraction:g}")


def choose_arms(args) -> None:
    """args.arms: the arms' names in the table's order; args.arm_of: name -> Arm."""
    if args.arms:
        chosen = [parse_arm(name) for name in args.arms]
        # in the table's order
        args.arms = [arm for arm in make_arms(METHODS, NETWORKS, UNLABELED, pairs=(False, True)) if arm in chosen]
    else:
        args.arms = make_arms(args.methods, args.networks, args.unlabeled or (UNLABELED if args.generator else ["real"]))
    for arm in args.arms:
        if (arm.unlabeled == "synthetic" or arm.pairs) and not args.generator:
            raise ConfigError(f"--arms {arm.name} needs the generator: drop --no-generator")
    args.pairs = any(arm.pairs for arm in args.arms)  # the split's mask-conditioned generator and its pairs
    args.arm_of = {arm.name: arm for arm in args.arms}
    args.arms = [arm.name for arm in args.arms]


# reproduce.py's options whose value is a script's flags, and that script
PASSED_FLAGS = {"--train-args": "train.py", "--ldm-args": "train_ldm.py", "--sample-args": "sample_ldm.py"}


def join_passed_values(argv: list[str]) -> list[str]:
    """``--ldm-args --no-class-conditioning`` as ``--ldm-args=--no-class-conditioning``: argparse would take a
    value that starts with '-' for an option of reproduce.py ("expected one argument"), so the word after
    one of PASSED_FLAGS is its value, whatever it starts with (as with the '=' form)."""
    joined, k = [], 0
    while k < len(argv):
        if argv[k] in PASSED_FLAGS and k + 1 < len(argv):
            joined.append(f"{argv[k]}={argv[k + 1]}")
            k += 2
        else:
            joined.append(argv[k])
            k += 1
    return joined


def split_passed_flags(args) -> None:
    """--train-args, --ldm-args and --sample-args split into flags as a shell would, and each checked
    against its script's options now, before any stage starts."""
    for flag, script in PASSED_FLAGS.items():
        name = flag[2:].replace("-", "_")
        try:
            setattr(args, name, shlex.split(getattr(args, name)))
        except ValueError as error:  # an unclosed quote: shlex says "No closing quotation"
            raise ConfigError(f"{flag} {getattr(args, name)!r} cannot be split into flags as a "
                              f"shell would: {error}; close the quote (or quote the whole value once)") from None
        check_script_flags(flag, script, getattr(args, name))


def check_script_flags(flag: str, script: str, flags: list[str]) -> None:
    """One ConfigError naming the script and reproduce.py's flag when ``flags`` are not valid options of
    ``script`` (an unknown flag, a missing or malformed value, a value out of range)."""
    if not flags:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parse_config(SCRIPT_OPTIONS[script], "", flags)
    except SystemExit:  # argparse's own error: its last line says what was wrong
        problem = captured.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ConfigError(f"{flag} {shlex.join(flags)!r}: not valid for {script}: {problem}") from None
    except ConfigError as error:
        raise ConfigError(f"{flag} {shlex.join(flags)!r}: not valid for {script}: {error}") from None
