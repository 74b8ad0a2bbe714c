"""PNG figures people would rather look at than numbers: training curves and image grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .files import WriteError, atomic_write_bytes


def plot_curves(path: str | Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
                xlabel: str = "iteration", title: str | None = None) -> None:
    """One PNG with a row of panels; ``panels[panel_title][curve_label] = (xs, ys)``."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (panel_title, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(images: Sequence[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 HxW or HxWxC images (all one size) into one image, padded with white."""
    tiles = [im if im.ndim == 3 else im[..., None] for im in images]
    channels = max(t.shape[2] for t in tiles)
    tiles = [np.repeat(t, channels, axis=2) if t.shape[2] != channels else t for t in tiles]
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, channels), 255, np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return grid


def save_image(path: str | Path, image: np.ndarray) -> None:
    """Write an image (PNG by the name's extension) atomically and read back (see utils.files): OpenCV's
    imwrite reports success for files a full disk left empty, so the image is encoded in memory."""
    path = Path(path)
    ok, data = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise WriteError(f"could not encode the image for {path}")
    atomic_write_bytes(path, data.tobytes(), verify=True)


def overlay(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """BGR picture of ``image`` with the predicted mask in red and, if given, the truth outlined in green."""
    base = image if image.ndim == 3 and image.shape[2] == 3 else cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    out = base.copy()
    red = np.zeros_like(base)
    red[..., 2] = 255
    m = mask.astype(bool)
    out[m] = (0.55 * base[m] + 0.45 * red[m]).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 1)
    if truth is not None:
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    return out
