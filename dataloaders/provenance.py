"""Where an unlabeled folder's images come from, and whether a run may train on them.

A generator (stage 1) that trained on an image can carry it into its samples. Samples used as
unlabeled data must therefore come from a generator that never saw an image the run evaluates:
the three published BUSI splits overlap, so split 1's generator has seen most of split 2's val
images. sample_ldm.py writes ``<folder>/manifest.csv``, whose ``checkpoint`` column names the
generator's run folder; that folder's ``ldm.json`` lists the generator's ``train_ids``. Ids are
compared by name, whatever the dataset folder: two copies of BUSI share their ids.

The check fails closed: a manifest, a generator folder or an ``ldm.json`` it cannot read in full
is an error, never a pass. Whatever a manifest says, every image of every unlabeled folder is also
compared by content with the evaluated images by the near-duplicate finder of
:mod:`dataloaders.duplicates` (the same decoded pixels, or a score of at least its default threshold:
a copy re-encoded as JPEG, resized, cropped by a few pixels, marked or mirrored), so an evaluated
image copied into an unlabeled folder is refused however it was saved.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .duplicates import Fingerprints, find_pairs, fingerprint
from .io import DataError, note

# The description file of a generator's run folder (written by generation/run.py), read here for the
# ids it trained on: its name lives at the lower layer, which reads it.
RUN_INFO = "ldm.json"

MANIFEST = "manifest.csv"  # written by sample_ldm.py beside images/
_SHOWN = 5  # ids named in the error


def find_manifest(folder: Path) -> Path | None:
    """``<folder>/manifest.csv``, or the one beside ``<folder>`` when the folder given is images/ itself."""
    for candidate in (folder / MANIFEST, folder.parent / MANIFEST if folder.name == "images" else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def generator_runs(manifest: Path) -> list[Path]:
    """The generator run folders a manifest names (its ``checkpoint`` column), in order of first use.

    Relative paths are resolved against the manifest's folder (never the working folder). A manifest
    that is empty, lists no image, has a row without a checkpoint or is not well-formed CSV is an error.
    """
    try:
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, strict=True)
            rows = list(reader)
            columns = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {manifest}: {error} (not the manifest sample_ldm.py writes, or damaged): "
                        "the generator of these images cannot be checked") from None
    if not columns or "checkpoint" not in columns:
        raise DataError(f"{manifest} has no 'checkpoint' column{' (it is empty)' if not columns else ''}: not the "
                        "manifest sample_ldm.py writes, so the generator of these images cannot be checked (move "
                        "the file away if it is not one)")
    if not rows:
        raise DataError(f"{manifest} lists no image (a header only): the generator of the folder's images cannot be "
                        "checked; rewrite it with sample_ldm.py or move it away")
    blank = [n for n, row in enumerate(rows, start=2) if not (row.get("checkpoint") or "").strip()]
    if blank:
        raise DataError(f"{manifest}: line(s) {', '.join(map(str, blank[:_SHOWN]))} name no checkpoint: the generator "
                        "of those images cannot be checked")
    runs = dict.fromkeys(Path(row["checkpoint"].strip()) for row in rows)
    return [run if run.is_absolute() else (manifest.parent / run) for run in runs]


def generator_train_ids(run: Path, manifest: Path) -> set[str]:
    """The ids a generator run folder trained on (its ldm.json's ``train_ids``); anything else is an error."""
    info_path = run / RUN_INFO
    where = f"the generator {run} named in {manifest}"
    if not info_path.is_file():
        raise DataError(f"{where} has no {RUN_INFO}{'' if run.is_dir() else ' (no such folder)'}: not a run folder "
                        "of train_ldm.py, so the ids it trained on cannot be checked; put the generator's run folder "
                        "there or move the manifest away")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"cannot read {info_path} ({where}): {error}") from None
    train_ids = info.get("train_ids") if isinstance(info, dict) else None
    if not isinstance(train_ids, list) or not train_ids or not all(isinstance(i, str) for i in train_ids):
        found = "no train_ids" if not isinstance(info, dict) or "train_ids" not in info else \
            f"train_ids of type {type(train_ids).__name__}" if not isinstance(train_ids, list) else \
            "an empty train_ids" if not train_ids else "train_ids that are not all strings"
        raise DataError(f"{info_path} ({where}) has {found}, where train_ldm.py writes the list of ids it trained on: "
                        "the generator's training ids cannot be checked")
    return set(train_ids)


