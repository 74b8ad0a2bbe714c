"""The largest image a script decodes: one limit per process, checked on a file's header.

Ultrasound images are below 2 megapixels, and one 20000 x 20000 PNG of 15 MB takes a training run to
4 GB, so every script that reads images has the option max_image_pixels. The limit travels in the
environment so that data-loader workers started by spawn see the value the script was given;
dataloaders/io.py checks each file's header against it before anything is decoded.
"""
from __future__ import annotations

import os

from .config import Option, between, checked
from .errors import DataError

MAX_IMAGE_PIXELS = 25_000_000
OPENCV_MAX_IMAGE_PIXELS = 1 << 30  # OpenCV's own CV_IO_MAX_IMAGE_PIXELS: a higher limit could not be met
_PIXEL_LIMIT_ENV = "MGCC_MAX_IMAGE_PIXELS"

_PIXEL_LIMIT_HELP = ("largest image, width x height, a file may have (checked on its header, before it is decoded; "
                     f"at most {OPENCV_MAX_IMAGE_PIXELS}, OpenCV's own limit)")
PIXEL_LIMIT_CHECK = between(1, OPENCV_MAX_IMAGE_PIXELS)
# the option of every script that reads images (schema scripts); argparse scripts: add_pixel_limit_flag
MAX_IMAGE_PIXELS_OPTION = Option("max_image_pixels", MAX_IMAGE_PIXELS, _PIXEL_LIMIT_HELP, check=PIXEL_LIMIT_CHECK,
                                 in_file=False)


def add_pixel_limit_flag(parser) -> None:
    parser.add_argument("--max-image-pixels", type=checked(int, PIXEL_LIMIT_CHECK), default=MAX_IMAGE_PIXELS,
                        help=f"{_PIXEL_LIMIT_HELP} (default: {MAX_IMAGE_PIXELS})")


def set_max_image_pixels(limit: int) -> None:
    """The largest width x height any image may have in this process and its workers."""
    if not 1 <= int(limit) <= OPENCV_MAX_IMAGE_PIXELS:
        raise DataError(f"max_image_pixels must be between 1 and {OPENCV_MAX_IMAGE_PIXELS} (OpenCV's own limit), "
                        f"got {limit}")
    os.environ[_PIXEL_LIMIT_ENV] = str(int(limit))


def max_image_pixels() -> int:
    return int(os.environ.get(_PIXEL_LIMIT_ENV, MAX_IMAGE_PIXELS))
