"""Strong augmentation and CutMix on batched tensors on the training device (UniMatch's medical scenario).

UniMatch ``more-scenarios/medical/dataset/acdc.py`` and ``dataset/transform.py`` make each strong view
from the weak one (after its rotation/flip) with, on an 8-bit grayscale PIL image:
    ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8, then GaussianBlur(sigma ~ U(0.1, 2.0)) with p 0.5;
    a CutMix box with p 0.5: area ~ U(0.02, 0.4) of the image, aspect ratio ~ U(0.3, 1/0.3), top-left
    corner uniform, redrawn (ratio and corner) until the box fits.
On a grayscale image torchvision's saturation and hue leave it unchanged, so only brightness and
contrast act; that is what is applied here.

Why kornia (0.9): its ColorJitter is torchvision's formulas (brightness multiplies, contrast blends
with the grayscale mean, random order of the two) on batched tensors with one draw per image, and
RandomGaussianBlur draws sigma per image; both run on whatever device the batch is on, so the same
code serves the data-on-device path and the loader path, after the batch reaches the device. MONAI's
intensity transforms work one image at a time and have no torchvision-equivalent colour jitter.
Their random numbers come from the global torch generator, which checkpoints save (exact resume).
kornia 0.9 draws them on the CPU on purpose: its colour steps decide on the CPU which steps apply (no wait
for the device) and copy the per-image factors to the device, five small copies per call; drawing them on the
GPU (``set_rng_device_and_dtype``) would turn those decisions into reads from the device. Older kornia
(0.7, 0.8) also read the batch's apply-mask back every call, hence ``kornia>=0.9`` in requirements.txt.

Differences: the jitter and blur see the image in [0, 1] float (the reference rounds to 8 bits in
between); the blur kernel is 13 x 13 (3 sigma at the largest sigma; PIL approximates the Gaussian
with box blurs).
"""
from __future__ import annotations

import kornia.augmentation as K
import torch

from dataloaders.datasets import normalization_constants

CUTMIX_TRIES = 512  # candidates per box; the chance that none of them fits is below 1e-15


class Intensity:
    """Maps network inputs (normalised as dataloaders/datasets.py) to intensities in [0, 1] and back.

    The normalisation constants are copied to a device once, at its first use, and kept there: a copy per
    call would be a blocking host-to-device transfer in every step (and none is allowed in a CUDA graph)."""

    def __init__(self, in_channels: int, normalization: str):
        offset, scale = normalization_constants(in_channels, normalization)
        self.normalization = normalization
        self.offset = torch.from_numpy(offset).view(1, -1, 1, 1)
        self.scale = torch.from_numpy(scale).view(1, -1, 1, 1)
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale) on ``device``, copied there once."""
        if device not in self.on_device:
            self.on_device[device] = (self.offset.to(device), self.scale.to(device))
        return self.on_device[device]

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "official":  # x = (255 u - offset) / scale / 255
            offset, scale = self.constants(x.device)
            return (x * 255 * scale + offset) / 255
        return (x + 1) / 2  # x = 255 u / 127.5 - 1

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        if self.normalization == "official":
            offset, scale = self.constants(u.device)
            return (u * 255 - offset) / scale / 255
        return u * 2 - 1


class StrongAugmentation:
    """UniMatch's medical strong view of a normalised batch, drawn per image, in float32."""

    def __init__(self, intensity: Intensity, jitter_p: float = 0.8, brightness: float = 0.5, contrast: float = 0.5,
                 blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel: int = 13):
        self.intensity = intensity
        self.jitter = K.ColorJitter(brightness=brightness, contrast=contrast, p=jitter_p)
        self.blur = K.RandomGaussianBlur(blur_kernel, blur_sigma, p=blur_p)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            unit = self.intensity.to_unit(images.float())
            return self.intensity.from_unit(self.blur(self.jitter(unit)))


def cutmix_boxes(n: int, size: int, device: torch.device, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch's obtain_cutmix_box for n images of size x size: a bool (n, 1, size, size), True inside.

    The reference's loop (keep the area, redraw ratio and corner until the box fits) is drawn at once:
    CUTMIX_TRIES candidates per image, the first that fits is taken (the same distribution).
    """
    apply = torch.rand(n, device=device) <= p
    box_area = torch.empty(n, 1, device=device).uniform_(*area) * size * size
    box_ratio = torch.empty(n, CUTMIX_TRIES, device=device).uniform_(*ratio)
    widths = torch.sqrt(box_area / box_ratio).floor().long()
    heights = torch.sqrt(box_area * box_ratio).floor().long()
    xs = torch.randint(0, size, (n, CUTMIX_TRIES), device=device)
    ys = torch.randint(0, size, (n, CUTMIX_TRIES), device=device)
    fits = (xs + widths <= size) & (ys + heights <= size)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first candidate that fits
    x, y, w, h = (t.gather(1, first).view(n, 1, 1) for t in (xs, ys, widths, heights))
    rows = torch.arange(size, device=device).view(1, size, 1)
    cols = torch.arange(size, device=device).view(1, 1, size)
    inside = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w) & apply.view(n, 1, 1)
    return inside[:, None]


def mix_partner(x: torch.Tensor) -> torch.Tensor:
    """The image each unlabeled image takes its CutMix patch from: the next one of the batch (rolled)."""
    return x.roll(1, dims=0)
