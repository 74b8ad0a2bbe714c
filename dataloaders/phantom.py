"""Phantom B-mode ultrasound images with exact lesion masks, for demos and tests (no downloaded data).

Each image is simulated the way a scanner forms one, in beam coordinates (depth x scan line):

1. a tissue echogenicity map in dB: skin line, subcutaneous fat with bright septa between dark fat
   lobules, streaky fibroglandular tissue, pectoral muscle with oblique fibres, dark chest wall;
2. one hypoechoic lesion, drawn in image coordinates (so that a fan does not distort it): an oval, gently
   lobulated outline (benign-like) or an irregular, microlobulated, spiculated one (malignant-like),
   with a blurred edge, an internal echo level relative to the tissue around it that varies by case,
   heterogeneous internal texture, sometimes an echogenic halo or microcalcifications;
3. posterior acoustic features along the beams below the lesion: enhancement or shadowing in
   proportion to the path length through the lesion, sometimes refraction shadows at its sides;
4. depth attenuation and an imperfect time-gain compensation curve;
5. fully developed speckle: the envelope of low-pass filtered complex Gaussian noise (Rayleigh
   distributed), multiplying the echo amplitude everywhere, lesion included, plus a noise floor;
6. log compression to a dynamic range that varies by case, and, with ``sector``, scan conversion of
   the beams into a convex-probe fan.

The mask (0/255) is where the lesion, as imaged, has at least half its weight: the image blurs the
filled outline into a soft edge and the mask's boundary is that edge's 50 % level. It is the filled
outline itself except at spicule tips thinner than the blur and, in a fan, by the resampling
(under a pixel).

    python -m dataloaders.phantom --out-dir inputs/phantom --num-images 200
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a file (python dataloaders/phantom.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.io import MASK_SUBDIR, DataError  # noqa: E402
from utils.config import ConfigError  # noqa: E402
from utils.files import WriteError, make_temp_dir  # noqa: E402

MIN_SIDE = 32  # smaller images leave no room for tissue layers around a lesion
CLASSES = ("benign", "malignant")
PREVIEW_NAME = "preview.png"
SETTINGS_NAME = "phantom.yaml"


# ----------------------------------------------------------------------------------------------
# random fields
# ----------------------------------------------------------------------------------------------

def _blur(field: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    return cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3),
                            borderType=cv2.BORDER_REFLECT)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_y: float, sigma_x: float) -> np.ndarray:
    """Gaussian random field with the given correlation lengths (pixels), zero mean, unit std."""
    field = _blur(rng.standard_normal(shape, dtype=np.float32), sigma_y, sigma_x)
    return (field - field.mean()) / (field.std() + 1e-8)


def _smooth_curve(rng: np.random.Generator, n: int, amplitude: float, cycles: float = 2.0) -> np.ndarray:
    """A smooth random curve of n samples: three sinusoids of at most ``cycles`` periods, peak ~amplitude."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    curve = np.zeros(n, np.float32)
    for k in range(3):
        frequency = rng.uniform(0.3, cycles) * (k + 1) / 2
        curve += rng.uniform(0.3, 1.0) / (k + 1) * np.sin(2 * np.pi * (frequency * t + rng.uniform()))
    return amplitude * curve / (np.abs(curve).max() + 1e-8)


def _ridges(field: np.ndarray, width: float) -> np.ndarray:
    """Thin curved lines in [0, 1] along the zero crossings of a smooth random field."""
    return np.exp(-(field / width) ** 2)


