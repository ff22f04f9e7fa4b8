"""Criteo click logs (Kaggle ``train.txt`` / ``test.txt``, Terabyte ``day_N``) to the preprocessed format.

A row is a label, 13 integer features and 26 categorical features written as hex, tab-separated; empty
fields are missing (``test.txt`` has no label). Dense values: missing -> 0, negative -> 0, then
log(x + 1). Categorical values: hex -> 32-bit integer, then either categorified (a first pass counts every
value; values seen fewer than ``min_count`` times share one id per feature, missing gets its own id) or
taken ``mod hash_mod`` (DLRM's max-ind-range; missing gets id ``hash_mod``). A categorified data set keeps its
vocabulary (each feature's kept values) in ``vocabulary.safetensors``, so an exported model maps raw rows as
preprocessing did.

Bad rows (wrong column count, a label other than 0/1, a non-integer dense value, a non-hex or >32-bit
categorical value) are rejected and counted by reason with their first 100 line numbers, never fixed;
``strict`` stops at the first. Rows read = rows kept + rows rejected, always. Splits follow DLRM's Kaggle
rule: seven equal chunks in order, chunks 0-5 train, chunk 6 halved into test then val. Files are streamed
in chunks (never whole in memory), plain or gzip.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import ctypes.util
import gzip
import multiprocessing
import os
import re
import signal
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numba
import numpy as np
from safetensors.numpy import save as save_arrays
from tqdm import tqdm

from compemb.data.dataset import VOCABULARY_FILE, DatasetWriter, check_output
from compemb.io import atomic_write_bytes
from compemb.progress import bar_disabled

NUM_DENSE, NUM_SPARSE = 13, 26
MISSING = -1  # a missing categorical value before its id is assigned
MAX_LINE_BYTES = 1 << 20  # Criteo and Avazu lines are under 1 KB: a longer one is not a row of theirs
REASONS = ("columns", "label", "dense", "categorical")
KEPT_LINE_NUMBERS = 100
MISSING_ID, RARE_ID = 0, 1  # categorify: the ids every feature reserves


class RowError(ValueError):
    """A bad row: ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Rejections:
    """Rejected rows: a count per reason and the first line numbers of each."""

    counts: Counter = field(default_factory=Counter)
    lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, line_number: int) -> None:
        """Count one rejected row."""
        self.counts[reason] += 1
        first = self.lines.setdefault(reason, [])
        if len(first) < KEPT_LINE_NUMBERS:
            first.append(line_number)

    @property
    def total(self) -> int:
        """All rejected rows."""
        return sum(self.counts.values())


_DENSE_PATTERN = re.compile(r"-?[0-9]{1,18}")  # int64-safe; "+5", " 5" or "1_0" are not Criteo integers
_HEX_PATTERN = re.compile(r"[0-9a-fA-F]{1,8}")  # at most 32 bits


def parse_row(line: str, has_label: bool = True) -> tuple[int, list[int], list[int]]:
    """One TSV line -> (label, 13 raw dense ints (missing = 0), 26 categorical ints (missing = -1)).

    This is the readable definition of a good row; :func:`read_rows` parses blocks of bytes with a compiled
    kernel that the tests check against it.

    Raises:
        RowError: the row is bad; its ``reason`` says how.
    """
    fields = line.rstrip("\n").removesuffix("\r").split("\t")
    expected = NUM_DENSE + NUM_SPARSE + (1 if has_label else 0)
    if len(fields) != expected:
        raise RowError("columns", f"{len(fields)} columns, expected {expected}")
    label = 0
    if has_label:
        if fields[0] not in ("0", "1"):
            raise RowError("label", f"label {fields[0]!r} is not 0 or 1")
        label = int(fields[0])
        fields = fields[1:]
    dense = []
    for text in fields[:NUM_DENSE]:
        if text and not _DENSE_PATTERN.fullmatch(text):
            raise RowError("dense", f"dense value {text!r} is not an integer of at most 18 digits")
        dense.append(int(text) if text else 0)
    sparse = []
    for text in fields[NUM_DENSE:]:
        if text and not _HEX_PATTERN.fullmatch(text):
            raise RowError("categorical", f"categorical value {text!r} is not a hex number of at most 32 bits")
        sparse.append(int(text, 16) if text else MISSING)
    return label, dense, sparse


