"""Which images play which part in a run: labeled, unlabeled, model selection, report.

From a split's ``<name>_train<i>.txt`` (already shuffled by split.py, order kept):
- with ``holdout`` > 0 the last round(holdout * n) ids are carved out for model selection, and the
  split's val list is evaluated once, at the end, with the selected checkpoint;
- labeled: the first int(labeled_fraction * m) of the remaining m ids (as the official code), or the
  ids of a ``labeled_list`` file (as UniMatch ships them), which must all be among those m ids;
- unlabeled: the remaining training ids (images only, when ``unlabeled_from_train``) and the images
  of every ``unlabeled_dirs`` folder (stage 1's output), refused when their generator trained on
  an evaluated id (see :mod:`dataloaders.provenance`).
Without holdout the val list serves both for selection and for the report: the official protocol,
which is optimistic, and said so in metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .provenance import check_unlabeled_provenance, evaluated_fingerprints
from .io import (DataError, check_images, check_pairs, find_cases, read_id_list, select_cases, split_files,
                 unlabeled_images)

Item = tuple[str, Path, "Path | None"]


@dataclass
class RunData:
    labeled: list[Item]
    unlabeled: list[Item]
    selection: list[Item]  # evaluated periodically; picks checkpoint_best
    selection_name: str  # "val" or "holdout"
    report: list[Item] = field(default_factory=list)  # evaluated once at the end (holdout protocol)
    labeled_share: float = 1.0  # labeled images / training ids outside the holdout (the labeled fraction)
    synthetic: list[Item] = field(default_factory=list)  # synthetic image-mask pairs (train.py --synthetic-pairs)

    def summary(self) -> str:
        pairs = f" (+ {len(self.synthetic)} synthetic pairs)" if self.synthetic else ""
        text = (f"{len(self.labeled)} labeled{pairs}, {len(self.unlabeled)} unlabeled, "
                f"{len(self.selection)} {self.selection_name} images")
        return text + (f", {len(self.report)} val images reported at the end" if self.report else "")


def holdout_size(n: int, holdout: float) -> int:
    """How many ids at the end of a training list of ``n`` the holdout protocol sets aside for selection."""
    if not 0 <= holdout < 1:
        raise DataError(f"holdout must be in [0, 1), got {holdout}")
    count = round(holdout * n)
    if holdout and not 0 < count < n:
        raise DataError(f"holdout {holdout} of {n} training ids leaves {count} for selection")
    return count


def labeled_from_list(pool: list[Item], labeled_list: str | Path, train_file: Path,
                      n_holdout: int = 0) -> tuple[list[Item], list[Item]]:
    """(labeled, the rest of the pool): the ids of ``labeled_list`` in its order, every one of them in the pool
    (the training list less its holdout); the first that is not is named in the error."""
    ids = read_id_list(labeled_list)
    by_id = {item[0]: item for item in pool}
    stray = next((i for i in ids if i not in by_id), None)
    if stray is not None:
        where = f"the training ids of {train_file.name}" + (f" outside its last {n_holdout} (holdout)" if n_holdout else "")
        raise DataError(f"labeled list {labeled_list} names {stray!r}, which is not among {where}; a labeled list "
                        "must be a subset of the training list (split.py --labeled N writes such lists)")
    chosen = set(ids)
    return [by_id[i] for i in ids], [item for item in pool if item[0] not in chosen]


def choose_labeled(pool: list, labeled_fraction: float, labeled_list: str | Path | None, train_file: Path,
                   n_holdout: int = 0) -> tuple[list, list]:
    """(labeled, the rest of the pool): the ids of ``labeled_list``, else the first int(labeled_fraction * n)
    of the pool (the training list less its holdout), as train.py labels them. train_ldm.py's mask-conditioned
    generator calls this too: it learns from exactly the pairs a train.py run with the same flags labels."""
    if labeled_list is not None:
        return labeled_from_list(pool, labeled_list, train_file, n_holdout)
    if not 0 < labeled_fraction <= 1:
        raise DataError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
    n_labeled = int(labeled_fraction * len(pool))
    if n_labeled == 0:
        raise DataError(f"labeled_fraction {labeled_fraction} of {len(pool)} training ids selects no image")
    return pool[:n_labeled], pool[n_labeled:]


def load_run_data(data_dir: str | Path, split: int, labeled_fraction: float = 0.5, holdout: float = 0.0,
                  unlabeled_dirs: list[str | Path] = (), unlabeled_from_train: bool = True,
                  need_unlabeled: bool = True, check_files: bool = True, progress: bool = False,
                  mask_values: str = "binary", split_name: str | None = None,
                  labeled_list: str | Path | None = None, synthetic_pairs: str | Path | None = None) -> RunData:
    """Resolve and check a run's data; every problem is a DataError raised before training starts.
    ``synthetic_pairs``: a folder of image-mask pairs in the dataset layout (sample_ldm.py's pairs), extra
    labeled data, checked for provenance and copies of evaluated images as the unlabeled folders are."""
    if labeled_list is None and not 0 < labeled_fraction <= 1:
        raise DataError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
    cases = find_cases(data_dir)
    train_file, val_file = split_files(data_dir, split, split_name)
    train_ids, val_ids = read_id_list(train_file), read_id_list(val_file)
    leaked = sorted(set(train_ids) & set(val_ids))
    if leaked:
        raise DataError(f"{train_file.name} and {val_file.name} share {len(leaked)} id(s), e.g. {leaked[:5]}")
    train = select_cases(cases, train_ids, str(train_file))
    val = select_cases(cases, val_ids, str(val_file))

    n_holdout = holdout_size(len(train), holdout)
    pool, carved = (train[:len(train) - n_holdout], train[len(train) - n_holdout:]) if n_holdout else (train, [])
    labeled, rest = choose_labeled(pool, labeled_fraction, labeled_list, train_file, n_holdout)

    unlabeled: list[Item] = []
    folder_images: list[Path] = []
    if need_unlabeled:
        if unlabeled_from_train:
            unlabeled += [(case_id, image, None) for case_id, image, _ in rest]
        repeated = [f for n, f in enumerate(unlabeled_dirs)
                    if Path(f).resolve() in [Path(g).resolve() for g in unlabeled_dirs[:n]]]
        if repeated:  # each image would be used twice, as if twice as many
            raise DataError(f"--unlabeled-dir lists {repeated[0]} more than once (as itself or by another path): its "
                            "images would be used twice; give each folder once")
        # the generator of a synthetic folder must not have seen an image this run evaluates
        folders = [(folder, unlabeled_images(folder)) for folder in unlabeled_dirs]
        for folder, images in folders:
            folder_images += images
            unlabeled += [(f"{Path(folder).name}/{p.stem}", p, None) for p in images]
        if not unlabeled:
            raise DataError("mgcc mode needs unlabeled images: give --unlabeled-dir or use a labeled "
                            "fraction below 1 with unlabeled_from_train")

    synthetic = synthetic_items(synthetic_pairs, data_dir) if synthetic_pairs is not None else []
    if check_files:
        check_pairs(train + val + synthetic, progress=progress, mask_values=mask_values)
        check_images(folder_images, progress=progress)
    checked = [(folder, images, "unlabeled folder") for folder, images in folders] if need_unlabeled else []
    checked += [(synthetic_pairs, [image for _, image, _ in synthetic], "synthetic pairs folder")] if synthetic else []
    if checked:
        evaluated = {"val": (val_file, [(i, image) for i, image, _ in val]),
                     **({"holdout": (train_file, [(i, image) for i, image, _ in carved])} if carved else {})}
        prints = evaluated_fingerprints(evaluated)
        for folder, images, what in checked:
            check_unlabeled_provenance(folder, evaluated, images, data_dir, prints, what=what)
    share = len(labeled) / len(pool)
    if n_holdout:
        return RunData(labeled, unlabeled, carved, "holdout", report=val, labeled_share=share, synthetic=synthetic)
    return RunData(labeled, unlabeled, val, "val", labeled_share=share, synthetic=synthetic)


def synthetic_items(folder: str | Path, data_dir: str | Path) -> list[Item]:
    """The image-mask pairs of a synthetic pairs folder (the dataset layout, split files ignored), each id
    prefixed with the folder's name; the data folder itself is refused (its pairs are the real ones)."""
    if Path(folder).resolve() == Path(data_dir).resolve():
        raise DataError(f"synthetic pairs folder {folder} is the data folder itself; give sample_ldm.py's pairs "
                        "folder of a mask-conditioned generator")
    try:
        cases = find_cases(folder)
    except DataError as error:
        raise DataError(f"synthetic pairs folder {folder}: {error} (expected sample_ldm.py's pairs: images/ and "
                        "masks/0/)") from None
    if not cases:
        raise DataError(f"synthetic pairs folder {folder} holds no image-mask pair (images/ and masks/0/)")
    return [(f"{Path(folder).name}/{case_id}", image, mask) for case_id, (image, mask) in cases.items()]
