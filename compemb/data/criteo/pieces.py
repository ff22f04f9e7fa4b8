"""Criteo files read in pieces by worker processes: a plain file's byte ranges, what the count pass and the write
pass do with one piece, and the process pool that runs them (results in piece order, whatever the processes)."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compemb.data.criteo.rows import MISSING, NUM_SPARSE, Rejections, is_gzip, read_rows
from compemb.data.criteo.transforms import ValueCounts, transform_dense

PIECE_BYTES = 64 << 20  # a plain file is read by several processes in ranges of about this size


@dataclass(frozen=True)
class Piece:
    """A range of one input file that one process reads: the lines whose first byte is in ``[start, end)``."""

    path: Path
    has_label: bool
    start: int = 0
    end: int | None = None  # None: to the end (gzip files are one piece: they cannot be entered midway)


def split_pieces(path: Path, has_label: bool, piece_bytes: int) -> list[Piece]:
    """A plain file in ranges of about ``piece_bytes``; a gzip (or empty) file whole."""
    size = path.stat().st_size
    count = 1 if size == 0 or is_gzip(path) else max(1, -(-size // piece_bytes))
    if count == 1:
        return [Piece(path, has_label)]
    bounds = [size * k // count for k in range(count + 1)]
    return [Piece(path, has_label, bounds[k], bounds[k + 1]) for k in range(count)]


@dataclass
class PieceCount:
    """What the count pass learned from one piece: its lines, good rows, rejections and (to categorify) values."""

    lines: int
    kept: int
    rejections: Rejections
    values: list[tuple[np.ndarray, np.ndarray]]  # per feature: distinct values and their counts


def count_piece(piece: Piece, count_values: bool, strict: bool) -> PieceCount:
    """The count pass over one piece: its lines, good rows, rejections and (``count_values``) every feature's
    values with their counts."""
    rejections, counts = Rejections(), [ValueCounts() for _ in range(NUM_SPARSE)]
    lines = kept = 0
    for block in read_rows(piece.path, piece.has_label, rejections, strict, start=piece.start, end=piece.end):
        lines += len(block.status)
        kept += len(block.labels)
        if count_values:
            for column in range(NUM_SPARSE):
                counts[column].add(block.sparse[:, column])
    return PieceCount(lines, kept, rejections, [c.result() for c in counts] if count_values else [])


# the write pass's shared settings, set before the worker processes fork (they inherit it: no pickling of the
# vocabulary, which is large for Terabyte)
_WRITE: dict = {}


@contextlib.contextmanager
def write_settings(**settings: Any) -> Iterator[None]:
    """Set the write pass's shared settings (``categorify``, ``hash_mod``, ``directory``, ``rows``,
    ``cardinalities``) for :func:`write_piece` while the block runs; they are cleared after it, whatever happens."""
    _WRITE.update(settings)
    try:
        yield
    finally:
        _WRITE.clear()


def write_piece(piece: Piece, split_starts: dict[str, int], position: int) -> int:
    """Transform one piece's good rows and write them at row ``position`` of the splits (in their order)."""
    categorify, hash_mod, directory, rows = (
        _WRITE["categorify"],
        _WRITE["hash_mod"],
        _WRITE["directory"],
        _WRITE["rows"],
    )
    arrays: dict[str, dict[str, np.memmap]] = {}
    written = 0
    for block in read_rows(piece.path, piece.has_label, Rejections(), strict=False, start=piece.start, end=piece.end):
        raw = block.sparse
        ids = categorify(raw) if hash_mod is None else np.where(raw == MISSING, hash_mod, raw % hash_mod)
        dense, labels = transform_dense(block.dense), block.labels if piece.has_label else None
        if ids.size and (ids.min() < 0 or (ids >= _WRITE["cardinalities"]).any()):
            raise ValueError(f"{piece.path}: an id is outside its feature's cardinality {_WRITE['cardinalities']}")
        done = 0
        for split, first in split_starts.items():  # the block's rows that fall in each split
            low, high = max(position, first), min(position + len(ids), first + rows[split])
            if low >= high:
                continue
            if split not in arrays:
                arrays[split] = {
                    name: np.load(directory / split / f"{name}.npy", mmap_mode="r+")
                    for name in ("dense", "sparse", "labels")
                    if (directory / split / f"{name}.npy").exists()
                }
            part, at = slice(low - position, high - position), slice(low - first, high - first)
            arrays[split]["dense"][at] = dense[part]
            arrays[split]["sparse"][at] = ids[part]
            if labels is not None:
                arrays[split]["labels"][at] = labels[part]
            done += high - low
        if done != len(ids):
            raise ValueError(f"{piece.path}: {len(ids) - done} rows fall outside the splits {rows}")
        position += len(ids)
        written += len(ids)
    for split_arrays in arrays.values():
        for array in split_arrays.values():
            array.flush()
    return written


def _die_with_parent(parent: int) -> None:
    """In a pool worker: be killed when the process that started it dies (Linux's PR_SET_PDEATHSIG), so a killed
    preprocess leaves no worker writing on; elsewhere workers end when they next find the parent gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above: the signal will never come
        os._exit(1)


def run_in_processes(
    function: Callable[..., Any], tasks: list[tuple], processes: int, bar: tqdm, advance: Callable[[Any], int]
) -> list:
    """``function(*task)`` for every task, in ``processes`` forked processes (here when 1); results in task order."""
    if processes <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(function(*task))
            bar.update(advance(results[-1]))
        return results
    # an executor, not multiprocessing.Pool: a Pool replaces a worker that died and waits forever for its task;
    # the executor breaks, and the parent says so
    with concurrent.futures.ProcessPoolExecutor(
        min(processes, len(tasks)), multiprocessing.get_context("fork"), _die_with_parent, (os.getpid(),)
    ) as pool:
        pending = [pool.submit(function, *task) for task in tasks]
        results = []
        try:
            for job in pending:  # in order: the first error is the earliest piece's
                results.append(job.result())
                bar.update(advance(results[-1]))
        except concurrent.futures.process.BrokenProcessPool:
            for job in pending:
                job.cancel()
            raise OSError(
                "a preprocessing worker process died (killed, or out of memory): nothing was "
                "published; run it again, with fewer --processes if memory is short"
            ) from None
        return results