# status codes of the compiled parser: 0 good, then 1 + the index of the reason in REASONS
_GOOD = 0


@numba.njit(cache=True, nogil=True)
def _hex_digit(byte: int) -> int:
    if 48 <= byte <= 57:
        return byte - 48
    if 97 <= byte <= 102:
        return byte - 87
    if 65 <= byte <= 70:
        return byte - 55
    return -1


@numba.njit(cache=True, nogil=True)
def _parse_lines(buffer, has_label, labels, dense, sparse, status):  # pragma: no cover - compiled
    """Parse every newline-terminated line of ``buffer`` (uint8) into the output arrays; return the line count."""
    expected_tabs = NUM_DENSE + NUM_SPARSE - 1 + (1 if has_label else 0)
    size = buffer.shape[0]
    line = 0
    position = 0
    while position < size:
        end = position
        tabs = 0
        while buffer[end] != 10:
            if buffer[end] == 9:
                tabs += 1
            end += 1
        stop = end - 1 if end > position and buffer[end - 1] == 13 else end
        code = _GOOD
        if tabs != expected_tabs:
            code = 1
        field = 0 if has_label else 1  # field 0 is the label
        cursor = position
        while code == _GOOD and field <= NUM_DENSE + NUM_SPARSE:
            field_end = cursor
            while field_end < stop and buffer[field_end] != 9:
                field_end += 1
            length = field_end - cursor
            if field == 0:
                if length != 1 or (buffer[cursor] != 48 and buffer[cursor] != 49):
                    code = 2
                else:
                    labels[line] = buffer[cursor] - 48
            elif field <= NUM_DENSE:
                value = 0
                if length > 0:
                    negative = buffer[cursor] == 45
                    digits = length - 1 if negative else length
                    if digits < 1 or digits > 18:
                        code = 3
                    else:
                        for index in range(cursor + (1 if negative else 0), field_end):
                            digit = buffer[index] - 48
                            if digit < 0 or digit > 9:
                                code = 3
                                break
                            value = value * 10 + digit
                        if negative:
                            value = -value
                dense[line, field - 1] = value
            else:
                value = -1  # MISSING
                if length > 0:
                    if length > 8:
                        code = 4
                    else:
                        value = 0
                        for index in range(cursor, field_end):
                            digit = _hex_digit(buffer[index])
                            if digit < 0:
                                code = 4
                                break
                            value = value * 16 + digit
                sparse[line, field - 1 - NUM_DENSE] = value
            field += 1
            cursor = field_end + 1
        status[line] = code
        line += 1
        position = end + 1
    return line


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> BinaryIO:
    """A Criteo text file (plain or gzip, told by its first bytes) opened for reading bytes."""
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


@dataclass
class Block:
    """Parsed rows of one block of a file: every line's status, and the good rows' values."""

    first_line: int  # the file line number of the block's first line
    status: np.ndarray  # uint8 per line: 0 good, else 1 + the index of the reason in REASONS
    labels: np.ndarray  # uint8, good rows only
    dense: np.ndarray  # int64 (good rows, 13), raw
    sparse: np.ndarray  # int64 (good rows, 26), raw 32-bit values, -1 missing


def read_line(file: BinaryIO, max_line_bytes: int, where: object) -> bytes:
    """The next line of a binary file, its newline kept (b"" at the end); ValueError naming ``where`` (a path, or
    ``path:line``) where it is longer than ``max_line_bytes``: a file without newlines is refused, not read whole."""
    try:
        line = file.readline(max_line_bytes + 1)
    except (EOFError, zlib.error) as error:  # a gzip stream cut short or garbled (neither is an OSError)
        raise ValueError(f"{where}: not a whole gzip stream ({type(error).__name__}: {error})") from None
    if len(line) > max_line_bytes and not line.endswith(b"\n"):
        raise ValueError(
            f"{where}: a line longer than {max_line_bytes:,} bytes: not a row of this format (is this the right file?)"
        )
    return line


