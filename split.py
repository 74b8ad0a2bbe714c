"""Write the train/validation split files of a labelled dataset folder.

Default: the published protocol of CMU-Net and MGCC, three random 70/30 splits made with
scikit-learn's ``train_test_split(ids, test_size=0.3, random_state=seed)`` for seeds 41, 64 and 1337,
written as ``<name>_train{1,2,3}.txt`` and ``<name>_val{1,2,3}.txt`` (one id per line). On the BUSI
folder this reproduces the published busi_train/val files exactly. ``--folds K`` writes a K-fold
cross-validation instead (files numbered 1..K).

The ids are sorted before they are shuffled, so one folder gives the same files on every machine,
whatever order its file system lists them in. Training files keep the shuffled order: train.py takes
its labeled subset from the head of the list, which must therefore not be sorted by class.

``--labeled N ...`` also writes, for each split i and each N, ``<name>_train<i>_labeled<N>.txt``: N ids
of that training list drawn at random (numpy ``default_rng([--labeled-seed, i])``), kept in the training
list's order, each smaller list inside the larger ones, for train.py's ``--labeled-list`` (UniMatch ships
its labeled subsets as such files). When the split files are already there (and no ``--overwrite``), only
the labeled lists are written, from the training lists in the folder.

    python split.py --data-dir inputs/BUSI
    python split.py --data-dir inputs/BUSI --folds 5 --overwrite
    python split.py --data-dir inputs/BUSI --labeled 50 100
    python split.py --data-dir inputs/BUSI --check [--pairs-png pairs.png]
    python split.py --data-dir inputs/BUSI --grouped --split-name busi_grouped

Duplicates (see dataloaders/duplicates.py). ``--check`` writes nothing: it finds the exact and
near-duplicate images of the folder and reports, for each existing split, how many val ids have one
in their training list, with the pairs. ``--grouped`` keeps each group of duplicates (a connected
component of the pairs) on one side of every split: random splits fill each val list with whole
groups, in a seeded random order, up to the val size; K folds take whole groups, largest first, each
into the fold with the fewest ids. The default (ungrouped) splits are the published ones, unchanged.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dataloaders.duplicates import (DEFAULT_THRESHOLD, Pair, check_threshold, closest_pairs_image, find_pairs,
                                    fingerprint, groups, partners)
from dataloaders.io import (DataError, add_pixel_limit_flag, check_pairs, dataset_name, find_cases, read_id_list,
                            select_cases, set_max_image_pixels)

DEFAULT_SEEDS = (41, 64, 1337)
DEFAULT_VAL_FRACTION = 0.3
_ID_CLASS = re.compile(r"^(.*\S) \(\d+\)$")  # BUSI-style ids: "benign (12)" -> class "benign"


def make_splits(ids: list[str], seeds: list[int] = DEFAULT_SEEDS, val_fraction: float = DEFAULT_VAL_FRACTION,
                folds: int | None = None) -> list[tuple[list[str], list[str]]]:
    """The (train ids, val ids) of each split, in file order (split i is element i-1).

    Random splits: one per seed, ``train_test_split(sorted ids, test_size=val_fraction,
    random_state=seed)``. K-fold: ``KFold(folds, shuffle=True, random_state=seeds[0])`` on the sorted
    ids; each training list is then put in a seeded random order (it comes out of KFold sorted).
    """
    from sklearn.model_selection import KFold, train_test_split
    from sklearn.utils import shuffle

    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise DataError("ids must be unique")
    if folds is not None:
        if folds < 2:
            raise DataError(f"--folds must be at least 2, got {folds}")
        if folds > len(ids):
            raise DataError(f"--folds {folds} needs at least {folds} cases; the dataset has {len(ids)}")
        splitter = KFold(n_splits=folds, shuffle=True, random_state=seeds[0])
        return [(shuffle([ids[i] for i in train], random_state=seeds[0]), [ids[i] for i in val])
                for train, val in splitter.split(ids)]
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not seeds:
        raise DataError("--seeds needs at least one seed")
    splits = []
    for seed in seeds:
        try:
            train, val = train_test_split(ids, test_size=val_fraction, random_state=seed)
        except ValueError as error:  # too few ids for this fraction: one side would be empty
            raise DataError(f"cannot split {len(ids)} cases with --val-fraction {val_fraction}: {error}") from None
        splits.append((list(train), list(val)))
    return splits


def make_grouped_splits(ids: list[str], id_groups: list[list[str]], seeds: list[int] = DEFAULT_SEEDS,
                        val_fraction: float = DEFAULT_VAL_FRACTION, folds: int | None = None,
                        ) -> list[tuple[list[str], list[str]]]:
    """Like :func:`make_splits`, but every group of ``id_groups`` (a partition of ``ids``) on one side.

    Random splits (one per seed, ``default_rng(seed)``): the groups in a random order fill the val list
    with whole groups while they fit in ceil(val_fraction * n) ids (scikit-learn's val size). K folds
    (``default_rng(seeds[0])``): the groups in a random order, then largest first, each into the fold
    with the fewest ids. Val lists keep the groups' drawn order; training lists are shuffled.
    """
    if sorted(i for g in id_groups for i in g) != sorted(ids):
        raise DataError("the groups must partition the ids")
    id_groups = sorted(sorted(g) for g in id_groups)  # one order whatever the caller's
    if folds is not None:
        if not 2 <= folds <= len(id_groups):
            raise DataError(f"--folds {folds} with --grouped needs 2 to {len(id_groups)} (the number of groups)")
        rng = np.random.default_rng(seeds[0])
        drawn = [id_groups[k] for k in rng.permutation(len(id_groups))]
        members: list[list[str]] = [[] for _ in range(folds)]
        for group in sorted(drawn, key=len, reverse=True):  # stable: ties keep the drawn order
            min(members, key=len).extend(group)
        vals = members
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        target = math.ceil(val_fraction * len(ids))
        vals = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            val: list[str] = []
            for k in rng.permutation(len(id_groups)):
                if len(val) + len(id_groups[k]) <= target:
                    val += id_groups[k]
            vals.append(val)
    splits = []
    for index, val in enumerate(vals):
        chosen = set(val)
        train = [i for i in sorted(ids) if i not in chosen]
        rng = np.random.default_rng([seeds[0] if folds is not None else seeds[index], index])
        train = [train[k] for k in rng.permutation(len(train))]
        if not train or not val:
            raise DataError(f"grouped split {index + 1} leaves an empty {'val' if not val else 'training'} list "
                            "(groups too large for this --val-fraction)")
        splits.append((train, val))
    return splits


def labeled_lists(train: list[str], counts: list[int], seed: int, index: int) -> dict[int, list[str]]:
    """N -> N ids of split ``index``'s training list, drawn with ``default_rng([seed, index])``, in the list's
    order. One permutation serves every N, so each smaller list is inside the larger ones."""
    bad = [n for n in counts if not 1 <= n <= len(train)]
    if bad:
        raise DataError(f"--labeled {bad[0]}: split {index} has {len(train)} training ids; choose 1 to {len(train)}")
    order = np.random.default_rng([seed, index]).permutation(len(train))
    return {n: [train[k] for k in sorted(order[:n])] for n in counts}


def labeled_file_name(name: str, index: int, count: int) -> str:
    return f"{name}_train{index}_labeled{count}.txt"


def existing_split_files(data_dir: Path, name: str, labeled: bool | None = None) -> list[Path]:
    """The ``<name>_train<i>.txt`` / ``<name>_val<i>.txt`` files already in data_dir, and the labeled lists
    ``<name>_train<i>_labeled<N>.txt`` (``labeled`` True: those only; False: none of them)."""
    pattern = re.compile(rf"^{re.escape(name)}_(train|val)\d+(_labeled\d+)?\.txt$")
    return sorted(p for p in data_dir.iterdir() if p.is_file() and (m := pattern.match(p.name))
                  and (labeled is None or bool(m[2]) == labeled))


def check_ids(ids: list[str], cases: dict) -> None:
    """Ids must survive the one-id-per-line round trip (read_id_list strips each line)."""
    bad = [str(cases[i][0]) for i in ids if i != i.strip() or "\n" in i or "\r" in i]
    if bad:
        raise DataError("file names that cannot be written as one id per line (leading/trailing "
                        "white space or a line break in the name): " + ", ".join(bad[:20]))


def write_split_files(data_dir: Path, name: str, splits: list[tuple[list[str], list[str]]],
                      overwrite: bool = False, labeled: dict[int, dict[int, list[str]]] | None = None,
                      ) -> tuple[list[Path], list[Path]]:
    """Write every split file (and the labeled lists: split index -> N -> ids) atomically; returns
    (written, removed stale files).

    All files are first written to temporary files beside their targets and only then renamed over
    them, so an interrupted run leaves either the old files or the new ones, never a half file. With
    ``overwrite``, split files of this name that the new splits do not replace (``_train5`` after
    switching from 5 folds to 3 splits, labeled lists of the old training lists) are removed, so the
    folder never mixes two protocols.
    """
    contents = {}
    for index, (train, val) in enumerate(splits, start=1):
        contents[data_dir / f"{name}_train{index}.txt"] = "".join(f"{i}\n" for i in train)
        contents[data_dir / f"{name}_val{index}.txt"] = "".join(f"{i}\n" for i in val)
    contents.update(labeled_contents(data_dir, name, labeled or {}))
    return write_atomically(data_dir, contents, existing_split_files(data_dir, name), overwrite)


def labeled_contents(data_dir: Path, name: str, labeled: dict[int, dict[int, list[str]]]) -> dict[Path, str]:
    return {data_dir / labeled_file_name(name, index, n): "".join(f"{i}\n" for i in ids)
            for index, lists in labeled.items() for n, ids in lists.items()}


def write_atomically(data_dir: Path, contents: dict[Path, str], existing: list[Path],
                     overwrite: bool) -> tuple[list[Path], list[Path]]:
    """Write ``contents`` (path -> text) atomically; ``existing`` files are refused without ``overwrite``
    and, with it, removed when not rewritten. Returns (written, removed)."""
    if existing and not overwrite:
        listed = "\n".join(f"  {p}" for p in existing[:20])
        raise DataError(f"split files already exist in {data_dir} (use --overwrite to replace them):\n{listed}")
    temporary = {}
    try:
        for path, text in contents.items():
            fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{path.name}.", suffix=".tmp")
            temporary[path] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
    stale = [p for p in existing if p not in contents]
    for path in stale:
        path.unlink()
    return list(contents), stale


def class_counts(ids: list[str]) -> str:
    """'137 benign, 58 malignant' for BUSI-style ids, '' when the ids do not name a class."""
    matches = [_ID_CLASS.match(i) for i in ids]
    if not all(matches):
        return ""
    counts = Counter(m.group(1) for m in matches)
    return " (" + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) + ")"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="The folder is checked first (every image has a mask and vice versa, no id with two "
               "files, every file readable, masks the size of their images); any problem is reported "
               "as one error and nothing is written.")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="dataset folder holding images/ and masks/0/; the split files are written "
                             "into it (required)")
    parser.add_argument("--split-name", "--name", dest="name", default=None,
                        help="file name prefix: <name>_train<i>.txt, the --split-name of train.py and "
                             "train_ldm.py (default: the folder's name, lower-case)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="random_state of each 70/30 split, one split per seed; with --folds, the one "
                             f"seed of the K-fold shuffle (default: {' '.join(map(str, DEFAULT_SEEDS))}; "
                             f"{DEFAULT_SEEDS[0]} with --folds)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"fraction of the cases in each validation file (default: {DEFAULT_VAL_FRACTION}); "
                             "not with --folds, where it is 1/K")
    parser.add_argument("--folds", type=int, default=None,
                        help="write a K-fold cross-validation (K >= 2, files 1..K) instead of random "
                             "splits (default: none)")
    parser.add_argument("--labeled", type=int, nargs="+", default=None, metavar="N",
                        help="also write <name>_train<i>_labeled<N>.txt: N training ids of each split drawn at random "
                             "(nested), for train.py --labeled-list; with split files already there, only these "
                             "are written (default: none)")
    parser.add_argument("--labeled-seed", type=int, default=0,
                        help="seed of the --labeled draws: split i uses default_rng([seed, i]) (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing <name>_train*/_val* files (default: refuse); stale ones "
                             "beyond the new count are removed")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: report the folder's exact and near-duplicate images and, for each "
                             "existing split, how many val ids have one in their training list, with the pairs")
    parser.add_argument("--grouped", action="store_true",
                        help="keep each group of exact or near-duplicate images on one side of every split (random "
                             "splits and --folds; default: off, the published ungrouped protocol)")
    parser.add_argument("--duplicate-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="near-duplicate score (0-1] at or above which two images are duplicates, for --check "
                             f"and --grouped (default: {DEFAULT_THRESHOLD:g}; see dataloaders/duplicates.py)")
    parser.add_argument("--pairs-png", type=Path, default=None,
                        help="with --check or --grouped: write a picture of the 16 closest pairs there, for a person "
                             "to check (default: none)")
    add_pixel_limit_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    try:
        if args.folds is not None and args.val_fraction is not None:
            raise DataError("--val-fraction cannot be used with --folds (each validation fold is 1/K)")
        if args.folds is not None and args.seeds is not None and len(args.seeds) > 1:
            raise DataError(f"--folds uses one seed, got {len(args.seeds)}: {' '.join(map(str, args.seeds))}")
        if args.check and (args.grouped or args.labeled or args.overwrite):
            raise DataError("--check writes nothing: not with --grouped, --labeled or --overwrite")
        if args.pairs_png is not None and not (args.check or args.grouped):
            raise DataError("--pairs-png goes with --check or --grouped")
        check_threshold(args.duplicate_threshold)
        seeds = args.seeds or list(DEFAULT_SEEDS)
        val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        data_dir = args.data_dir
        name = args.name if args.name is not None else dataset_name(data_dir)
        if not name.strip() or name != name.strip() or "/" in name or os.sep in name:
            raise DataError(f"--split-name {name!r} is not a usable file name prefix")
        cases = find_cases(data_dir)
        ids = list(cases)
        check_ids(ids, cases)
        check_pairs([(i, *cases[i]) for i in ids], progress=sys.stderr.isatty())
        if args.check:
            return check_splits(data_dir, name, cases, args.duplicate_threshold, args.pairs_png)
        counts = sorted(set(args.labeled or []))
        present = existing_split_files(data_dir, name, labeled=False)
        if counts and present and not args.overwrite:
            return write_labeled_only(data_dir, name, cases, present, counts, args.labeled_seed)
        if args.grouped:
            pairs = duplicate_pairs(cases, args.duplicate_threshold)
            linked = describe_duplicates(cases, pairs, args.duplicate_threshold)
            splits = make_grouped_splits(ids, groups(ids, pairs), seeds, val_fraction, args.folds)
            if args.pairs_png is not None:
                from utils.plots import save_image
                save_image(args.pairs_png, closest_pairs_image(pairs, {i: cases[i][0] for i in cases}))
        else:
            splits = make_splits(ids, seeds, val_fraction, args.folds)
        labeled = {index: labeled_lists(train, counts, args.labeled_seed, index)
                   for index, (train, _) in enumerate(splits, start=1)} if counts else {}
        written, stale = write_split_files(data_dir, name, splits, args.overwrite, labeled)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    protocol = (f"{args.folds}-fold cross-validation (seed {seeds[0]})" if args.folds
                else f"{len(splits)} random split(s), {val_fraction:g} validation")
    if args.grouped:
        protocol += f", grouped ({len(linked)} group(s) of duplicates each kept on one side)"
    print(f"{data_dir}: {len(ids)} cases{class_counts(ids)}; {protocol}")
    for index, (train, val) in enumerate(splits, start=1):
        seed_text = "" if args.folds else f", seed {seeds[index - 1]}"
        print(f"  split {index}{seed_text}: {len(train)} train / {len(val)} val{class_counts(val)} "
              f"-> {name}_train{index}.txt, {name}_val{index}.txt")
    for index, lists in labeled.items():
        print(f"  split {index} labeled lists: " + ", ".join(labeled_file_name(name, index, n) for n in lists))
    if stale:
        print(f"  removed {len(stale)} stale file(s): {', '.join(p.name for p in stale)}")
    print(f"wrote {len(written)} files in {data_dir}")
    return 0


def duplicate_pairs(cases: dict, threshold: float) -> list[Pair]:
    """Every exact or near-duplicate pair of the folder's images."""
    return find_pairs(fingerprint((i, cases[i][0]) for i in sorted(cases)), threshold=threshold)


def describe_duplicates(cases: dict, pairs: list[Pair], threshold: float) -> list[list[str]]:
    """Print the folder's duplicate counts; returns the groups of two or more ids."""
    linked = [g for g in groups(cases, pairs) if len(g) > 1]
    exact = sum(p.exact for p in pairs)
    print(f"{len(cases)} images: {exact} exact-duplicate pair(s) (same pixels), {len(pairs) - exact} near-duplicate "
          f"pair(s) (score >= {threshold:g}); {len(linked)} group(s) of duplicates holding {sum(map(len, linked))} "
          "images")
    return linked


def check_splits(data_dir: Path, name: str, cases: dict, threshold: float, pairs_png: Path | None) -> int:
    """--check: for each existing split, the val ids with an exact or near-duplicate in the training list."""
    present = existing_split_files(data_dir, name, labeled=False)
    indices = sorted({int(m[1]) for p in present if (m := re.fullmatch(rf"{re.escape(name)}_val(\d+)\.txt", p.name))})
    if not indices:
        raise DataError(f"no split files {name}_val<i>.txt in {data_dir}: nothing to check (write them first, or "
                        "give --split-name)")
    lists = {}
    for index in indices:
        train_file, val_file = data_dir / f"{name}_train{index}.txt", data_dir / f"{name}_val{index}.txt"
        if not train_file.is_file():
            raise DataError(f"{val_file} has no {train_file.name} beside it")
        lists[index] = [(f, [i for i, *_ in select_cases(cases, read_id_list(f), str(f))]) for f in (train_file, val_file)]
    pairs = duplicate_pairs(cases, threshold)
    describe_duplicates(cases, pairs, threshold)
    for index, ((train_file, train), (val_file, val)) in lists.items():
        leaks = partners(val, train, pairs)
        print(f"  split {index}: {len(leaks)} of {len(val)} val ids ({val_file.name}) have an exact or near-duplicate "
              f"in {train_file.name}")
        for case_id in [i for i in val if i in leaks]:
            print(f"    {case_id!r} ~ " + ", ".join(f"{pair.other(case_id)!r} ({pair.kind()})" for pair in leaks[case_id]))
    if pairs_png is not None:
        from utils.plots import save_image
        save_image(pairs_png, closest_pairs_image(pairs, {i: cases[i][0] for i in cases}))
        print(f"closest pairs (the first 16): {pairs_png}")
    return 0


def write_labeled_only(data_dir: Path, name: str, cases: dict, present: list[Path], counts: list[int],
                       seed: int) -> int:
    """--labeled with the split files already there: the labeled lists of the training lists in the folder."""
    trains = {int(m[1]): p for p in present if (m := re.fullmatch(rf"{re.escape(name)}_train(\d+)\.txt", p.name))}
    labeled = {}
    for index, path in sorted(trains.items()):
        train = read_id_list(path)
        select_cases(cases, train, str(path))  # every listed id has its files
        labeled[index] = labeled_lists(train, counts, seed, index)
    contents = labeled_contents(data_dir, name, labeled)
    written, _ = write_atomically(data_dir, contents, [p for p in contents if p.exists()], overwrite=False)
    for index, lists in labeled.items():
        print(f"  split {index} ({trains[index].name}): " + ", ".join(labeled_file_name(name, index, n) for n in lists))
    print(f"wrote {len(written)} labeled lists in {data_dir} (the split files there are kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