def _interfaces(rng: np.random.Generator, h: int, w: int, count: int, depth_range: tuple[float, float],
                strength_db: tuple[float, float], slope: float) -> np.ndarray:
    """dB map of ``count`` thin bright wavy lines, mostly along the scan's width (tissue planes).

    Each line runs over part of the width with a tapering strength, a common mean slope
    (``slope`` rows per column) and its own waviness; the lines are about a pixel thick.
    """
    rows = np.arange(h, dtype=np.float32)[:, None]
    columns = np.arange(w, dtype=np.float32)
    out = np.zeros((h, w), np.float32)
    for _ in range(count):
        depth = rng.uniform(*depth_range) - slope * w / 2
        waviness = _smooth_curve(rng, w, rng.uniform(0.3, 2.5) * h / 128, cycles=2.5)
        path = depth + (slope + rng.uniform(-0.05, 0.05)) * columns + waviness
        centre, half_length = rng.uniform(0, w), rng.uniform(0.1, 0.45) * w
        taper = np.clip(1 - ((columns - centre) / half_length) ** 2, 0, None) ** 0.5
        thickness = rng.uniform(0.5, 1.1) * max(h / 128, 0.6)
        out += rng.uniform(*strength_db) * taper[None, :] * np.exp(-((rows - path[None, :]) / thickness) ** 2)
    return np.minimum(out, 16.0)


