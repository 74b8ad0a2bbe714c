"""The masks a mask-conditioned generator makes image-mask pairs for (sample_ldm.py on a run trained with
--conditioning mask): the run's labeled training masks, and new layouts made from them.

Pair n takes labeled mask n mod M (M: the run's labeled masks, ldm.json ``mask_ids``, in their order).
The first pass (n < M) uses each mask as it is. From the second pass on, with --mask-augmentation, the
mask is moved to a new layout drawn from pair n's own seed (the same layout whatever the batch, the
number of pairs or of processes):

- ``affine``: rotation by U(-20, 20) degrees, scaling by U(0.8, 1.25), shift by U(-10 %, 10 %) of the
  side along each axis, about the image's centre;
- ``elastic``: a smooth random displacement field (Simard et al. 2003): per-pixel uniform(-1, 1) offsets
  smoothed with a Gaussian of sigma 8 % of the side, scaled to move pixels by up to about 5 % of it;
- ``both``: the affine move, then the elastic one.

Masks are moved with nearest-neighbour lookups (cv2.warpAffine, cv2.remap): they stay masks. The number
of lesions (8-connected components) is kept: a draw that pushes a lesion out of the image, splits one or
merges two is drawn again (up to 10 times from the same stream), and where no draw keeps the count the
mask is used as it is, which the manifest says ("none (lesion count)").
"""
from __future__ import annotations

import cv2
import numpy as np

AUGMENTATIONS = ("none", "affine", "elastic", "both")
TRIES = 10
UNCHANGED = "none (lesion count)"  # the manifest's word for a layout no draw could move


def lesion_count(mask: np.ndarray) -> int:
    """Lesions of a mask: its 8-connected foreground components."""
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def affine(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = mask.shape[0]
    angle, scale = rng.uniform(-20, 20), rng.uniform(0.8, 1.25)
    shift = rng.uniform(-0.1, 0.1, 2) * size
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
    matrix[:, 2] += shift
    return cv2.warpAffine(mask.astype(np.uint8), matrix, (size, size), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def elastic(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = mask.shape[0]
    sigma = 0.08 * size
    fields = []
    for _ in range(2):
        field = cv2.GaussianBlur(rng.uniform(-1, 1, (size, size)).astype(np.float32), (0, 0), sigma)
        peak = float(np.abs(field).max()) or 1.0
        fields.append(field / peak * 0.05 * size)
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    return cv2.remap(mask.astype(np.uint8), grid_x + fields[0], grid_y + fields[1], cv2.INTER_NEAREST,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def new_layout(mask: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(the moved mask, what was applied): ``kind`` of AUGMENTATIONS, the lesion count kept (see above)."""
    if kind == "none":
        return mask, "none"
    count = lesion_count(mask)
    for _ in range(TRIES):
        moved = affine(mask, rng) if kind in ("affine", "both") else mask
        moved = elastic(moved, rng) if kind in ("elastic", "both") else moved
        if lesion_count(moved) == count:
            return moved.astype(mask.dtype), kind
    return mask, UNCHANGED


def pair_layouts(sources: list[np.ndarray], num_pairs: int, kind: str, rng_of) -> list[tuple[np.ndarray, int, str]]:
    """For each pair n: (its mask, the index of its source mask, the augmentation applied). ``rng_of(n)``:
    pair n's own generator (drawn from only when n is past the first pass)."""
    out = []
    for n in range(num_pairs):
        source = n % len(sources)
        if n < len(sources) or kind == "none":
            out.append((sources[source], source, "none"))
        else:
            mask, applied = new_layout(sources[source], kind, rng_of(n))
            out.append((mask, source, applied))
    return out
