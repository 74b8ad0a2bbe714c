"""Reading and checking a segmentation dataset on disk.

The layout is the one the MGCC / CMU-Net code bases use::

    <data>/images/<id>.<ext>
    <data>/masks/0/<id>.<ext>
    <data>/<name>_train<i>.txt, <data>/<name>_val<i>.txt   (one id per line, written by split.py)

Every script reads data through this module, so every script reports bad input the same way:
one :class:`DataError` whose message names the offending files.
"""
from __future__ import annotations

import io
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from utils.errors import DataError
from utils.pixel_limit import (MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_OPTION, OPENCV_MAX_IMAGE_PIXELS,  # noqa: F401
                                 PIXEL_LIMIT_CHECK, add_pixel_limit_flag, max_image_pixels, set_max_image_pixels)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUBDIR = Path("masks") / "0"
MASK_THRESHOLD = 127  # foreground where the mask value is > 127 (masks are 0/255)
# How mask values map to foreground (option mask_values of the scripts):
#   binary:    masks are 0/255; JPEG noise around those is thresholded at 127 with a warning;
#              any other values (label maps, 0/1 masks, grey levels) are an error
#   threshold: foreground where > 127, whatever the values
#   nonzero:   foreground where > 0 (label maps with several lesion labels, 0/1 masks)
MASK_VALUES = ("binary", "threshold", "nonzero")
_MAX_LISTED = 20  # offenders named in one message before "... and N more"
# 16-bit files: 12-bit scanners store 0..4095 in them; a file whose largest value is at most 4095 is
# read as 12-bit (scaled by 255 / 4095), any other as 16-bit (255 / 65535), both to the 0..255 the
# networks' normalisation expects. OpenCV's own 16 -> 8 bit conversion keeps the high byte, which
# turns 12-bit images into 0..15.
_TWELVE_BIT_MAX = 4095


