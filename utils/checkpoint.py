"""Checkpoints: written atomically, read with a clear error when they are not what is expected.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors, dicts, lists and plain
values only, never arbitrary pickled objects. A downloaded ``.pth`` whose pickle would call a
function (``os.system``...) is refused before anything of it runs. What the project saves (state
dicts, configs, RNG states as tensors, histories of floats) is made of those types only.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree

from .errors import CheckpointError
from .files import atomic_write


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names functions or classes other than tensors and plain values."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename it over ``path`` (utils.files).

    A crash or a full disk while writing leaves the previous file intact: the rename is atomic on
    POSIX. torch.save reports a full disk as a RuntimeError ("unexpected pos"); it becomes one
    WriteError naming the file.
    """
    atomic_write(path, lambda f: torch.save(obj, f), catch=(OSError, RuntimeError))


def to_host(state: Any, device: torch.device) -> Any:
    """Nested dicts and lists of tensors on ``device``, copied to the CPU with one wait for the device: every
    copy is queued without waiting (into pinned memory), then the device is synchronised once. torch.save of
    GPU tensors copies and waits tensor by tensor (~850 waits for an MGCC checkpoint)."""
    if device.type == "cpu":
        return state
    moved = torch.utils._pytree.tree_map(
        lambda t: t.detach().to("cpu", non_blocking=True) if isinstance(t, torch.Tensor) and t.device.type != "cpu"
        else t, state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return moved


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


def require_fields(checkpoint: dict, path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> None:
    """Refuse a checkpoint that lacks a field or holds another type there (a crafted or foreign file):
    one CheckpointError naming the file and every such field, instead of a KeyError later."""
    def name(types):
        return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    problems = [f"{key} is missing" if key not in checkpoint else
                f"{key} is a {type(checkpoint[key]).__name__}, expected a {name(types)}"
                for key, types in fields.items()
                if key not in checkpoint or not isinstance(checkpoint[key], types)
                or (isinstance(checkpoint[key], bool) and bool not in (types if isinstance(types, tuple) else (types,)))]
    if problems:
        raise CheckpointError(f"{path} is not a complete checkpoint of this project: {'; '.join(problems)} "
                              "(a file written by another program, or edited?)")


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity in nested dicts/lists of tensors."""
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def check_finite(state: Any, path: str | Path, what: str = "weights") -> None:
    """Refuse weights holding NaN or infinity (a run that diverged, or a damaged file): predictions from
    them are empty masks or black images scored as if they meant something."""
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: its {what} hold NaN or infinite values in {len(bad)} tensor(s), e.g. "
                              f"{', '.join(bad[:3])}: the run that wrote it diverged or the file is damaged; use an "
                              "earlier checkpoint")


def weights_misfit(expected: dict, weights: dict) -> list[str]:
    """How ``weights`` (a state dict) fail to fit a network whose state dict is ``expected`` (e.g. built
    on the meta device): missing, unknown and resized tensors, as short descriptions; [] when they fit."""
    missing = [f"{k} missing" for k in expected if k not in weights]
    unknown = [f"{k} unknown" for k in weights if k not in expected]
    resized = [f"{k} is {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}" for k in expected
               if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != expected[k].shape]
    wrong_type = [f"{k} is not a tensor" for k in expected if k in weights and not isinstance(weights[k], torch.Tensor)]
    return missing + unknown + resized + wrong_type