def check_unlabeled_provenance(folder: str | Path, evaluated: dict[str, tuple[Path, list[tuple[str, Path]]]],
                               images: list[Path] | None = None, data_dir: str | Path | None = None,
                               evaluated_prints: Fingerprints | None = None, what: str = "unlabeled folder") -> None:
    """Refuse an unlabeled folder whose generator trained on an id this run evaluates, or that holds an
    evaluated image.

    ``evaluated`` maps the name of each evaluated list ("val", "holdout") to (its split file, its
    (id, image path) pairs). ``images``: the folder's images, compared by content with the evaluated
    ones (``evaluated_prints``, from :func:`evaluated_fingerprints`, may be passed to reuse across
    folders). A folder without a manifest (a user's own images) is accepted with a note once its content is checked.
    ``data_dir``: the dataset folder, which is never an unlabeled folder. ``what``: the folder's part in the
    run, as the errors name it (train.py --synthetic-pairs: "synthetic pairs folder").
    """
    folder = Path(folder)
    if data_dir is not None:
        data = Path(data_dir).resolve()
        if folder.resolve() in (data, data / "images"):
            raise DataError(f"{what} {folder} is the data folder {data_dir} itself: it holds the val images "
                            "this run evaluates; give a folder of other images (e.g. sample_ldm.py's output)")
    # by the folder's real path: a link named otherwise to a samples' images/ hides the manifest beside it
    manifest = find_manifest(folder.resolve())
    if manifest is not None:
        for run in generator_runs(manifest):
            trained = generator_train_ids(run, manifest)
            for part, (split_file, pairs) in evaluated.items():
                ids = [i for i, _ in pairs]
                shared = [i for i in ids if i in trained]
                if shared:
                    raise DataError(
                        f"{what} {folder} was generated by {run} (see {manifest}), a generator trained on "
                        f"{len(shared)} of the {len(ids)} {part} ids this run evaluates ({split_file.name}), e.g. "
                        f"{', '.join(map(repr, shared[:_SHOWN]))}: its images would carry them into training and "
                        "inflate the scores. Use the samples of a generator that never saw them (train_ldm.py on a "
                        "training list without these ids)")
    if images:
        prints = evaluated_prints if evaluated_prints is not None else evaluated_fingerprints(evaluated)
        # (not the exact pixels only: issue 33 found JPEG and mirrored copies of val images passing)
        pairs = find_pairs(fingerprint((p.name, p) for p in images), prints)
        copies = [f"{pair.a} = {part} image {case_id!r} " for pair in pairs for part, case_id in [pair.b.split(":", 1)]]
        kinds = [f"({'same pixels' if pair.exact else f'near-duplicate, score {pair.score:.3f}'})" for pair in pairs]
        copies = [f"{copy}{kind}" for copy, kind in zip(copies, kinds)]
        if copies:
            n = len({pair.a for pair in pairs})
            raise DataError(f"{what} {folder} holds {n} {'copy' if n == 1 else 'copies'} of images this "
                            "run evaluates "
                            f"(the same pixels, or re-encoded, resized, cropped, marked or mirrored), e.g. "
                            f"{'; '.join(copies[:_SHOWN])}: training on them would inflate the scores; remove them "
                            "from the folder")
    if manifest is None:
        note(f"{what} {folder} has no {MANIFEST}: where its images come from cannot be checked "
             "(images generated from evaluated images would inflate the scores); none of them is a copy or a "
             "near-duplicate of an evaluated image")


def evaluated_fingerprints(evaluated: dict[str, tuple[Path, list[tuple[str, Path]]]]) -> Fingerprints:
    """Fingerprints of every evaluated image, each named ``<part>:<id>`` (see :mod:`dataloaders.duplicates`)."""
    return fingerprint((f"{part}:{case_id}", path) for part, (_, pairs) in evaluated.items() for case_id, path in pairs)
