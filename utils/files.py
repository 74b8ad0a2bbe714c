"""Writing files so that nothing is lost or half-written, and a failed write is one clear error.

Every output goes to a temporary file beside its destination, is flushed to the disk (fsync), its
size checked, then renamed over the destination (atomic on POSIX): a full disk or a crash leaves the
previous file intact and no 0-byte or truncated file under the final name. The rename replaces a
symbolic link at the destination by the new file; it never writes through the link to its target.
OpenCV's ``imwrite`` reports success for files it could not write on a full disk; images are
therefore encoded in memory and written here.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import WriteError


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{error.strerror}: the folder is read-only or not yours"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def write_error(path: Path, error: BaseException) -> WriteError:
    return WriteError(f"could not write {path}: {_reason(error)} (is the disk full or read-only?); "
                      f"the previous {path.name}, if there was one, is untouched")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object],
                 catch: tuple[type[BaseException], ...] = (OSError,), expected: bytes | None = None) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename it over ``path``.

    ``catch``: the exceptions of ``write`` that mean the file could not be written (torch.save raises
    RuntimeError on a full disk); they become one :class:`WriteError` naming ``path``. With
    ``expected`` the temporary file is read back and compared with it before the rename.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            written, size = f.tell(), os.fstat(f.fileno()).st_size
        if size != written:
            raise OSError(errno.EIO, f"{size} bytes on the disk of the {written} written")
        if expected is not None and Path(tmp).read_bytes() != expected:
            raise OSError(errno.EIO, "the file read back differs from what was written")
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, (OSError, *catch)) and not isinstance(error, WriteError):
            raise write_error(path, error) from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes, verify: bool = False) -> None:
    """Write ``data`` atomically; with ``verify`` the file is read back and compared before the rename."""
    atomic_write(path, lambda f: f.write(data), expected=data if verify else None)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(folder: str | Path, what: str = "--out-dir") -> None:
    """Before any work: ``folder``, or the nearest existing folder it would be made in, is a folder this
    process can write in. (A read-only file system used to fail a run only after its data checks.)"""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise WriteError(f"{what} {folder}: {probe} is a file, not a folder; choose another {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {folder}: cannot write in {probe} (a read-only file system, or not yours); "
                         f"choose another {what}")
