"""A run directory belongs to one training process at a time: an exclusive ``flock`` on ``RUN/.lock``.

The lock is the kernel's (``fcntl.flock`` on an open file): it is released when the process ends, however it ends
(a kill -9 included), so a crashed run never leaves its directory locked; the file itself stays, holding the pid of
the last holder for the message a second trainer gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another process is training into this run directory."""


class RunLock:
    """The exclusive lock of one run directory, taken with :meth:`acquire` and given back with :meth:`release`.

    Example::

        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> first, second = RunLock(run), RunLock(run)
        >>> first.acquire()
        >>> try:
        ...     second.acquire()
        ... except RunLockedError as error:
        ...     print("refused")
        refused
        >>> first.release(); second.acquire(); second.release()
    """

    def __init__(self, run: str | os.PathLike) -> None:
        self.run = Path(run)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock at once, or raise RunLockedError naming the process that holds it."""
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLockedError(
                f"{self.run} is being trained by another process (pid {holder}): wait for it to end, "
                f"or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
