"""HD95, ASD and NSD (MONAI) against hand-computed cases, medpy's definition and the project's HD95 before MONAI.

medpy is not installed. Its definition (medpy/metric/binary.py, ``__surface_distances`` and ``hd95``) is
written out below as the reference: surfaces are mask XOR binary_erosion(mask) with
generate_binary_structure(2, 1) (the 4-neighbour cross; scipy's erosion treats outside the image as
background), distances come from distance_transform_edt of the other surface's complement, and hd95
is numpy.percentile of the two directed sets stacked together. medpy raises RuntimeError on an empty mask.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from utils.metrics import MetricAverager, nsd_threshold, per_image_metrics, surface_metrics


def medpy_surface_distances(result, reference, spacing=None):
    cross = generate_binary_structure(2, 1)
    result_surface = result ^ binary_erosion(result, structure=cross)
    reference_surface = reference ^ binary_erosion(reference, structure=cross)
    return distance_transform_edt(~reference_surface, sampling=spacing)[result_surface]


def medpy_hd95(result, reference, spacing=None):
    pooled = np.hstack((medpy_surface_distances(result, reference, spacing),
                        medpy_surface_distances(reference, result, spacing)))
    return float(np.percentile(pooled, 95))


def previous_hd95(pred, target):
    """utils/metrics.py's hd95 before MONAI (commit 80ab748): OpenCV surfaces and distances, pooled P95."""
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(np.hypot(*pred.shape))

    def boundary(mask):
        eroded = cv2.erode(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)),
                           borderType=cv2.BORDER_CONSTANT, borderValue=0)
        return mask & ~eroded.astype(bool)

    distances = [cv2.distanceTransform((~boundary(b)).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[boundary(a)]
                 for a, b in ((pred, target), (target, pred))]
    return float(np.percentile(np.concatenate(distances), 95))


def square_with_stray_line(stray_pixels: int):
    """A 10 x 10 square (36 surface pixels) as ground truth; the prediction is the square plus a vertical line
    of ``stray_pixels`` pixels 6 columns right of its right edge, within its rows (each 6 from the square)."""
    target = np.zeros((16, 24), bool)
    target[3:13, 3:13] = True
    pred = target.copy()
    pred[5:5 + stray_pixels, 18] = True
    return pred, target


def test_single_pixels_all_conventions_agree():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[2, 1] = b[5, 5] = True
    m = surface_metrics(a, b)
    assert m["hd95"] == pytest.approx(5.0) and m["asd"] == pytest.approx(5.0)  # a 3-4-5 triangle
    assert m["nsd"] == 0.0
    assert medpy_hd95(a, b) == pytest.approx(5.0) and previous_hd95(a, b) == pytest.approx(5.0)
    assert surface_metrics(a, b, tolerance=5.0)["nsd"] == 1.0


def test_spacing_gives_millimetres():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[2, 1] = b[5, 5] = True
    # rows 2 mm apart, columns 0.5 mm: 3 rows and 4 columns are 6 mm and 2 mm
    m = surface_metrics(a, b, spacing=(2.0, 0.5))
    assert m["hd95"] == pytest.approx(math.sqrt(40), rel=1e-6) == medpy_hd95(a, b, (2.0, 0.5))
    assert surface_metrics(a, b, spacing=0.5)["hd95"] == pytest.approx(2.5)
    # the default NSD tolerance is 2 pixels, in mm 2 x the (mean) spacing
    assert nsd_threshold() == 2.0 and nsd_threshold(0.5) == 1.0 and nsd_threshold((2.0, 0.5)) == 2.5
    assert nsd_threshold(0.5, tolerance=3.0) == 3.0


def test_shifted_square_both_directions_alike_conventions_differ_by_interpolation_only():
    target = np.zeros((20, 20), bool)
    target[4:12, 4:12] = True
    pred = np.roll(target, (2, 3), axis=(0, 1))
    forward, backward = medpy_surface_distances(pred, target), medpy_surface_distances(target, pred)
    assert sorted(forward) == pytest.approx(sorted(backward))  # mirror images: one distribution
    new = surface_metrics(pred, target)["hd95"]
    assert new == pytest.approx(np.percentile(forward, 95), abs=1e-5)
    # pooling the same distances twice only moves numpy's linear interpolation between neighbours
    assert medpy_hd95(pred, target) == pytest.approx(np.percentile(np.hstack((forward, forward)), 95))
    assert previous_hd95(pred, target) == pytest.approx(medpy_hd95(pred, target), abs=1e-5)
    assert abs(new - medpy_hd95(pred, target)) < 0.1


@pytest.mark.parametrize("stray, pooled_p95", [(3, 0.0), (4, 1.5)])
def test_stray_blob_monai_takes_the_worse_direction_medpy_pools(stray, pooled_p95):
    pred, target = square_with_stray_line(stray)
    # pred -> gt: 36 zeros and `stray` sixes; gt -> pred: 36 zeros (the square is in both).
    # MONAI: max(P95(36 zeros + sixes), P95(zeros)) = 6. medpy / previous: P95 of 72 zeros + sixes:
    # position 0.95 * (71 + stray) = 70.3 (a zero) for 3, 71.25 (0.25 of the way to a six) for 4.
    m = surface_metrics(pred, target)
    assert m["hd95"] == pytest.approx(6.0)
    assert medpy_hd95(pred, target) == pytest.approx(pooled_p95)
    assert previous_hd95(pred, target) == pytest.approx(pooled_p95)
    # ASD: the pooled mean, 6 * stray / (36 + stray + 36); medpy's assd weighs each direction by half
    assert m["asd"] == pytest.approx(6 * stray / (72 + stray), rel=1e-6)
    # NSD at 2 px: every surface pixel but the stray ones is within tolerance
    assert m["nsd"] == pytest.approx(72 / (72 + stray), rel=1e-6)
    assert surface_metrics(pred, target, tolerance=6.0)["nsd"] == 1.0
    assert surface_metrics(pred, target, tolerance=5.9)["nsd"] == pytest.approx(72 / (72 + stray), rel=1e-6)


def test_random_blobs_against_the_definitions():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    for _ in range(8):
        a = (yy - rng.uniform(8, 32)) ** 2 / rng.uniform(10, 120) + (xx - rng.uniform(8, 40)) ** 2 / rng.uniform(10, 120) < 1
        b = (yy - rng.uniform(8, 32)) ** 2 / rng.uniform(10, 120) + (xx - rng.uniform(8, 40)) ** 2 / rng.uniform(10, 120) < 1
        forward, backward = medpy_surface_distances(a, b), medpy_surface_distances(b, a)
        m = surface_metrics(a, b)
        assert m["hd95"] == pytest.approx(max(np.percentile(forward, 95), np.percentile(backward, 95)), abs=1e-4)
        assert m["asd"] == pytest.approx(np.hstack((forward, backward)).mean(), abs=1e-4)
        within = (forward <= 2).sum() + (backward <= 2).sum()
        assert m["nsd"] == pytest.approx(within / (len(forward) + len(backward)), abs=1e-6)
        assert previous_hd95(a, b) == pytest.approx(medpy_hd95(a, b), abs=1e-3)


def test_empty_mask_conventions():
    lesion = np.zeros((3, 4), bool)
    lesion[1, 1] = True
    empty = np.zeros((3, 4), bool)
    assert surface_metrics(empty, empty) == {"hd95": 0.0, "asd": 0.0, "nsd": 1.0}  # nothing to find, nothing found
    for pred, target in ((empty, lesion), (lesion, empty)):  # a missed lesion, or a lesion where there is none
        assert surface_metrics(pred, target) == {"hd95": 5.0, "asd": 5.0, "nsd": 0.0}  # 5: the 3 x 4 diagonal
    assert surface_metrics(empty, lesion, spacing=(2.0, 1.5))["hd95"] == pytest.approx(math.hypot(6, 6))


def test_per_image_and_averager_carry_all_metrics():
    pred, target = square_with_stray_line(3)
    values = per_image_metrics(torch.from_numpy(np.stack([pred, target])), torch.from_numpy(np.stack([target, target])),
                               spacing=[None, 0.5])
    assert values["hd95"].tolist() == pytest.approx([6.0, 0.0]) and values["nsd"][1] == 1.0
    averager = MetricAverager()
    averager.update(torch.where(torch.from_numpy(pred), 5.0, -5.0)[None, None], torch.from_numpy(target)[None, None])
    summary = averager.summary()
    assert summary["hd95"] == pytest.approx(6.0) and summary["nsd"] == pytest.approx(72 / 75, rel=1e-6)
    assert set(MetricAverager(surface=False).names) & {"hd95", "asd", "nsd"} == set()
