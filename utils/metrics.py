"""Segmentation metrics, per image at threshold 0.5, then averaged over images.

Overlap metrics (TP, FP, FN, TN counted in pixels of one image at the evaluated size):
    IoU = TP / (TP + FP + FN)        Dice = 2TP / (2TP + FP + FN)
    sensitivity (recall) = TP / (TP + FN)       precision = TP / (TP + FP)
    F1 = 2 P R / (P + R) (0 when P + R = 0; equals Dice per image)    accuracy = (TP + TN) / all
A ratio whose denominator is 0 is 1 (nothing to find and nothing found: an empty prediction on an
empty mask scores IoU 1, as the official smoothed metric does).

Surface metrics, computed with MONAI's ``monai.metrics`` (1.6): the surface of a mask is the mask
minus its binary erosion by the 4-neighbour cross (pixels on the image's edge are surface), and
d(A -> B) are the exact Euclidean distances of A's surface pixels to the nearest surface pixel of B,
in pixels, or in mm with a pixel spacing:
    hd95 = max(P95 d(pred -> gt), P95 d(gt -> pred))      compute_hausdorff_distance(percentile=95)
    asd  = mean of d(pred -> gt) and d(gt -> pred) pooled  compute_average_surface_distance(symmetric=True)
    nsd  = (#{d(pred -> gt) <= tau} + #{d(gt -> pred) <= tau}) / (#pred surface + #gt surface)
                                                           compute_surface_dice, tau = nsd tolerance
P95 is the linearly interpolated 95th percentile. medpy's ``hd95`` (and this project's HD95 before
MONAI) takes the 95th percentile of the two sets pooled instead: lower where one direction holds the
outliers (a stray blob), else about equal (tests/test_surface_metrics.py has cases of both).
Empty masks (MONAI returns NaN or inf there, which would poison a mean over images):
    both empty:         hd95 = asd = 0, nsd = 1  (nothing to find and nothing found)
    exactly one empty:  hd95 = asd = the image's diagonal (the largest distance possible), nsd = 0
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

SURFACE_METRICS = ("hd95", "asd", "nsd")
METRIC_NAMES = ("iou", "dice", "sensitivity", "precision", "f1", "accuracy", *SURFACE_METRICS)
DEFAULT_NSD_TOLERANCE_PX = 2.0  # NSD's default tolerance: 2 pixels (their mm equivalent with a spacing)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 4) float64 counts TP, FP, FN, TN per image for bool tensors of shape (N, ...)."""
    pred, target = pred.flatten(1), target.flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).double()


