"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from compemb.outputs import OutputError, what_it_is


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that takes a name (safetensors' ``save_file``, which
    writes tensors from their memory without a copy); it replaces ``path`` only when the block completes.

    On success the file is flushed to disk and renamed over ``path``; on error it is removed. A ``path`` that is
    a symbolic link, device, FIFO or directory is refused (OutputError) before anything is written: the rename
    would replace the link or node itself.
    """
    path = Path(path)
    other = what_it_is(path)
    if other is not None:
        raise OutputError(f"{path} is {other}: compemb replaces only regular files it wrote")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
    try:
        os.close(handle)
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            # mkstemp makes the file 0600 (and a writer may make it anew): a result file gets the mode any new
            # file gets (0644 under the usual umask)
            os.fchmod(written.fileno(), 0o666 & ~_umask())
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_binary_writer(path: str | os.PathLike, gzipped: bool = False) -> Iterator[BinaryIO]:
    """A file to stream bytes into (gzip-compressed when ``gzipped``); it replaces ``path`` only when complete
    (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        with os.fdopen(os.open(temporary, os.O_WRONLY), "wb") as file:
            if gzipped:
                with gzip.GzipFile(fileobj=file, mode="wb") as compressed:
                    yield compressed  # type: ignore[misc]
            else:
                yield file


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name prefix of this process's temporaries for ``path`` (beside it): ``.NAME.PID@HOST.``, so that a later
    run on the same host can tell whose they are (:func:`remove_dead_temporaries`)."""
    return f".{Path(path).name}.{os.getpid()}@{_host()}."


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or directories ``.NAME.PID@HOST.*`` beside ``path``) whose writing process,
    on this host, is gone: a killed or crashed writer's leftovers, which no one else would remove. A temporary of a
    live process, of another host, or whose name shows no process is left alone. Returns what was removed."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid, _, host = entry.name[len(prefix) :].split(".", 1)[0].partition("@")
            if host != _host() or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): no moment at which
    either name is missing. False where the platform or filesystem cannot (the caller renames in two steps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def sha256_of_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read in chunks (bounded memory for a file of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_binary_writer(path) as file:
        file.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
