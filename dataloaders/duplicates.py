"""Exact and near-duplicate images in a dataset folder, grouped, and across the sides of a split.

BUSI holds many duplicated images (Pawłowska et al., Data in Brief 2023: 235 duplicated images, about
19 %): the same frame with and without caliper marks, consecutive frames of one sweep, re-saved
copies. A val image whose duplicate the network trained on measures memory, not segmentation. No
anchor code base (CMU-Net, MGCC, SSL4MIS, UniMatch, nnU-Net) checks for this; this module is our own.

**Exact duplicates**: the same decoded grey pixels and size (a blake2b digest), whatever the format.

**Near-duplicates**, on the decoded grey image, in two stages:

1. *Candidates* (one matrix product): the central crop (``MARGIN`` of each side dropped, where caliper
   marks, scanner text and crop edges sit) is resized by area averaging to a 40x40 thumbnail, blurred
   (Gaussian, sigma 1 thumbnail pixel: speckle and sub-pixel shifts average out), and its inner 32x32
   (standardised to mean 0 and norm 1) is compared with every other image's and with their mirror
   images: the dot product is Pearson's correlation. Pairs above ``threshold - CANDIDATE_SLACK`` go on.
2. *Score*: the normalised cross-correlation of one image's inner 32x32 with the other's 40x40
   thumbnail at every shift up to 4 thumbnail pixels (OpenCV ``matchTemplate``, TM_CCOEFF_NORMED),
   the mirror image included, best of both directions (the second only when the first comes within
   ``SECOND_DIRECTION_SLACK`` of the threshold). A pair is a near-duplicate when its score is
   at least ``threshold`` (``DEFAULT_THRESHOLD``), or ``threshold + MIRROR_MARGIN`` when the mirror
   image matched (on BUSI the five mirrored matches between 0.96 and 0.97 were all different
   lesions by eye; a flipped copy scores about 1).

Why this measure: a thumbnail of the decoded pixels is indifferent to the file format, JPEG
re-encoding and resizing (area averaging of either size gives the same thumbnail); the blur and the
shift search absorb crops of a few pixels (a shift and a small change of scale of the central crop);
the central crop and the coarse scale leave caliper marks (a few pixels wide) a small weight; the
mirror image catches horizontally flipped copies (a common augmentation, and a way to hide a copy).
Correlation, not a distance, so brightness and contrast changes do not matter. A DCT perceptual hash
(pHash) was tried beside it and dropped: on phantoms its Hamming distances of copies and of
look-alikes overlap more than the correlations do, and it is blind to flips. The measure compares
whole-image structure: two frames of one sweep with the probe barely moved score like copies, and
that is intended (the network has seen that lesion); two images of one tissue with different lesions
score below it (tests/test_duplicates.py plants both: on 128x128 phantoms, copies that were
re-encoded, resized, cropped, flipped or marked score >= 0.96, look-alikes of one seed with another
lesion <= 0.95).

The issue's crude check (16x16 thumbnails, correlation > 0.98, no shift, no flip) found 153 pairs on
BUSI; see docs/data.md for what this finder counts there.

Groups are the connected components of the pair graph (a sweep of five frames is one group even
when its ends are not near-duplicates of each other). Grouped splitting (split.py --grouped) keeps
each group on one side of every split; the clean subset of a run's val ids is those with no
(near-)duplicate among the ids the run trained on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from .io import DataError, read_image

DEFAULT_THRESHOLD = 0.96  # stage-2 score at or above which two images are near-duplicates
MIRROR_MARGIN = 0.01  # a mirrored match needs threshold + this: twice the comparisons, twice the chance matches
CANDIDATE_SLACK = 0.16  # stage 1 keeps pairs within this of the threshold (stage 1 has no shift search; on
#                         BUSI the lowest stage-1 correlation of a pair scoring >= 0.96 was 0.837)
SECOND_DIRECTION_SLACK = 0.05  # the second direction of stage 2 only for pairs within this of the threshold
MARGIN = 0.1  # fraction of each side dropped before the thumbnail (marks, text, crop edges)
SIZE = 32  # inner thumbnail side
SHIFT = 4  # largest shift searched, in thumbnail pixels (12 % of the crop)
BLUR = 1.0  # Gaussian sigma on the thumbnail, in thumbnail pixels
_BLOCK = 1024  # rows of the stage-1 correlation matrix computed at once (memory)


@dataclass(frozen=True)
class Pair:
    """Two images that are duplicates: ``score`` 1.0 and ``exact`` for the same pixels; ``flipped`` when the
    mirror image matched better."""
    a: str
    b: str
    score: float
    exact: bool = False
    flipped: bool = False

    def kind(self) -> str:
        return "same pixels" if self.exact else f"score {self.score:.3f}" + (", mirrored" if self.flipped else "")

    def describe(self) -> str:
        return f"{self.a!r} ~ {self.b!r} ({self.kind()})"

    def other(self, case_id: str) -> str:
        return self.b if case_id == self.a else self.a


@dataclass
class Fingerprints:
    """What the finder keeps of each image: ids, pixel digests, padded thumbnails, stage-1 vectors."""
    ids: list[str]
    paths: list[Path]
    digests: list[str]
    thumbs: np.ndarray  # N x (SIZE+2*SHIFT) x (SIZE+2*SHIFT) float32, blurred
    vectors: np.ndarray  # N x SIZE*SIZE, standardised inner thumbnails
    mirrored: np.ndarray  # the same of the mirror images

    def __len__(self) -> int:
        return len(self.ids)


def pixel_digest(gray: np.ndarray) -> str:
    """A digest of decoded grey pixels and their size: one for every lossless copy of an image."""
    return hashlib.blake2b(f"{gray.shape[:2]}".encode() + np.ascontiguousarray(gray).tobytes(),
                           digest_size=16).hexdigest()


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """The blurred (SIZE+2*SHIFT)^2 thumbnail of an image's central crop (float32)."""
    gray = gray.reshape(gray.shape[:2])
    h, w = gray.shape
    dy, dx = round(h * MARGIN), round(w * MARGIN)
    crop = gray[dy:h - dy, dx:w - dx].astype(np.float32)
    side = SIZE + 2 * SHIFT
    thumb = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(thumb, (0, 0), BLUR, borderType=cv2.BORDER_REFLECT)