def overlap_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image metrics (each of shape (N,)) from confusion counts."""
    tp, fp, fn, tn = counts.unbind(1)
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sensitivity,
        "precision": precision,
        # P + R = 0 only when TP = 0 with something predicted or to find: F1 = 0 (= Dice per image)
        "f1": torch.where(precision + sensitivity > 0,
                          2 * precision * sensitivity / (precision + sensitivity).clamp_min(1e-12),
                          torch.zeros_like(precision)),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
    }


def _spacing_pair(spacing) -> tuple[float, float] | None:
    """mm per pixel as (row, column) from one number (isotropic) or two; None stays None (pixels)."""
    if spacing is None:
        return None
    pair = (float(spacing),) * 2 if np.ndim(spacing) == 0 else tuple(float(s) for s in spacing)
    if len(pair) != 2 or not all(np.isfinite(s) and s > 0 for s in pair):
        raise ValueError(f"a pixel spacing is one positive number or two (row, column), got {spacing!r}")
    return pair


def nsd_threshold(spacing=None, tolerance: float | None = None) -> float:
    """The NSD tolerance in the distances' unit: ``tolerance`` as given (mm with a spacing, else pixels),
    or by default DEFAULT_NSD_TOLERANCE_PX pixels (times the mean of the two spacings: its mm equivalent)."""
    if tolerance is not None:
        if not tolerance >= 0:
            raise ValueError(f"the NSD tolerance must be 0 or more, got {tolerance}")
        return float(tolerance)
    pair = _spacing_pair(spacing)
    return DEFAULT_NSD_TOLERANCE_PX * (1.0 if pair is None else (pair[0] + pair[1]) / 2)


def surface_metrics(pred: np.ndarray, target: np.ndarray, spacing=None, tolerance: float | None = None) -> dict[str, float]:
    """hd95, asd and nsd of two 2-D bool masks with MONAI (see the module docstring for definitions and the
    empty-mask conventions); distances in pixels, or in mm with ``spacing`` (mm per pixel)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"surface metrics need two 2-D masks of one size, got {pred.shape} and {target.shape}")
    pair = _spacing_pair(spacing)
    tau = nsd_threshold(pair, tolerance)
    if not pred.any() and not target.any():
        return {"hd95": 0.0, "asd": 0.0, "nsd": 1.0}
    if not pred.any() or not target.any():
        (h, w), (sy, sx) = pred.shape, pair or (1.0, 1.0)
        diagonal = float(np.hypot(h * sy, w * sx))
        return {"hd95": diagonal, "asd": diagonal, "nsd": 0.0}
    y_pred, y = (torch.from_numpy(m)[None, None].float() for m in (pred, target))
    common = {"include_background": True, "spacing": list(pair) if pair else None}
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated get_mask_edges(always_return_as_numpy=...) on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        values = {"hd95": compute_hausdorff_distance(y_pred, y, percentile=95, **common),
                  "asd": compute_average_surface_distance(y_pred, y, symmetric=True, **common),
                  "nsd": compute_surface_dice(y_pred, y, class_thresholds=[tau], **common)}
    return {name: float(value.reshape(())) for name, value in values.items()}


def surface_metrics_per_image(pred: torch.Tensor, target: torch.Tensor, spacing=None,
                              tolerance: float | None = None) -> dict[str, torch.Tensor]:
    """hd95, asd, nsd (each (N,) float64, on the CPU) for bool masks of shape (N, H, W) or (N, 1, H, W);
    ``spacing``: one for every image, or a list of one per image."""
    p = pred.reshape(pred.shape[0], *pred.shape[-2:]).cpu().numpy()
    t = target.reshape(target.shape[0], *target.shape[-2:]).cpu().numpy()
    spacings = spacing if isinstance(spacing, list) else [spacing] * len(p)
    rows = [surface_metrics(a, b, s, tolerance) for a, b, s in zip(p, t, spacings)]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in SURFACE_METRICS}


def per_image_metrics(pred: torch.Tensor, target: torch.Tensor, spacing=None,
                      tolerance: float | None = None) -> dict[str, torch.Tensor]:
    """All metrics per image for bool masks of shape (N, H, W) or (N, 1, H, W); the surface ones on the CPU."""
    values = overlap_metrics(confusion_counts(pred, target))
    values.update(surface_metrics_per_image(pred, target, spacing, tolerance))
    return {k: v.cpu() for k, v in values.items()}


class MetricAverager:
    """Collects per-image metrics over batches; ``summary()`` gives the mean of each over images.

    The overlap metrics stay on the logits' device until ``summary()``, which reads them back once.
    ``surface=False`` leaves out HD95, ASD and NSD, computed on the CPU (a copy and a wait per batch).
    """

    def __init__(self, surface: bool = True, nsd_tolerance: float | None = None):
        self.names = METRIC_NAMES if surface else tuple(n for n in METRIC_NAMES if n not in SURFACE_METRICS)
        self.nsd_tolerance = nsd_tolerance
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def update(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> None:
        pred, target = torch.sigmoid(logits.float()) > threshold, target.bool()
        values = overlap_metrics(confusion_counts(pred, target))
        if "hd95" in self.names:
            values.update(surface_metrics_per_image(pred, target, tolerance=self.nsd_tolerance))
        for name in self.names:
            self.values[name].append(values[name])

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.values["iou"])

    def summary(self) -> dict[str, float]:
        names = [name for name in self.names if self.values[name]]
        means = [torch.cat(self.values[name]).mean().cpu() for name in names]
        return dict(zip(names, torch.stack(means).tolist())) if names else {}
