"""The one way every script ends: bad input is one 'error:' line and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from . import distributed
from .errors import USER_ERRORS
from .locks import release_held
from .pixel_limit import set_max_image_pixels
from .runtime import resolve_device


def run_on_device(cfg, work: Callable[..., int]) -> int:
    """``work(cfg, ctx, device)`` on this process's device (under torchrun: its rank's, in the process
    group), with the pixel limit of --max-image-pixels; then the folder locks are released and the
    process group is left, whatever happened."""
    set_max_image_pixels(cfg.max_image_pixels)
    ctx, device = distributed.setup(resolve_device(cfg.device))
    try:
        return work(cfg, ctx, device)
    finally:
        release_held()
        distributed.teardown()


def run_cli(main: Callable[[], int | None]) -> None:
    """Call ``main`` and exit with its status; 2 for bad input, 3 for a run that diverged."""
    try:
        code = main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except FloatingPointError as error:  # a diverged run: not bad input, but no traceback either
        print(f"error: {error}", file=sys.stderr)
        code = 3
    sys.exit(code or 0)