# ----------------------------------------------------------------------------------------------
# geometry: beam coordinates (depth row d, scan line column l) <-> image coordinates (y, x)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    """A linear probe (beams are image columns) or a convex probe (beams fan out from an apex).

    The beam grid has one row per image row of depth and ``lines`` scan lines. For the fan the apex
    lies ``apex_depth`` pixels above the image's top centre, depth row d is the arc of radius
    apex_depth + d, and there are enough lines for at least one per pixel along the deepest arc.
    """
    height: int
    width: int
    sector: bool
    lines: int
    apex_depth: float = 0.0
    half_angle: float = 0.0

    @classmethod
    def make(cls, height: int, width: int, sector: bool) -> "_Geometry":
        if not sector:
            return cls(height, width, False, width)
        apex_depth = 0.3 * height
        outer = apex_depth + height - 1
        half_angle = min(math.radians(40), math.asin(min(1.0, 0.49 * (width - 1) / outer)))
        lines = max(width, math.ceil(2 * half_angle * outer) + 1)
        return cls(height, width, True, lines, apex_depth, half_angle)

    @property
    def beam_shape(self) -> tuple[int, int]:
        return self.height, self.lines

    def _angle(self, line):
        return -self.half_angle + 2 * self.half_angle * line / (self.lines - 1)

    def _beam_of_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image pixel's (scan line, depth row), fractional."""
        y, x = np.mgrid[0:self.height, 0:self.width].astype(np.float32)
        dx, dy = x - (self.width - 1) / 2, y + self.apex_depth
        depth = np.hypot(dx, dy) - self.apex_depth
        line = (np.arctan2(dx, dy) + self.half_angle) / (2 * self.half_angle) * (self.lines - 1)
        return line.astype(np.float32), depth.astype(np.float32)

    def to_beam(self, image_field: np.ndarray) -> np.ndarray:
        """Resample an image-space float map onto the beam grid."""
        if not self.sector:
            return image_field
        d, l = np.mgrid[0:self.height, 0:self.lines].astype(np.float32)
        radius, angle = self.apex_depth + d, self._angle(l)
        x = ((self.width - 1) / 2 + radius * np.sin(angle)).astype(np.float32)
        y = (-self.apex_depth + radius * np.cos(angle)).astype(np.float32)
        return cv2.remap(image_field, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def to_image(self, beam_field: np.ndarray) -> np.ndarray:
        """Scan conversion: resample a beam-grid float map into the image (0 outside the fan)."""
        if not self.sector:
            return beam_field
        line, depth = self._beam_of_pixels()
        return cv2.remap(beam_field, line, depth, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def field_of_view(self, margin: float = 0.0) -> np.ndarray:
        """Bool image of the pixels the probe sees, at least ``margin`` pixels inside the edges."""
        if not self.sector:
            view = np.zeros((self.height, self.width), bool)
            m = int(math.ceil(margin))
            view[m:self.height - m, m:self.width - m] = True
            return view
        line, depth = self._beam_of_pixels()
        radius = self.apex_depth + np.maximum(depth, 0)
        line_margin = margin / radius * (self.lines - 1) / (2 * self.half_angle)
        return ((depth >= margin) & (depth <= self.height - 1 - margin)
                & (line >= line_margin) & (line <= self.lines - 1 - line_margin))

    def beam_point_to_image(self, depth: float, line: float) -> tuple[float, float]:
        """The image (x, y) of a point of the beam grid."""
        if not self.sector:
            return line, depth
        radius, angle = self.apex_depth + depth, self._angle(line)
        return (self.width - 1) / 2 + radius * math.sin(angle), -self.apex_depth + radius * math.cos(angle)


# ----------------------------------------------------------------------------------------------
# tissue
# ----------------------------------------------------------------------------------------------

def _tissue_db(rng: np.random.Generator, depth: int, lines: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity of normal breast tissue in beam space, dB relative to glandular tissue.

    Returns (echo_db, gland_top, gland_bottom), the last two the depth of the fibroglandular layer's
    boundaries on each scan line (the lesion is placed in it).
    """
    h, w = depth, lines
    rows = np.arange(h, dtype=np.float32)[:, None]
    # layer boundaries: smooth random curves across the scan lines
    skin = rng.uniform(0.02, 0.045) * h + _smooth_curve(rng, w, 0.01 * h)
    fat_bottom = rng.uniform(0.14, 0.3) * h + _smooth_curve(rng, w, rng.uniform(0.02, 0.07) * h)
    gland_bottom = rng.uniform(0.68, 0.84) * h + _smooth_curve(rng, w, rng.uniform(0.02, 0.06) * h)
    muscle_bottom = gland_bottom + rng.uniform(0.1, 0.2) * h + _smooth_curve(rng, w, 0.03 * h)
    fat_bottom = np.maximum(fat_bottom, skin + 0.06 * h)

    fat_db, gland_db = rng.uniform(-11, -6), rng.uniform(-1.5, 1.5)
    muscle_db, chest_db = rng.uniform(-10, -6), rng.uniform(-18, -13)
    echo = np.where(rows < fat_bottom, fat_db, np.where(rows < gland_bottom, gland_db,
                    np.where(rows < muscle_bottom, muscle_db, chest_db))).astype(np.float32)

    # fat: dark lobules outlined by bright septa (Cooper's ligaments)
    lobules = _smooth_noise(rng, (h, w), 0.03 * h, 0.08 * w)
    in_fat = (rows >= skin) & (rows < fat_bottom)
    echo += np.where(in_fat, rng.uniform(6, 10) * _ridges(lobules, 0.22) + 2.0 * lobules, 0.0)
    # gland: bright interfaces along the tissue planes over blotches of denser tissue and fat islands
    patches = _smooth_noise(rng, (h, w), 0.04 * h, 0.12 * w)
    slope = rng.uniform(-0.12, 0.12)
    gland_texture = (2.5 * patches - 4.0 * np.clip(-patches - 0.8, 0, None) - 3.0
                     + _interfaces(rng, h, w, int(rng.integers(18, 34)), (0.15 * h, 0.9 * h), (6, 13), slope))
    in_gland = (rows >= fat_bottom) & (rows < gland_bottom)
    echo += np.where(in_gland, gland_texture, 0.0)
    # muscle: oblique fibres
    fibres = _interfaces(rng, h, w, int(rng.integers(8, 14)), (0.6 * h, 1.0 * h), (3, 7), rng.uniform(0.15, 0.35))
    in_muscle = (rows >= gland_bottom) & (rows < muscle_bottom)
    echo += np.where(in_muscle, fibres, 0.0)
    # bright interfaces: skin, the fascia in front of the muscle, the pleura / rib surface
    for boundary, strength, thickness in ((skin, rng.uniform(10, 15), 0.008 * h),
                                          (gland_bottom, rng.uniform(3, 7), 0.006 * h),
                                          (muscle_bottom, rng.uniform(6, 11), 0.008 * h)):
        echo += strength * np.exp(-((rows - boundary) / max(thickness, 0.6)) ** 2)
    echo = np.where(rows < skin - 0.01 * h, echo - 6.0, echo)  # the gel / stand-off above the skin
    echo = _blur(echo, 0.004 * h + 0.4, 0.004 * w + 0.4)  # layer boundaries are not steps
    return echo, fat_bottom, gland_bottom


# ----------------------------------------------------------------------------------------------
# lesion
# ----------------------------------------------------------------------------------------------

def _lesion_outline(rng: np.random.Generator, centre: tuple[float, float], radius: float,
                    malignant: bool, points: int = 360) -> np.ndarray:
    """Closed outline (points x 2, image x/y) of a lesion of mean radius ``radius``."""
    theta = np.linspace(0, 2 * np.pi, points, endpoint=False)
    if malignant:  # round or taller than wide, irregular, microlobulated, spiculated
        aspect = rng.uniform(0.75, 1.25)
        harmonics = [(k, rng.uniform(0.02, 0.1) * 3 / k) for k in range(2, 9)]
        harmonics += [(k, rng.uniform(0.0, 0.03)) for k in range(9, 24, 2)]
    else:  # oval, wider than tall ("parallel"), smooth or gently lobulated
        aspect = rng.uniform(1.2, 2.0)
        harmonics = [(k, rng.uniform(0.0, 0.05) * 2 / k) for k in range(2, 6)]
    r = np.ones_like(theta)
    for k, amplitude in harmonics:
        r += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if malignant:
        for _ in range(int(rng.integers(0, 8))):
            width = rng.uniform(0.04, 0.1)
            delta = np.angle(np.exp(1j * (theta - rng.uniform(0, 2 * np.pi))))
            r += rng.uniform(0.1, 0.4) * np.exp(-(delta / width) ** 2)
    r = np.maximum(r, 0.35)
    # an ellipse of the chosen aspect, turned a little off the horizontal
    sx, sy = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    tilt = rng.uniform(-0.3, 0.3)
    x, y = sx * r * np.cos(theta), sy * r * np.sin(theta)
    x, y = x * math.cos(tilt) - y * math.sin(tilt), x * math.sin(tilt) + y * math.cos(tilt)
    return np.stack([centre[0] + x, centre[1] + y], axis=1)


_SUBPIXEL_BITS = 4
_DARKEST_LESION_DB = -22.0  # relative to glandular tissue; a cyst is about this dark on the display


def _fill(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask of the pixels whose centres the outline encloses (sub-pixel vertices)."""
    mask = np.zeros(shape, np.uint8)
    vertices = np.round(outline * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [vertices], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask


@dataclass(frozen=True)
class _LesionStyle:
    contrast_db: float  # lesion level relative to the tissue around it
    texture_db: float  # std of the internal heterogeneity
    edge_sigma: float  # blur of the margin, pixels
    posterior_db: float  # > 0 enhancement, < 0 shadowing (at the thickest part)
    halo_db: float  # echogenic rim
    edge_shadows_db: float  # refraction shadows at the lateral edges
    calcifications: int


def _lesion_style(rng: np.random.Generator, malignant: bool, scale: float) -> _LesionStyle:
    if malignant:
        posterior = rng.choice([rng.uniform(-11, -4), 0.0, rng.uniform(2, 5)], p=[0.55, 0.3, 0.15])
        return _LesionStyle(contrast_db=rng.uniform(-18, -7), texture_db=rng.uniform(1.5, 4.5),
                            edge_sigma=scale * rng.uniform(0.8, 2.2), posterior_db=float(posterior),
                            halo_db=rng.uniform(2, 6) if rng.uniform() < 0.35 else 0.0, edge_shadows_db=0.0,
                            calcifications=int(rng.integers(1, 7)) if rng.uniform() < 0.3 else 0)
    cyst_like = rng.uniform() < 0.3
    posterior = rng.choice([rng.uniform(3, 9), 0.0, rng.uniform(-6, -2)], p=[0.6, 0.3, 0.1])
    return _LesionStyle(contrast_db=rng.uniform(-22, -15) if cyst_like else rng.uniform(-15, -7),
                        texture_db=rng.uniform(0.5, 1.5) if cyst_like else rng.uniform(1.0, 3.0),
                        edge_sigma=scale * rng.uniform(0.5, 1.2), posterior_db=float(posterior),
                        halo_db=0.0, edge_shadows_db=rng.uniform(-9, -4) if rng.uniform() < 0.4 else 0.0,
                        calcifications=0)


def _posterior_db(alpha_beam: np.ndarray, style: _LesionStyle, rng: np.random.Generator) -> np.ndarray:
    """Enhancement / shadowing along each beam, growing with the path length through the lesion."""
    h, w = alpha_beam.shape
    path = np.cumsum(alpha_beam, axis=0)
    total = path[-1]
    out = np.zeros_like(alpha_beam)
    if style.posterior_db and total.max() > 0:
        variation = 1.0 + 0.25 * _smooth_noise(rng, (h, w), 0.05 * h, 0.02 * w)
        out += style.posterior_db * variation * path / total.max()
    if style.edge_shadows_db:
        lines = np.nonzero(total > 0.5)[0]
        if lines.size:
            columns = np.arange(w, dtype=np.float32)
            rows = np.arange(h, dtype=np.float32)[:, None]
            centre_depth = float(((alpha_beam * rows).sum(0) / np.maximum(total, 1e-6))[lines].mean())
            width = max(0.6, 0.006 * w)
            for edge in (lines[0], lines[-1]):
                column_profile = np.exp(-((columns - edge) / width) ** 2)
                depth_ramp = np.clip((rows - centre_depth) / (0.05 * h), 0, 1)
                out += style.edge_shadows_db * column_profile[None, :] * depth_ramp
    return _blur(out, 0.5, max(0.5, 0.015 * w))


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------

def _place_lesion(rng: np.random.Generator, geometry: _Geometry, gland_top: np.ndarray, gland_bottom: np.ndarray,
                  malignant: bool) -> tuple[np.ndarray, float]:
    """The mask of the lesion's drawn outline (uint8 0/1, image space) and its mean radius.

    Its centre is drawn in the glandular layer of a central scan line; outlines that leave the
    field of view are drawn again, so the whole lesion is always imaged.
    """
    h, w = geometry.height, geometry.width
    view = geometry.field_of_view(margin=2.0)
    for _attempt in range(100):
        radius = math.exp(rng.uniform(math.log(0.06), math.log(0.26))) * min(h, w)
        line = rng.uniform(0.25, 0.75) * (geometry.lines - 1)
        top, bottom = float(gland_top[int(round(line))]), float(gland_bottom[int(round(line))])
        depth = rng.uniform(top + 0.35 * radius, max(top + 0.35 * radius, bottom - 0.9 * radius))
        mask = _fill(_lesion_outline(rng, geometry.beam_point_to_image(depth, line), radius, malignant), (h, w))
        if mask.any() and not (mask.astype(bool) & ~view).any():
            return mask, radius
    raise RuntimeError(f"no lesion outline fits a {h}x{w} field of view")  # a 32x32 image still fits one


def _speckle(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Rayleigh-like speckle envelope (mean square 1): band-limited complex Gaussian noise, finer
    axially than laterally, averaged over a few independent looks (spatial compounding), which
    tames its contrast as scanners do."""
    sigma_axial, sigma_lateral = 0.7 * scale, 1.6 * scale
    looks = int(rng.integers(3, 7))
    intensity = np.zeros(shape, np.float32)
    for _ in range(looks):
        real = _blur(rng.standard_normal(shape, dtype=np.float32), sigma_axial, sigma_lateral)
        imaginary = _blur(rng.standard_normal(shape, dtype=np.float32), sigma_axial, sigma_lateral)
        intensity += (real ** 2 + imaginary ** 2) / (2 * real.var() + 1e-12)
    return np.sqrt(intensity / looks)


def make_phantom(rng: np.random.Generator, size: tuple[int, int] = (128, 128), malignant: bool = False,
                 sector: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One phantom B-mode image and its lesion mask, both uint8 HxW (mask 0/255), drawn from ``rng``."""
    h, w = size
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"phantom images need at least {MIN_SIDE}x{MIN_SIDE} pixels, got {h}x{w}")
    geometry = _Geometry.make(h, w, sector)
    beam_shape = geometry.beam_shape
    scale = min(h, w) / 128  # feature sizes in pixels are tuned at 128 pixels

    tissue_db, gland_top, gland_bottom = _tissue_db(rng, *beam_shape)
    mask, radius = _place_lesion(rng, geometry, gland_top, gland_bottom, malignant)
    style = _lesion_style(rng, malignant, scale)
    alpha = _blur(mask.astype(np.float32), style.edge_sigma, style.edge_sigma)  # 1/2 on the outline
    alpha_beam = geometry.to_beam(alpha)

    # the lesion's level is set against the tissue around it, so that it is hypoechoic there
    ring_size = max(3, int(0.6 * radius))
    ring = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_size + 1,) * 2)) > 0
    ring_beam = geometry.to_beam((ring & (mask == 0)).astype(np.float32)) > 0.5
    reference_db = float(tissue_db[ring_beam].mean()) if ring_beam.any() else 0.0
    texture = _smooth_noise(rng, beam_shape, 0.12 * radius, 0.15 * radius)
    # (not so dark that the display clips it to black: speckle stays visible inside)
    level_db = max(reference_db + style.contrast_db, min(_DARKEST_LESION_DB, reference_db - 6.0))
    lesion_db = level_db + style.texture_db * texture
    echo_db = tissue_db * (1 - alpha_beam) + lesion_db * alpha_beam
    if style.halo_db:
        halo = np.clip(_blur(mask.astype(np.float32), 3 * style.edge_sigma, 3 * style.edge_sigma) - alpha, 0, None)
        echo_db += style.halo_db * geometry.to_beam(halo)
    inside = np.argwhere(alpha_beam > 0.9)
    calcifications = min(style.calcifications, len(inside) // 100)  # a few bright dots, in large lesions only
    if calcifications:
        spots = np.zeros(beam_shape, np.float32)
        for y, x in inside[rng.integers(0, len(inside), calcifications)]:
            spots[y, x] = 1.0
        echo_db += 25 * np.clip(_blur(spots, 0.6, 0.6) * 4, 0, 1)
    echo_db += _posterior_db(alpha_beam, style, rng)

    # attenuation and an imperfect time-gain compensation: the residual drifts with depth
    depth = np.linspace(0, 1, h, dtype=np.float32)
    tgc = np.interp(depth, np.linspace(0, 1, 5), rng.uniform(-3, 3, 5)).astype(np.float32)
    echo_db += (rng.uniform(-10, 1) * depth + tgc)[:, None]
    echo_db += _smooth_curve(rng, beam_shape[1], rng.uniform(0.3, 1.5))[None, :]  # probe contact

    amplitude = 10 ** (echo_db / 20) * _speckle(rng, beam_shape, scale)
    noise_floor = 10 ** (rng.uniform(-48, -40) / 20)
    amplitude += noise_floor * np.hypot(rng.standard_normal(beam_shape, dtype=np.float32),
                                        rng.standard_normal(beam_shape, dtype=np.float32))

    # log compression to a dynamic range and brightness that vary by case, then scan conversion
    dynamic_range, tissue_gray = rng.uniform(40, 55), rng.uniform(110, 160)
    gray = tissue_gray + 255 / dynamic_range * 20 * np.log10(amplitude + 1e-6)
    gray = _blur(gray, 0.5 * scale, 0.7 * scale)  # the scanner's display smoothing
    image = geometry.to_image(np.clip(gray, 0, 255).astype(np.float32))
    view = geometry.field_of_view()
    image = np.where(view, image, 0)
    # the mask is where the lesion, as imaged, has at least half its weight: the drawn outline
    # (exactly, up to the tips of spicules thinner than the edge blur and, in a fan, the resampling)
    lesion = (geometry.to_image(alpha_beam) > 0.5) & view
    return np.round(image).clip(0, 255).astype(np.uint8), lesion.astype(np.uint8) * np.uint8(255)


# ----------------------------------------------------------------------------------------------
# a dataset
# ----------------------------------------------------------------------------------------------

def _check_parameters(num_images: int, size: tuple[int, int], malignant_fraction: float, preview_count: int) -> None:
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    if min(size) < MIN_SIDE:
        raise ConfigError(f"image size must be at least {MIN_SIDE}x{MIN_SIDE}, got {size[0]}x{size[1]} (height x width)")
    if not 0 <= malignant_fraction <= 1:
        raise ConfigError(f"malignant_fraction must be between 0 and 1, got {malignant_fraction}")
    if preview_count < 0:
        raise ConfigError(f"preview_count must be 0 or more, got {preview_count}")


def _dataset_entries(out_dir: Path) -> list[Path]:
    """What a phantom dataset consists of in ``out_dir``, where present (what --overwrite replaces)."""
    name = out_dir.resolve().name.lower()
    entries = [out_dir / "images", out_dir / "masks", out_dir / PREVIEW_NAME, out_dir / SETTINGS_NAME]
    entries = [p for p in entries if p.exists() or p.is_symlink()]
    pattern = re.compile(rf"^{re.escape(name)}_(train|val)\d+\.txt$")  # split files of the old images
    return entries + sorted(p for p in out_dir.iterdir() if p.is_file() and pattern.match(p.name))


def make_phantom_dataset(out_dir: str | Path, num_images: int = 200, size: tuple[int, int] = (128, 128),
                         seed: int = 0, malignant_fraction: float = 0.5, sector: bool = False,
                         overwrite: bool = False, preview_count: int = 16, progress: bool = False) -> list[str]:
    """Write a phantom dataset in the layout train.py reads; returns its ids in generation order.

    ``out_dir`` gets ``images/<id>.png`` (8-bit grey), ``masks/0/<id>.png`` (0/255), ``preview.png``
    (the first ``preview_count`` images with their mask outlined; none if 0) and ``phantom.yaml``
    (the settings). round(num_images * malignant_fraction) images are malignant-like, in a seeded
    random order; ids are ``benign (n)`` / ``malignant (n)``, n counting from 1 in each class.
    Image k depends only on (seed, k, its class, size, sector). Everything is written to a
    temporary folder first and moved into place at the end: an interrupted run leaves the folder as
    it was. An existing dataset in ``out_dir`` (images, masks, preview, settings, split files) is an
    error unless ``overwrite``, which replaces it whole.
    """
    from tqdm import tqdm

    from utils.config import save_yaml
    from utils.plots import image_grid, overlay, save_image

    out_dir = Path(out_dir)
    height, width = size
    _check_parameters(num_images, size, malignant_fraction, preview_count)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output folder {out_dir} is a file")
    old = _dataset_entries(out_dir) if out_dir.is_dir() else []
    if old and not overwrite:
        raise DataError(f"{out_dir} already holds a dataset ({', '.join(p.name for p in old[:6])}"
                        f"{', ...' if len(old) > 6 else ''}); use --overwrite to replace it")

    seeds = np.random.SeedSequence(seed).spawn(num_images + 1)
    n_malignant = round(num_images * malignant_fraction)
    is_malignant = np.random.default_rng(seeds[0]).permutation(
        np.arange(num_images) < n_malignant)

    staging = make_temp_dir(out_dir.resolve().parent, prefix=f".{out_dir.resolve().name}.phantom-")
    try:
        (staging / "images").mkdir()
        (staging / MASK_SUBDIR).mkdir(parents=True)
        ids, counts, previews = [], {c: 0 for c in CLASSES}, []
        for k in tqdm(range(num_images), desc="phantom images", unit="img", disable=not progress):
            label = CLASSES[int(is_malignant[k])]
            counts[label] += 1
            case_id = f"{label} ({counts[label]})"
            image, mask = make_phantom(np.random.default_rng(seeds[k + 1]), size, bool(is_malignant[k]), sector)
            save_image(staging / "images" / f"{case_id}.png", image)
            save_image(staging / MASK_SUBDIR / f"{case_id}.png", mask)
            if len(previews) < preview_count:
                previews.append(overlay(image, np.zeros_like(mask), truth=mask > 0))
            ids.append(case_id)
        if previews:
            save_image(staging / PREVIEW_NAME, image_grid(previews, columns=8))
        save_yaml({"num_images": num_images, "height": height, "width": width, "seed": seed,
                   "malignant_fraction": malignant_fraction, "sector": sector}, staging / SETTINGS_NAME)
        _move_into_place(staging, out_dir, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ids


def _move_into_place(staging: Path, out_dir: Path, old: list[Path]) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)  # one atomic rename
        return
    for path in old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for entry in sorted(staging.iterdir()):
        os.replace(entry, out_dir / entry.name)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def _options():
    from utils.config import NON_NEGATIVE, Option

    return [
        Option("out_dir", "inputs/phantom", "folder to write: images/, masks/0/, preview.png, phantom.yaml"),
        Option("num_images", 200, "number of image/mask pairs"),
        Option("height", 128, f"image height in pixels (at least {MIN_SIDE})"),
        Option("width", 128, f"image width in pixels (at least {MIN_SIDE})"),
        Option("seed", 0, "random seed: the same seed and settings give byte-identical files", check=NON_NEGATIVE),
        Option("malignant_fraction", 0.5, "fraction of malignant-like (irregular, spiculated) lesions"),
        Option("sector", False, "convex-probe fan (sector) images instead of linear-probe rectangles"),
        Option("preview_count", 16, "images in the contact sheet preview.png (0: no preview)"),
        Option("overwrite", False, "replace a dataset already in --out-dir (its images, masks, preview, "
                                   "settings and split files)", in_file=False),
    ]


def main(argv: list[str] | None = None) -> int:
    import time

    from utils.config import parse_config

    description = __doc__.split("\n\n")[0]
    epilog = ("Writes the MGCC dataset layout; make split files with: python split.py --data-dir OUT_DIR\n"
              "Example: python -m dataloaders.phantom --out-dir inputs/phantom --num-images 200 --seed 0")
    try:
        cfg = parse_config(_options(), description, argv, epilog=epilog)
        start = time.perf_counter()
        ids = make_phantom_dataset(cfg.out_dir, cfg.num_images, (cfg.height, cfg.width), cfg.seed,
                                   cfg.malignant_fraction, cfg.sector, cfg.overwrite, cfg.preview_count,
                                   progress=True)
    except (DataError, ConfigError, OSError, WriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_malignant = sum(i.startswith("malignant") for i in ids)
    print(f"wrote {len(ids)} phantom images ({len(ids) - n_malignant} benign, {n_malignant} malignant) of "
          f"{cfg.height}x{cfg.width}{' (sector)' if cfg.sector else ''} to {cfg.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    if cfg.preview_count:
        print(f"preview: {Path(cfg.out_dir) / PREVIEW_NAME}")
    print(f"next: python split.py --data-dir {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
