"""One run per output directory: an exclusive ``flock`` on ``DIR/.lock``, which names its holder.

The kernel releases a ``flock`` when its process dies (even by ``kill -9``), so a lock file left by a
dead run is never mistaken for a live one: the next run takes the lock, says whose it was, and
rewrites the file with its own pid, host and start time. A second run while the first lives gets
one line naming the first's pid. Training (``training/loop.py``) and ``eval vqa`` hold it for the
whole run; it is released when the process ends (or on :meth:`RunLock.release`)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """An output directory that cannot be used: another run holds it, or it cannot be written."""


def _holder(text: str) -> str:
    """How the lock file's holder is described in messages."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process" if not text.strip() else repr(text.strip()[:80])


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` created if needed and checked writable by writing a file there (root ignores mode bits
    only for some file systems, so ``os.access`` is not asked); one line naming it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to {path} ({err.strerror or err}): {what} must be a writable "
                          f"directory") from None
    return path


class RunLock:
    """The exclusive lock of one output directory (taken in ``__init__``)."""

    def __init__(self, directory: str | os.PathLike, what: str = "output directory"):
        self.path = writable_dir(directory, what) / LOCK_FILE
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = _holder(self.file.read())
            self.file.close()
            raise RunDirError(f"{directory} is in use by another run ({holder}; lock file {self.path}): wait for "
                              f"it to finish or choose another {what}") from None
        self.file.seek(0)
        previous = self.file.read()
        self.taken_over = _holder(previous) if previous.strip() else None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        self.file.flush()

    def message(self) -> str | None:
        """What to tell the user when the lock was left behind by a run that is gone."""
        if self.taken_over is None:
            return None
        return f"{self.path}: took over the lock of a run that is no longer running ({self.taken_over})"

    def release(self) -> None:
        if not self.file.closed:
            self.file.seek(0)
            self.file.truncate()  # an empty file: released cleanly (a crashed run leaves its record)
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