def listing(title: str, items: list[str]) -> str:
    shown = [f"  {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"  ... and {len(items) - _MAX_LISTED} more")
    return f"{title} ({len(items)}):\n" + "\n".join(shown)


def list_images(folder: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Map id -> image path for the image files directly in ``folder``.

    Extensions are matched case-insensitively. Returns ``(images, problems)`` where problems lists
    ids that occur with more than one extension (``a.png`` and ``a.jpg``): such an id is ambiguous
    and is left out of ``images``.
    """
    folder = Path(folder)
    by_id: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            by_id[path.stem].append(path)
    images, problems = {}, []
    for case_id, paths in by_id.items():
        if len(paths) > 1:
            problems.append(f"{folder / case_id}.*: one id, several files: "
                            + ", ".join(p.name for p in paths))
        else:
            images[case_id] = paths[0]
    return images, problems


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found: {path} (no such folder)")
    return path


def find_cases(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Map id -> (image path, mask path) for a labelled dataset folder, checking the pairing.

    Raises one DataError listing every image without a mask, mask without an image and id with
    several files. Files are not opened here: see :func:`check_pairs` for that.
    """
    data_dir = require_dir(data_dir, "data folder")
    image_dir = require_dir(data_dir / "images", "image folder")
    mask_dir = require_dir(data_dir / MASK_SUBDIR, "mask folder")
    images, problems = list_images(image_dir)
    masks, mask_problems = list_images(mask_dir)
    problems += mask_problems
    no_mask = sorted(str(images[i]) for i in images.keys() - masks.keys())
    no_image = sorted(str(masks[i]) for i in masks.keys() - images.keys())
    parts = []
    if problems:
        parts.append(listing("ids with more than one file", sorted(problems)))
    if no_mask:
        parts.append(listing(f"images without a mask in {mask_dir}", no_mask))
    if no_image:
        parts.append(listing(f"masks without an image in {image_dir}", no_image))
    if parts:
        raise DataError(f"dataset {data_dir} is not consistent:\n" + "\n".join(parts))
    if not images:
        raise DataError(f"dataset {data_dir} has no images in {image_dir} "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return {i: (images[i], masks[i]) for i in sorted(images)}


def _header(data: np.ndarray) -> tuple[tuple[int, int], str] | None:
    """((width, height), PIL mode) from the file's header, nothing decoded; None if PIL cannot tell."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we check the size ourselves, below
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            mode = image.mode + ("A" if image.mode == "P" and "transparency" in image.info else "")
            return image.size, mode
    except Exception:  # noqa: BLE001 - a format PIL does not know: OpenCV decides below
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _decode(path: Path, flags: int, alpha: bool = False) -> np.ndarray:
    """Decode an image file, raising DataError for a missing, corrupt, truncated or too large file.

    With ``alpha`` an image with an alpha channel is decoded unchanged (colour and alpha, for
    :func:`read_mask`); any other image with ``flags``. 16-bit files keep their 16 bits.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    # libjpeg decodes a truncated JPEG with a grey tail and only a warning: check the end marker.
    if path.suffix.lower() in (".jpg", ".jpeg") and not bytes(data[-16:]).rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        raise DataError(f"cannot read {path}: truncated JPEG (no end-of-image marker)")
    header = _header(data) if data.size else None
    if header is not None:
        (width, height), mode = header
        limit = max_image_pixels()
        if width * height > limit:
            raise DataError(f"{path} is {width}x{height} = {width * height} pixels, more than the limit of {limit} "
                            "(option max_image_pixels: raise it if the image is meant to be this large, or resize "
                            "it; it would be decoded to memory in full)")
        if alpha and mode.endswith(("A", "a")):
            flags = cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(data, flags | cv2.IMREAD_ANYDEPTH) if data.size else None
    except cv2.error as error:  # e.g. a header claiming more than OpenCV's own pixel limit
        raise DataError(f"cannot read {path}: OpenCV refused it: {str(error).strip().splitlines()[-1]}") from None
    if image is None:
        raise DataError(f"cannot read {path}: not a readable image (corrupt, truncated or empty)")
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"cannot read {path}: {image.dtype} pixels; expected 8- or 16-bit images")
    return image


def _to_8bit(image: np.ndarray) -> np.ndarray:
    """A 16-bit image on the 0..255 scale by its real bit depth (12 or 16, see _TWELVE_BIT_MAX)."""
    if image.dtype == np.uint8:
        return image
    full = _TWELVE_BIT_MAX if image.max() <= _TWELVE_BIT_MAX else 65535
    return np.round(image.astype(np.float32) * (255.0 / full)).astype(np.uint8)


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image as uint8 HxWxC with C = channels (1: grayscale, 3: BGR as OpenCV reads it).

    Grayscale and colour files may be mixed in one folder: each is converted to ``channels``; an
    alpha channel is dropped; 16-bit files are scaled to 0..255 by their bit depth (12 or 16).
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    flags = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = _to_8bit(_decode(Path(path), flags))
    return image[..., None] if image.ndim == 2 else image


def read_mask_values(path: str | Path) -> np.ndarray:
    """A mask's grey values (uint8 or uint16, HxW). A mask drawn in the alpha channel (an RGBA or
    grey+alpha file whose colour is one flat value) is read from its alpha channel; a file with both a
    drawn colour and a drawn alpha is refused, since which of them is the mask cannot be told."""
    path = Path(path)
    image = _decode(path, cv2.IMREAD_GRAYSCALE, alpha=True)
    if image.ndim == 2:
        return image
    colour, alpha = image[..., :-1], image[..., -1]
    full = np.iinfo(image.dtype).max
    gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY) if colour.shape[-1] == 3 else colour[..., 0]
    if alpha.min() == full:  # opaque everywhere: the alpha channel says nothing
        return gray
    if colour.min() == colour.max():
        return alpha
    raise DataError(f"{path}: mask has both a drawn colour and a drawn alpha channel: which one is the mask "
                    "cannot be told; save the mask as a grey image (0/255)")


def _mask_scale(gray: np.ndarray) -> int:
    """Largest value of the mask's type: 255 (8-bit) or 65535 (16-bit)."""
    return int(np.iinfo(gray.dtype).max)


def read_mask(path: str | Path, mask_values: str = "binary") -> np.ndarray:
    """Read a mask as a bool HxW array: foreground where the grey value is > 127 (> 0 for 'nonzero').

    16-bit masks keep their values: 'nonzero' is > 0, the 127 of 'binary'/'threshold' is scaled to
    the 16-bit range (> 127 x 257), so a 0/65535 mask reads as a 0/255 one does.
    """
    gray = read_mask_values(path)
    return gray > 0 if mask_values == "nonzero" else gray > MASK_THRESHOLD * (_mask_scale(gray) // 255)


def classify_mask(gray: np.ndarray) -> str:
    """'binary' (only 0 and 255; 0 and 65535 for 16-bit), 'noisy' (0/255 with JPEG-like noise: many
    grey levels, few pixels between 31 and 224) or 'labels' (anything else: 0/1 masks, label maps,
    grey-level masks)."""
    full = _mask_scale(gray)
    values = np.unique(gray)
    if np.isin(values, (0, full)).all():
        return "binary"
    step = full // 255
    middle = np.count_nonzero((gray > 30 * step) & (gray < 225 * step)) / gray.size
    if len(values) > 8 and middle < 0.05 and gray.max() > 224 * step:
        return "noisy"
    return "labels"


def read_id_list(path: str | Path) -> list[str]:
    """Read a split file: one id per line, blank lines ignored, order kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        found = error.object[error.start:error.start + 4]
        raise DataError(f"split file {path} is not UTF-8 text (byte {error.start}: {found!r}): write it as UTF-8, "
                        "one id per line (split.py writes such files)") from None
    except OSError as error:
        raise DataError(f"cannot read split file {path}: {error.strerror}") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file is empty: {path}")
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicates:
        raise DataError(listing(f"split file {path} lists ids more than once", duplicates))
    return ids


def split_file(data_dir: str | Path, part: str, index: int, name: str | None = None) -> Path:
    """Path of ``<name>_<part><index>.txt`` in data_dir; name defaults to the folder's, lower-case."""
    data_dir = Path(data_dir)
    name = name or dataset_name(data_dir)
    return data_dir / f"{name}_{part}{index}.txt"


def split_files(data_dir: str | Path, index: int, name: str | None = None) -> tuple[Path, Path]:
    """The (train, val) split files of split ``index``: ``<name>_train<index>.txt``, ``<name>_val<index>.txt``.

    ``name`` (option split_name) defaults to the folder's name lower-cased; when that split file is
    not there and exactly one ``*_train<index>.txt`` is (``BUSI_2020/busi_train1.txt``), its prefix
    is used, with a note. Several candidates are an error that lists them.
    """
    data_dir = Path(data_dir)
    if name is None:
        name = dataset_name(data_dir)
        if not split_file(data_dir, "train", index, name).is_file():
            suffix = f"_train{index}.txt"
            found = sorted(p.name[:-len(suffix)] for p in data_dir.glob(f"*{suffix}") if p.is_file())
            if len(found) > 1:
                raise DataError(f"split file not found: {split_file(data_dir, 'train', index, name)}; the folder "
                                f"holds the split files of several names ({', '.join(found)}): choose one with "
                                "--split-name")
            if found:
                note(f"split files: using {found[0]}{suffix} ({name}{suffix}, after the folder's name, is not "
                     f"there; --split-name {found[0]} says so explicitly)")
                name = found[0]
    return split_file(data_dir, "train", index, name), split_file(data_dir, "val", index, name)


def note(message: str) -> None:
    """One line of information for the user (not a warning: nothing is wrong)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def dataset_name(data_dir: str | Path) -> str:
    return Path(data_dir).resolve().name.lower()


def select_cases(cases: dict[str, tuple[Path, Path]], ids: list[str], source: str) -> list[tuple[str, Path, Path]]:
    """The (id, image, mask) triples for ``ids``; an id with no files is an error naming ``source``."""
    missing = [i for i in ids if i not in cases]
    if missing:
        raise DataError(listing(f"{source} names ids with no image/mask pair", missing))
    return [(i, *cases[i]) for i in ids]


def check_pairs(pairs: list[tuple[str, Path, Path]], progress: bool = False, mask_values: str | None = None) -> None:
    """Open every image and mask once, before any training starts.

    Raises one DataError listing every unreadable file and every image whose mask has another
    size, so that a bad file never surfaces later as a data-loader worker traceback. With
    ``mask_values='binary'`` masks must be 0/255: JPEG-noisy ones are counted in one warning, other
    values are an error that says which option maps them.
    """
    from tqdm import tqdm

    problems, noisy, labels = [], [], []
    for _, image_path, mask_path in tqdm(pairs, desc="checking data", disable=not progress, leave=False):
        arrays = []
        for path, read in ((image_path, lambda p: _decode(p, cv2.IMREAD_GRAYSCALE)), (mask_path, read_mask_values)):
            try:
                arrays.append(read(path))
            except DataError as error:
                problems.append(str(error))
        if len(arrays) < 2:
            continue
        (image, mask) = arrays
        if image.shape != mask.shape:
            problems.append(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
        if mask_values == "binary":
            kind = classify_mask(mask)
            if kind == "noisy":
                noisy.append(str(mask_path))
            elif kind == "labels":
                values = np.unique(mask)
                depth = "" if mask.dtype == np.uint8 else f" ({mask.dtype.itemsize * 8}-bit)"
                labels.append(f"{mask_path}: values {values[:6].tolist()}{' ...' if len(values) > 6 else ''}{depth}")
    if labels:
        problems.append(listing("masks that are not 0/255 (use mask_values 'nonzero' for label maps and 0/1 "
                                 "masks, or 'threshold' for foreground above 127)", labels))
    if problems:
        raise DataError(listing("bad image/mask files", problems))
    if noisy:
        warnings.warn(f"{len(noisy)} mask(s) are 0/255 with JPEG-like noise, thresholded at 127: e.g. {noisy[0]}",
                      stacklevel=2)


def check_images(paths: list[Path], progress: bool = False) -> None:
    """Open every image once; raise one DataError listing the unreadable ones."""
    from tqdm import tqdm

    problems = []
    for path in tqdm(paths, desc="checking images", disable=not progress, leave=False):
        try:
            _decode(path, cv2.IMREAD_GRAYSCALE)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError(listing("unreadable images", problems))


def image_folder(folder: str | Path, what: str = "unlabeled folder") -> list[Path]:
    """The images of a folder of images without masks: ``<folder>/images/*`` (the dataset layout and
    stage 1's output), or the image files directly in ``<folder>`` when it has no ``images/``."""
    folder = require_dir(folder, what)
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    images, problems = list_images(image_dir)
    if problems:
        raise DataError(listing(f"{what} {image_dir} has ambiguous ids", problems))
    if not images:
        raise DataError(f"{what} {image_dir} has no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return [images[i] for i in sorted(images)]


def unlabeled_images(folder: str | Path) -> list[Path]:
    """The images of an unlabeled folder (see :func:`image_folder`)."""
    return image_folder(folder, "unlabeled folder")


def read_spacing_csv(path: str | Path, ids: list[str]) -> dict[str, tuple[float, float]]:
    """Pixel spacing (mm per pixel, as (row, column)) of each id from a CSV with a header: ``id,spacing_mm``
    (isotropic) or ``id,spacing_row_mm,spacing_col_mm``. Every id of ``ids`` must have a row of positive
    numbers; one DataError names the file and the rows at fault."""
    import csv
    import math

    path = Path(path)
    if not path.is_file():
        raise DataError(f"spacing file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "id" not in fields or not ("spacing_mm" in fields or {"spacing_row_mm", "spacing_col_mm"} <= set(fields)):
            raise DataError(f"spacing file {path}: expected a header 'id,spacing_mm' or "
                            f"'id,spacing_row_mm,spacing_col_mm', found {','.join(fields) or 'none'}")
        columns = ("spacing_mm", "spacing_mm") if "spacing_mm" in fields else ("spacing_row_mm", "spacing_col_mm")
        spacing, problems = {}, []
        for line, row in enumerate(reader, start=2):
            case_id = (row.get("id") or "").strip()
            try:
                pair = tuple(float(row[c]) for c in columns)
            except (TypeError, ValueError):
                pair = None
            if pair is None or not all(math.isfinite(s) and s > 0 for s in pair):
                problems.append(f"line {line} ({case_id or 'no id'}): spacing must be positive numbers, got "
                                + ", ".join(repr(row.get(c)) for c in dict.fromkeys(columns)))
            elif case_id in spacing:
                problems.append(f"line {line}: id {case_id!r} given twice")
            else:
                spacing[case_id] = pair
    problems += [f"no row for id {i!r}" for i in ids if i not in spacing]
    if problems:
        raise DataError(listing(f"spacing file {path} is not usable", problems))
    return {i: spacing[i] for i in ids}