def _standardised(thumbs: np.ndarray) -> np.ndarray:
    inner = thumbs[:, SHIFT:SHIFT + SIZE, SHIFT:SHIFT + SIZE].reshape(len(thumbs), -1).astype(np.float32)
    inner = inner - inner.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(inner, axis=1, keepdims=True)
    return inner / np.where(norms > 0, norms, 1.0)  # a flat image stays all zeros: it matches nothing


def fingerprint_images(ids: Sequence[str], grays: Sequence[np.ndarray], paths: Sequence[Path] | None = None) -> Fingerprints:
    """Fingerprints of images already decoded (uint8 HxW or HxWx1)."""
    thumbs = np.stack([thumbnail(g) for g in grays]) if grays else np.zeros((0, SIZE + 2 * SHIFT, SIZE + 2 * SHIFT), np.float32)
    return Fingerprints(list(ids), list(paths) if paths is not None else [Path(i) for i in ids],
                        [pixel_digest(g) for g in grays], thumbs, _standardised(thumbs),
                        _standardised(np.ascontiguousarray(thumbs[:, :, ::-1])))


def fingerprint(items: Iterable[tuple[str, Path]]) -> Fingerprints:
    """Fingerprints of (id, image path) pairs, read as grey images (any format the project reads)."""
    items = list(items)
    grays = [read_image(path, channels=1) for _, path in items]
    return fingerprint_images([i for i, _ in items], grays, [p for _, p in items])


def _shifted_correlation(template_from: np.ndarray, image: np.ndarray) -> float:
    """Best normalised correlation of ``template_from``'s inner SIZE^2 with ``image`` at every shift."""
    template = np.ascontiguousarray(template_from[SHIFT:SHIFT + SIZE, SHIFT:SHIFT + SIZE])
    if float(template.std()) == 0.0:
        return -1.0  # flat: correlation undefined, no match
    return float(cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED).max())


