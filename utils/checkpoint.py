"""Checkpoints: written atomically, read with a clear error when they are not what is expected.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors, dicts, lists and plain
values only, never arbitrary pickled objects. A downloaded ``.pth`` whose pickle would call a
function (``os.system``...) is refused before anything of it runs. What the project saves (state
dicts, configs, RNG states as tensors, histories of floats) is made of those types only.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or written by another script or architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names functions or classes other than tensors and plain values."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename it over ``path``.

    A crash while writing leaves the previous file intact: the rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, kind: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save`; check its ``kind`` field when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        text = str(error)
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
            found = re.search(r"GLOBAL\s+([\w.]+)", text)
            if found:
                raise UnsafeCheckpointError(
                    f"refused to load {path}: its pickle names {found[1]}, which loading would call (a "
                    "checkpoint file can run code this way); nothing of it was run. Checkpoints written by this "
                    "project and official MGCC state_dicts hold tensors and plain values only") from None
            # torch's long advice (to load with weights_only=False) is the one thing not to do here
            text = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {text} "
                              "(truncated or not a PyTorch file?)") from None
    if kind is not None:
        found = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
        if found != kind:
            raise CheckpointError(f"{path} is not a {kind} checkpoint (found kind={found!r})")
    return checkpoint