def read_rows(
    path: str | os.PathLike,
    has_label: bool,
    rejections: Rejections,
    strict: bool,
    block_bytes: int = 1 << 25,
    start: int = 0,
    end: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Block]:
    """Stream a Criteo TSV file (plain or gzip) in blocks of about ``block_bytes``; parse each with compiled code.

    Bad rows go to ``rejections`` (or raise with their line number when ``strict``). An empty or truncated
    (gzip) input raises ValueError. ``start``/``end`` (plain files): only the lines whose first byte lies in
    ``[start, end)``, numbered from 1 at the first of them, so byte ranges that tile a file read each line once.
    A line longer than ``max_line_bytes`` raises ValueError naming it: memory stays within a block and a line
    whatever the input (``/dev/zero`` has no newline at all).
    """
    path = Path(path)
    carry, line_number, read_any = b"", 0, False
    with open_binary(path) as file:
        if start > 0:  # the line holding byte start - 1 belongs to the range before
            file.seek(start - 1)
            read_line(file, max_line_bytes, path)
        position = file.tell()
        while True:
            try:
                size = block_bytes if end is None else min(block_bytes, end - position)
                data = file.read(size) if size > 0 else b""
                position += len(data)
                if end is not None and data and position >= end and not data.endswith(b"\n"):
                    data += read_line(file, max_line_bytes, path)  # the range's last line: still this range's
            except EOFError:
                raise ValueError(f"{path} is truncated: the gzip stream ends after line {line_number}") from None
            except zlib.error as error:
                raise ValueError(f"{path}: its gzip stream is damaged after line {line_number} ({error})") from None
            if not data:  # end of file: a last line without its newline still counts
                if carry:
                    yield _parse_block(path, carry + b"\n", has_label, line_number, rejections, strict)
                break
            read_any = True
            data = carry + data
            cut = data.rfind(b"\n") + 1
            carry, data = data[cut:], data[:cut]
            if len(carry) > max_line_bytes:
                number = line_number + data.count(b"\n") + 1
                raise ValueError(
                    f"{path}:{number}: a line longer than {max_line_bytes:,} bytes: not a row of this "
                    f"format (is this the right file?)"
                )
            if data:
                block = _parse_block(path, data, has_label, line_number, rejections, strict)
                line_number += len(block.status)
                yield block
    if not read_any and start == 0:
        raise ValueError(f"{path} is empty")


def _parse_block(path: Path, data: bytes, has_label: bool, first: int, rejections: Rejections, strict: bool) -> Block:
    lines = data.count(b"\n")
    buffer = np.frombuffer(data, dtype=np.uint8)
    labels = np.zeros(lines, np.uint8)
    dense = np.empty((lines, NUM_DENSE), np.int64)
    sparse = np.empty((lines, NUM_SPARSE), np.int64)
    status = np.empty(lines, np.uint8)
    parsed = _parse_lines(buffer, has_label, labels, dense, sparse, status)
    assert parsed == lines, (parsed, lines)
    bad = np.flatnonzero(status)
    if len(bad):
        if strict:
            line = data.split(b"\n")[bad[0]].decode("utf-8", errors="replace")
            try:
                parse_row(line, has_label)
                detail = "rejected by the compiled parser"  # the tests keep the two definitions equal
            except RowError as error:
                detail = str(error)
            reason = REASONS[status[bad[0]] - 1]
            raise ValueError(f"{path}:{first + bad[0] + 1}: bad row ({reason}): {detail}")
        for index in bad:
            rejections.add(REASONS[status[index] - 1], first + int(index) + 1)
        good = status == _GOOD
        labels, dense, sparse = labels[good], dense[good], sparse[good]
    return Block(first + 1, status, labels, dense, sparse)


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Criteo's dense transform: negatives -> 0, then log(x + 1), as float32."""
    return np.log1p(np.maximum(raw, 0)).astype(np.float32)


