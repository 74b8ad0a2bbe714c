"""One writer per run or sample folder.

Two train.py runs started with one --out-dir interleaved their metrics and mixed their checkpoints;
two sample_ldm.py runs into one folder replaced each other's images. A writer now holds
``<folder>/.writer.lock`` for its whole life: an exclusive ``fcntl.flock`` on an open descriptor of
that file. It lies in the folder, never beside it (a writable folder under a read-only parent, such
as a container's bind mount, was refused). The folders the lock had to create are removed again at
its release when they are still empty, so a run refused by its checks (or a --resume of a mistyped
folder) leaves no folder behind. A writer that replaces its folder as a whole (sample_ldm.py) links
the lock file into the new folder before the swap (:func:`carry_into`). The kernel releases such a lock when the descriptor is closed, however the process ends
(an exception, ``kill -9``, a power cut of a network file system's client aside), so a crashed or
killed writer never leaves the folder locked and there is no stale-lock clean-up to get wrong. The file
holds the holder's pid, host, start time and command, for the message the second writer gets.
A writer that ends normally removes the file (while still holding the lock); one that was killed
leaves it unlocked, and the next writer takes it over. A taker checks after locking that the file it
locked is still the one at the path (else it was removed meanwhile and it tries again), so two writers
never hold two different files.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError

_HELD: dict[Path, "FolderLock"] = {}  # the locks this process holds through hold(), by folder
LOCK_NAME = ".writer.lock"  # in the folder it locks; what "the folder holds files" checks leave out


class FolderInUseError(ConfigError):
    """Another live process writes the folder; the message names it."""


class FolderLock:
    """``with FolderLock(folder, "run folder"):`` or ``lock = FolderLock(...).acquire()`` held until
    :meth:`release` or the process's end."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders acquire created, outermost first

    def acquire(self) -> "FolderLock":
        from .files import write_error

        while True:
            try:
                self._made += _make_folder(self.folder)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise write_error(self.path, error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held by a live process
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_made()
                raise FolderInUseError(
                    f"{self.what} {self.folder} is being written by another process ({holder}): one writer per "
                    "folder. Wait for it to finish, stop it, or choose another --out-dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "command": sys.argv}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: a taker that opened it sees it gone
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
            self._remove_made()

    def _remove_made(self) -> None:
        """Remove the folders acquire created that are still empty (a run refused before writing anything)."""
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote there), or gone
                break
        self._made = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def holds_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds anything but a writer's lock file."""
    return any(p.name != LOCK_NAME for p in Path(folder).iterdir())


def carry_into(folder: str | Path, replacement: str | Path) -> None:
    """Link the lock this process holds on ``folder`` into ``replacement``, the folder about to be renamed
    to ``folder`` (the same file under both names, so the folder is never unlocked while it is swapped)."""
    lock = _HELD.get(Path(folder).absolute())
    if lock is not None and lock._fd is not None:
        os.link(lock.path, Path(replacement) / LOCK_NAME)


def hold(folder: str | Path, what: str = "folder") -> FolderLock:
    """Lock ``folder`` until :func:`release_held` (or this process's end): a script's main calls it in
    its ``finally``, so that a second run in the same process (the tests) can take the folder again."""
    key = Path(folder).absolute()
    if key not in _HELD:
        _HELD[key] = FolderLock(folder, what).acquire()
    return _HELD[key]


def release_held() -> None:
    """Release every lock this process took through :func:`hold` (a script's main, in its ``finally``)."""
    while _HELD:
        _HELD.popitem()[1].release()


@contextmanager
def exclusive(path: str | Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block, waiting for
    another holder to leave it: a short critical section among processes, such as one read-change-write
    of a shared file (the stage ledger that stages running side by side all update). The file stays; it
    holds nothing."""
    from .files import write_error

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        command = " ".join(Path(info["command"][0]).name if i == 0 else a for i, a in enumerate(info["command"]))
        return f"pid {info['pid']} on {info['host']}, since {info['started']}: {command}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "its details are not written yet"
