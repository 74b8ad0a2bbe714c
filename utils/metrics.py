"""Segmentation metrics, per image at threshold 0.5, then averaged over images.

Definitions (TP, FP, FN, TN counted in pixels of one image at the evaluated size):
    IoU = TP / (TP + FP + FN)        Dice = 2TP / (2TP + FP + FN)
    sensitivity (recall) = TP / (TP + FN)       precision = TP / (TP + FP)
    F1 = 2 P R / (P + R) (0 when P + R = 0; equals Dice per image)    accuracy = (TP + TN) / all
    HD95 = 95th percentile of the symmetric boundary-to-boundary distances, in pixels.
A ratio whose denominator is 0 is 1 (nothing to find and nothing found: an empty prediction on an
empty mask scores IoU 1, as the official smoothed metric does). HD95 is 0 when both are empty and
the image diagonal (the largest possible distance) when exactly one is empty.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

METRIC_NAMES = ("iou", "dice", "sensitivity", "precision", "f1", "accuracy", "hd95")


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


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (the mask minus its erosion)."""
    eroded = cv2.erode(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~eroded.astype(bool)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th percentile Hausdorff distance between the boundaries of two 2-D bool masks, in pixels."""
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(np.hypot(*pred.shape))
    distances = []
    for a, b in ((pred, target), (target, pred)):
        # exact Euclidean distance of every pixel to the nearest boundary pixel of b
        to_b = cv2.distanceTransform((~_boundary(b)).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        distances.append(to_b[_boundary(a)])
    return float(np.percentile(np.concatenate(distances), 95))


def hd95_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HD95 (N,) float64 on the CPU for bool masks of shape (N, H, W) or (N, 1, H, W)."""
    p = pred.reshape(pred.shape[0], *pred.shape[-2:]).cpu().numpy()
    t = target.reshape(target.shape[0], *target.shape[-2:]).cpu().numpy()
    return torch.tensor([hd95(a, b) for a, b in zip(p, t)], dtype=torch.float64)


def per_image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """All metrics per image for bool masks of shape (N, H, W) or (N, 1, H, W); HD95 on the CPU."""
    values = overlap_metrics(confusion_counts(pred, target))
    values["hd95"] = hd95_per_image(pred, target)
    return {k: v.cpu() for k, v in values.items()}


class MetricAverager:
    """Collects per-image metrics over batches; ``summary()`` gives the mean of each over images.

    The overlap metrics stay on the logits' device until ``summary()``, which reads them back once.
    ``hd95=False`` leaves out HD95, the one metric computed on the CPU (a copy and a wait per batch).
    """

    def __init__(self, hd95: bool = True):
        self.names = METRIC_NAMES if hd95 else tuple(n for n in METRIC_NAMES if n != "hd95")
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def update(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> None:
        pred, target = torch.sigmoid(logits.float()) > threshold, target.bool()
        values = overlap_metrics(confusion_counts(pred, target))
        if "hd95" in self.names:
            values["hd95"] = hd95_per_image(pred, target)
        for name in self.names:
            self.values[name].append(values[name])

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.values["iou"])

    def summary(self) -> dict[str, float]:
        names = [name for name in self.names if self.values[name]]
        means = [torch.cat(self.values[name]).mean().cpu() for name in names]
        return dict(zip(names, torch.stack(means).tolist())) if names else {}
