"""Criteo rows: a line's parse (the readable definition, and the compiled kernel that parses blocks of bytes), bad
rows rejected and counted by reason, and files (plain or gzip) streamed in blocks, never whole in memory."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import numba
import numpy as np

NUM_DENSE, NUM_SPARSE = 13, 26
MISSING = -1  # a missing categorical value before its id is assigned
MAX_LINE_BYTES = 1 << 20  # Criteo and Avazu lines are under 1 KB: a longer one is not a row of theirs
REASONS = ("columns", "label", "dense", "categorical")
KEPT_LINE_NUMBERS = 100


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


def is_gzip(path: Path) -> bool:
    """Whether a file is gzip, told by its first two bytes."""
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> BinaryIO:
    """A Criteo text file (plain or gzip, told by its first bytes) opened for reading bytes."""
    if is_gzip(path):  # a GzipFile reads like any binary file; typeshed types it BufferedIOBase, not BinaryIO
        return cast(BinaryIO, gzip.open(path, "rb"))
    return open(path, "rb")


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
