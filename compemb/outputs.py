"""The one rule every command that writes follows, checked before any work: an output replaces only what compemb
wrote as that kind of output, unless the user says ``--overwrite``; and even then never a link, a device, a FIFO,
the command's own input, or a file of a data set or run that is not the command's own.

How a file tells compemb wrote it: a model file carries compemb's header in its safetensors metadata, a PNG its
``Software`` text (``compemb ...``); files without a signature (scores, TSV, tables of text) are ours only with
``--overwrite``. A data set is a directory with ``manifest.json``; a run one with ``metrics.jsonl`` or
``checkpoints/``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

SOFTWARE = "compemb"  # the PNG text compemb's plots carry (savefig metadata "Software")
DATASET_MARK = "manifest.json"
RUN_FILES = ("metrics.jsonl", "config.toml", "train.log", ".lock")  # with checkpoints/*: a run's own files


class OutputError(ValueError):
    """An output compemb will not write: it would replace what compemb did not write; the message says why."""


def png_metadata() -> dict[str, str]:
    """The metadata every compemb PNG is saved with (``savefig(..., metadata=png_metadata())``): its signature."""
    return {"Software": SOFTWARE}


def _is_compemb_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return str(getattr(image, "text", {}).get("Software", "")).startswith(SOFTWARE)
    except Exception:
        return False


def _is_compemb_model(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:  # reads the header alone
            return "compemb" in (opened.metadata() or {})
    except Exception:
        return False


SIGNATURES = {"model": _is_compemb_model, "png": _is_compemb_png}


def what_it_is(path: Path) -> str | None:
    """``None`` for a regular file or nothing; else what ``path`` is (a symbolic link, a FIFO, a device, ...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def owner_directory(path: Path) -> tuple[str, Path] | None:
    """The compemb data set or run ``path`` lies in (``("data set", D)`` for any file under a data set; ``("run",
    R)`` for a run's own files: its checkpoints, metrics, config, log and lock), else None."""
    resolved = Path(os.path.abspath(path))
    for parent in resolved.parents:
        if (parent / DATASET_MARK).is_file():
            return "data set", parent
    parent = resolved.parent
    if parent.name == "checkpoints" and _is_run(parent.parent):
        return "run", parent.parent
    if resolved.name in RUN_FILES and _is_run(parent):
        return "run", parent
    return None


def _is_run(directory: Path) -> bool:
    return (
        (directory / "metrics.jsonl").is_file()
        or (directory / "config.toml").is_file()
        or (directory / "checkpoints").is_dir()
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_file(
    path: str | os.PathLike,
    kind: str,
    *,
    flag: str = "--out",
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    own: str | os.PathLike | None = None,
) -> None:
    """Refuse (OutputError, one line) an output file ``path`` of ``kind`` (``"model"``, ``"png"``, or a kind without
    a signature: ``"scores"``, ``"tsv"``, ``"text"``) that would replace a link, device, FIFO or directory, one of
    the command's ``inputs`` (``(flag, path)`` pairs), a file of a data set or run other than ``own``, or an
    existing file compemb did not write as a ``kind`` (allowed with ``overwrite``)."""
    path = Path(path)
    where = f"{flag} {path}"
    other = what_it_is(path)
    if other is not None:
        raise OutputError(f"{where} is {other}: compemb replaces only regular files it wrote; give a file's path")
    for input_flag, input_path in inputs:
        if _same_file(path, Path(input_path)):
            raise OutputError(f"{where} is also this command's input ({input_flag}): it would be lost; write elsewhere")
    owner = owner_directory(path)
    if owner is not None and (own is None or not _same_file(owner[1], Path(own))):
        raise OutputError(
            f"{where} is inside the compemb {owner[0]} {owner[1]}: it would change what that "
            f"{owner[0]} holds; write elsewhere"
        )
    if path.exists() and not overwrite and not SIGNATURES.get(kind, lambda _: False)(path):
        what = f"a {kind} file compemb wrote" if kind in SIGNATURES else "compemb's to replace"
        raise OutputError(f"{where} exists and is not {what}: --overwrite replaces it, or give another path")


def check_output_directory(
    path: str | os.PathLike, *, flag: str = "--out", inputs: Iterable[tuple[str, str | os.PathLike]] = ()
) -> None:
    """Refuse (OutputError) an output directory that is a link (dangling or not) or not a directory, is one of the
    command's inputs or lies inside one, or lies inside another data set or run; what it already holds is the
    writer's to check (its own kind of output, ``--overwrite``)."""
    path = Path(path)
    where = f"{flag} {path}"
    other = what_it_is(path)
    # a link to a directory is written through (into it, nothing replaced); a dangling one would fail after the work
    if other is not None and other != "a directory" and not (path.is_symlink() and path.is_dir()):
        target = " whose target does not exist" if path.is_symlink() and not path.exists() else ""
        raise OutputError(f"{where} is {other}{target}: give a directory's path")
    if other is None and path.exists():
        raise OutputError(f"{where} is a file, not a directory")
    resolved = Path(os.path.abspath(path))
    for input_flag, input_path in inputs:
        given = Path(os.path.abspath(input_path))
        if _same_file(resolved, given) or given in resolved.parents:
            raise OutputError(
                f"{where} is inside this command's input ({input_flag} {input_path}): its files would "
                f"mix with the input's; write elsewhere"
            )
    for parent in resolved.parents:
        if (parent / DATASET_MARK).is_file():
            raise OutputError(f"{where} is inside the compemb data set {parent}: write elsewhere")
        if _is_run(parent):
            raise OutputError(f"{where} is inside the compemb run {parent}: write elsewhere")