def _pair_score(ta: np.ndarray, tb: np.ndarray, floor: float = -1.0) -> tuple[float, bool]:
    """(stage-2 score, mirrored) of two padded thumbnails: the best shifted correlation, direct or mirrored,
    of a's centre in b and, unless that is below ``floor`` (too low to matter), of b's centre in a."""
    mirror_b = np.ascontiguousarray(tb[:, ::-1])
    scores = {False: _shifted_correlation(ta, tb), True: _shifted_correlation(ta, mirror_b)}
    if max(scores.values()) >= floor:  # the other direction: a crop's centre lies inside the original
        mirror_a = np.ascontiguousarray(ta[:, ::-1])
        scores[False] = max(scores[False], _shifted_correlation(tb, ta))
        scores[True] = max(scores[True], _shifted_correlation(tb, mirror_a))
    flipped = scores[True] > scores[False]
    return scores[flipped], flipped


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise DataError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def _candidates(a: Fingerprints, b: Fingerprints, floor: float, same: bool) -> list[tuple[int, int]]:
    """(i, j) with a stage-1 correlation (direct or mirrored) of at least ``floor``; i < j when ``same``."""
    found = []
    for start in range(0, len(a), _BLOCK):
        rows = a.vectors[start:start + _BLOCK]
        scores = np.maximum(rows @ b.vectors.T, rows @ b.mirrored.T)
        if same:
            scores[np.arange(len(b))[None, :] <= np.arange(start, start + len(rows))[:, None]] = -2  # j <= i
        for i, j in zip(*np.nonzero(scores >= floor)):
            found.append((start + int(i), int(j)))
    return found


def find_pairs(a: Fingerprints, b: Fingerprints | None = None, threshold: float = DEFAULT_THRESHOLD) -> list[Pair]:
    """Every exact or near-duplicate pair within ``a`` (``b`` None) or between ``a`` and ``b`` (pair.a from
    ``a``), best score first. Two images with one id are not compared (an id is one image)."""
    threshold = check_threshold(threshold)
    same = b is None
    b = a if same else b
    pairs: dict[tuple[int, int], Pair] = {}
    by_digest: dict[str, list[int]] = {}
    for j, digest in enumerate(b.digests):
        by_digest.setdefault(digest, []).append(j)
    for i, digest in enumerate(a.digests):
        for j in by_digest.get(digest, []):
            if (not same or i < j) and a.ids[i] != b.ids[j]:
                pairs[(i, j)] = Pair(a.ids[i], b.ids[j], 1.0, exact=True)
    if len(a) and len(b):
        for i, j in _candidates(a, b, threshold - CANDIDATE_SLACK, same):
            if (i, j) in pairs or a.ids[i] == b.ids[j]:
                continue
            score, flipped = _pair_score(a.thumbs[i], b.thumbs[j], floor=threshold - SECOND_DIRECTION_SLACK)
            if score >= threshold + (MIRROR_MARGIN if flipped else 0.0):
                pairs[(i, j)] = Pair(a.ids[i], b.ids[j], min(score, 1.0), flipped=flipped)
    return sorted(pairs.values(), key=lambda p: (-p.score, p.a, p.b))


