"""The one way every script ends: bad input is one 'error:' line and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from dataloaders.io import DataError
from .checkpoint import CheckpointError
from .config import ConfigError
from .files import WriteError

USER_ERRORS = (ConfigError, DataError, CheckpointError, WriteError)


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