class ValueCounts:
    """Occurrences of every value of one feature, counted chunk by chunk with sorts (no Python dict per value)."""

    def __init__(self) -> None:
        self.values = np.empty(0, np.int64)
        self.counts = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, column: np.ndarray) -> None:
        """Count one chunk of values."""
        values, counts = np.unique(column, return_counts=True)
        self._pending.append((values, counts))
        self._pending_size += len(values)
        if self._pending_size > max(len(self.values), 1 << 20):  # merge rarely: amortised O(n log n)
            self._merge()

    def add_counted(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add distinct values already counted elsewhere (another process's :meth:`result`)."""
        self._pending.append((values, counts))
        self._pending_size += len(values)
        if self._pending_size > max(len(self.values), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self.values, *(v for v, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.values, inverse = np.unique(values, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.values)).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct values and their counts."""
        self._merge()
        return self.values, self.counts


VOCABULARY = VOCABULARY_FILE  # a categorified data set's kept values, one sorted int64 array per feature


class Categorifier:
    """Maps each feature's raw values to ids: 0 missing, 1 rare (seen < min_count), then kept values in order."""

    def __init__(self, counts: list[ValueCounts], min_count: int) -> None:
        self.kept = []
        for feature in counts:
            values, value_counts = feature.result()
            self.kept.append(values[(value_counts >= min_count) & (values != MISSING)])

    @classmethod
    def from_kept(cls, kept: Sequence[np.ndarray]) -> Categorifier:
        """The categorifier of a saved vocabulary: each feature's kept values, sorted."""
        categorifier = cls([], 0)
        categorifier.kept = [np.asarray(values, dtype=np.int64) for values in kept]
        return categorifier

    def save(self, path: str | os.PathLike) -> None:
        """Write the kept values (``C1`` ... ``C26``, int64) as safetensors, so ids can be mapped again later."""
        atomic_write_bytes(path, save_arrays({f"C{i + 1}": kept for i, kept in enumerate(self.kept)}))

    @property
    def cardinalities(self) -> list[int]:
        """Ids per feature, the two reserved ones included."""
        return [len(kept) + 2 for kept in self.kept]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Raw values ``(n, 26)`` -> ids ``(n, 26)``."""
        ids = np.empty_like(raw)
        for column, kept in enumerate(self.kept):
            values = raw[:, column]
            position = np.searchsorted(kept, values).clip(max=max(len(kept) - 1, 0))
            found = kept[position] == values if len(kept) else np.zeros(len(values), bool)
            ids[:, column] = np.where(found, position + 2, np.where(values == MISSING, MISSING_ID, RARE_ID))
        return ids


def kaggle_split_rows(total: int) -> dict[str, int]:
    """DLRM's Kaggle split of ``total`` rows: 6/7 train, then the last seventh halved into test and val."""
    train = total * 6 // 7
    rest = total - train
    return {"train": train, "test": rest // 2, "val": rest - rest // 2}


def terabyte_split_rows(day_rows: list[int]) -> dict[str, int]:
    """The Terabyte split of days in order: every day but the last is train; the last is halved, test then val."""
    last = day_rows[-1]
    return {"train": sum(day_rows[:-1]), "test": last // 2, "val": last - last // 2}


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
    count = 1 if size == 0 or _is_gzip(path) else max(1, -(-size // piece_bytes))
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


def _count_piece(piece: Piece, count_values: bool, strict: bool) -> PieceCount:
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


def _write_piece(piece: Piece, split_starts: dict[str, int], position: int) -> int:
    """Transform one piece's good rows and write them at row ``position`` of the splits (in their order)."""
    categorify, hash_mod, directory, rows = (
        _WRITE["categorify"],
        _WRITE["hash_mod"],
        _WRITE["directory"],
        _WRITE["rows"],
    )
    arrays: dict[str, dict[str, np.ndarray]] = {}
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


def _run(function, tasks: list[tuple], processes: int, bar: tqdm, advance) -> list:
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


def preprocess_criteo(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    min_count: int = 3,
    hash_mod: int | None = None,
    strict: bool = False,
    unlabeled: str | os.PathLike | None = None,
    progress: bool = True,
    processes: int | None = None,
    piece_bytes: int = PIECE_BYTES,
    *,
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    days: bool = False,
    overwrite: bool = False,
) -> dict:
    """Preprocess Criteo TSV into ``out``; return the manifest facts.

    Args:
        source: Kaggle ``train.txt``, or the Terabyte days in order (``day_0`` ... ``day_23``, plain or gzip).
            One file is split as DLRM splits Kaggle (seven chunks: 0-5 train, 6 halved into test then val);
            with ``days=True`` the files are Terabyte days (all but the last day train, the last day halved into
            test then val); with ``val`` and ``test`` every file is training data.
        val, test: the user's own validation and test files (both or neither): written as they are, their ids
            mapped with the vocabulary counted over the training files alone.
        days: the files are Terabyte days (several files need it, or ``val``/``test``: never guessed).
        min_count: values seen fewer times (over every input, as DLRM counts) share the rare id.
        hash_mod: take values mod this instead of categorifying (missing gets id ``hash_mod``).
        strict: stop at the first bad row, naming its file and line (read in one process, in order).
        unlabeled: Kaggle's ``test.txt`` (no label column): written as the split ``unlabeled`` with no labels,
            its ids mapped with the vocabulary of ``source`` (its values are not counted).
        processes: worker processes for both passes (default: the machine's cores, at most 8). Plain files are
            read in byte ranges of about ``piece_bytes``, gzip files one per process; the count pass merges the
            processes' sorted counts, the write pass writes each range's rows at their place. The result is the
            same for any number of processes.
    """
    if hash_mod is not None and not 1 <= hash_mod < 1 << 62:  # ids are int64, and missing takes hash_mod itself
        raise ValueError(f"hash_mod must be in [1, 2^62), got {hash_mod}")
    sources = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    if not sources:
        raise ValueError("no input files")
    if (val is None) != (test is None):
        raise ValueError("give both --val and --test (the user's own splits), or neither")
    own_splits = val is not None
    if own_splits and days:
        raise ValueError("--days splits the last day into test and val: not with --val/--test")
    if len(sources) > 1 and not (days or own_splits):
        raise ValueError(
            f"{len(sources)} input files: give --days (Terabyte days in order: the last day halved into "
            f"test and val) or --val FILE --test FILE (every input is training data)"
        )
    held_out = [(Path(val), True), (Path(test), True)] if own_splits else []  # type: ignore[arg-type]
    processes = min(os.cpu_count() or 1, 8) if processes is None else processes
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if strict:  # the first bad row by file order and its line number need one reader in order
        processes = 1
    inputs = (
        [(path, True) for path in sources] + held_out + ([(Path(unlabeled), False)] if unlabeled is not None else [])
    )
    if len({path.resolve() for path, _ in inputs}) != len(inputs):
        raise ValueError("an input file is given twice (train, --val, --test and --unlabeled must differ)")
    counted_paths = set(sources)  # the vocabulary is counted over the training files (all inputs but held-out ones)
    for path, _ in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    check_output(
        out, tuple(path for path, _ in inputs), overwrite=overwrite
    )  # before the long read, and never over its own input
    pieces = [
        piece
        for path, has_label in inputs
        for piece in split_pieces(path, has_label, piece_bytes if processes > 1 else 1 << 62)
    ]
    # pass 1: validate, count rows and (to categorify) every feature's values
    bar = tqdm(desc="count", unit="rows", unit_scale=True, disable=bar_disabled(progress))
    counted: list[PieceCount] = _run(
        _count_piece,
        [
            (piece, hash_mod is None and piece.has_label and (piece.path in counted_paths or not own_splits), strict)
            for piece in pieces
        ],
        processes,
        bar,
        lambda result: result.lines,
    )
    bar.close()
    rejections = {path: Rejections() for path, _ in inputs}
    kept = {path: 0 for path, _ in inputs}
    lines_before = {path: 0 for path, _ in inputs}
    counts = [ValueCounts() for _ in range(NUM_SPARSE)]
    for piece, result in zip(pieces, counted):  # in file order: line numbers continue from the pieces before
        merged = rejections[piece.path]
        for reason, count in result.rejections.counts.items():
            merged.counts[reason] += count
        for reason, numbers in result.rejections.lines.items():
            first = merged.lines.setdefault(reason, [])
            first.extend(lines_before[piece.path] + n for n in numbers[: KEPT_LINE_NUMBERS - len(first)])
        lines_before[piece.path] += result.lines
        kept[piece.path] += result.kept
        for column, (values, value_counts) in enumerate(result.values):
            counts[column].add_counted(values, value_counts)
    for path, _ in inputs:
        if lines_before[path] == 0:
            raise ValueError(f"{path} is empty")
        if kept[path] == 0:
            raise ValueError(
                f"{path}: no good rows ({rejections[path].total} rejected: {dict(rejections[path].counts)})"
            )
    if hash_mod is None:
        categorify = Categorifier(counts, min_count)
        cardinalities = categorify.cardinalities
    else:
        cardinalities = [hash_mod + 1] * NUM_SPARSE
    labeled_rows = [kept[path] for path in sources]
    if own_splits:  # in input order: the training files, then val, then test
        rows = {"train": sum(labeled_rows), "val": kept[Path(val)], "test": kept[Path(test)]}  # type: ignore[arg-type]
    elif days:
        rows = terabyte_split_rows(labeled_rows)
    else:
        rows = kaggle_split_rows(labeled_rows[0])
    if unlabeled is not None:
        rows["unlabeled"] = kept[Path(unlabeled)]
    # pass 2: transform and write; each piece's rows go where file order puts them (the splits fill in order)
    with DatasetWriter(
        out, rows, NUM_DENSE, cardinalities, unlabeled=("unlabeled",) if unlabeled else (), overwrite=overwrite
    ) as writer:
        labeled_starts, start = {}, 0
        for split in (name for name in rows if name != "unlabeled"):
            labeled_starts[split], start = start, start + rows[split]
        tasks, position = [], {True: 0, False: 0}
        for piece, result in zip(pieces, counted):
            tasks.append((piece, labeled_starts if piece.has_label else {"unlabeled": 0}, position[piece.has_label]))
            position[piece.has_label] += result.kept
        _WRITE.update(
            categorify=categorify if hash_mod is None else None,
            hash_mod=hash_mod,
            directory=writer.temporary,
            rows=rows,
            cardinalities=np.array(cardinalities),
        )
        bar = tqdm(total=sum(rows.values()), desc="write", unit="rows", unit_scale=True, disable=bar_disabled(progress))
        try:
            _run(_write_piece, tasks, processes, bar, lambda written: written)
        finally:
            _WRITE.clear()
        bar.close()
        for split, count in rows.items():
            writer.mark_written(split, count)
        total = Rejections()
        for rejected in rejections.values():
            total.counts.update(rejected.counts)
        # first line numbers by reason; with several input files, by file then reason
        first_lines = (
            rejections[inputs[0][0]].lines
            if len(inputs) == 1
            else {str(path): rejected.lines for path, rejected in rejections.items() if rejected.lines}
        )
        if hash_mod is None:  # the raw values behind the ids: what maps a raw row at prediction time
            categorify.save(writer.temporary / VOCABULARY)
        writer.facts.update(
            {
                "source": "criteo-own-splits" if own_splits else "criteo-terabyte" if days else "criteo-kaggle",
                "files": {str(path): {"kept": kept[path], "rejected": rejections[path].total} for path, _ in inputs},
                "rows": dict(rows),
                "input": [str(path) for path, _ in inputs] if len(inputs) > 1 else str(sources[0]),
                "rows_read": sum(kept.values()) + total.total,
                "rows_kept": sum(kept.values()),
                "rejected": {"total": total.total, "by_reason": dict(total.counts), "first_lines": first_lines},
                "options": {
                    "min_count": min_count,
                    "hash_mod": hash_mod,
                    "strict": strict,
                    "days": days,
                    "unlabeled": None if unlabeled is None else str(unlabeled),
                    "val": None if val is None else str(val),
                    "test": None if test is None else str(test),
                },
            }
        )
        facts = dict(writer.facts)
    return facts