def groups(ids: Iterable[str], pairs: Iterable[Pair]) -> list[list[str]]:
    """Connected components of the pair graph over ``ids`` (every id its own group when it has no pair),
    each sorted, largest first, then by first id."""
    parent = {i: i for i in ids}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        if pair.a in parent and pair.b in parent:
            ra, rb = root(pair.a), root(pair.b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    return sorted((sorted(m) for m in members.values()), key=lambda m: (-len(m), m[0]))


def partners(targets: Iterable[str], others: Iterable[str], pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    """target id -> the pairs joining it to an id of ``others`` (targets without one are left out)."""
    targets, others = set(targets), set(others)
    found: dict[str, list[Pair]] = {}
    for pair in pairs:
        for mine, theirs in ((pair.a, pair.b), (pair.b, pair.a)):
            if mine in targets and theirs in others and mine != theirs:
                found.setdefault(mine, []).append(pair)
    return found


def clean_ids(evaluated: Sequence[str], trained: Iterable[str], pairs: Iterable[Pair]) -> list[str]:
    """The evaluated ids (in order) with no exact or near-duplicate among the trained ids (nor trained themselves)."""
    trained = set(trained)
    dirty = set(partners(evaluated, trained, pairs)) | (set(evaluated) & trained)
    return [i for i in evaluated if i not in dirty]


def closest_pairs_image(pairs: Sequence[Pair], paths: dict[str, Path], count: int = 16, side: int = 128,
                        columns: int = 4) -> np.ndarray:
    """Side-by-side tiles of the first ``count`` pairs (each image read in grey, resized to ``side`` high,
    the second mirrored when it matched mirrored), for a person to check; uint8 BGR."""
    from utils.plots import image_grid

    tiles = []
    for pair in list(pairs)[:count]:
        images = []
        for key, mirror in ((pair.a, False), (pair.b, pair.flipped)):
            gray = read_image(paths[key], channels=1)[..., 0]
            gray = gray[:, ::-1] if mirror else gray
            images.append(cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA))
        tile = cv2.cvtColor(np.hstack([images[0], np.full((side, 4), 255, np.uint8), images[1]]), cv2.COLOR_GRAY2BGR)
        label = "same" if pair.exact else f"{pair.score:.3f}{' m' if pair.flipped else ''}"
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        tiles = [np.full((side, 2 * side + 4, 3), 255, np.uint8)]
    return image_grid(tiles, columns=columns, pad=4)


def near_duplicates_in(evaluated: dict[str, Path], trained: dict[str, Path],
                       threshold: float = DEFAULT_THRESHOLD) -> dict[str, list[str]]:
    """evaluated id -> the trained ids it is an exact or near-duplicate of (itself when it was trained on),
    for the evaluated ids that have one: what the clean subset leaves out."""
    found: dict[str, list[str]] = {i: [i] for i in evaluated if i in trained}
    others = {i: p for i, p in trained.items() if i not in evaluated}  # an evaluated id is compared as itself
    if evaluated and others:
        for pair in find_pairs(fingerprint(evaluated.items()), fingerprint(others.items()), threshold):
            found.setdefault(pair.a, []).append(pair.b)
    return {i: sorted(set(found[i])) for i in evaluated if i in found}


def split_leaks(data_dir: str | Path, split: int, split_name: str | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int, str]:
    """(val ids with an exact or near-duplicate in the split's training list, val ids, the training file's name)."""
    from .io import find_cases, read_id_list, select_cases, split_files

    cases = find_cases(data_dir)
    train_file, val_file = split_files(data_dir, split, split_name)
    train = [i for i, *_ in select_cases(cases, read_id_list(train_file), str(train_file))]
    val = [i for i, *_ in select_cases(cases, read_id_list(val_file), str(val_file))]
    prints = fingerprint((i, cases[i][0]) for i in dict.fromkeys(train + val))
    return len(partners(val, train, find_pairs(prints, threshold=threshold))), len(val), train_file.name


def leak_note(data_dir: str | Path, splits: list[int], split_name: str | None = None) -> str:
    """One line for train.py and reproduce.py: per split, how many val ids have an exact or near-duplicate
    in its training list, and what that means where any has (nothing more where none has)."""
    counts = [(split, *split_leaks(data_dir, split, split_name)) for split in splits]
    line = "; ".join(f"split {split}: {leaks} of {val} val ids have an exact or near-duplicate in {train}"
                     for split, leaks, val, train in counts)
    if any(leaks for _, leaks, _, _ in counts):
        return f"{line}: {DUPLICATES_ADVICE}"
    return line


DUPLICATES_ADVICE = ("their scores are partly memory (split.py --check lists them, --grouped writes splits without "
                     "them; predict.py --trained-ids scores the clean subset)")
