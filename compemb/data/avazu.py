"""Avazu click logs (CSV with a header) to the preprocessed format.

Columns: id, click, hour (YYMMDDHH), then 21 categorical fields. ``hour`` becomes two features, the hour of
day and the weekday, so a row has 23 sparse features and no dense ones. Values are categorified as Criteo's
are (a first pass counts them; values seen fewer than ``min_count`` times share id 1, an empty value gets id
0, kept values follow in sorted order). Bad rows (wrong column count, a click other than 0/1, an hour that
is not a YYMMDDHH date, a line that is not UTF-8 or not CSV) are rejected and counted by reason with their first line numbers; ``strict`` stops
at the first. Rows are split in file order: the first 80% train, then 10% val, then 10% test.
"""

from __future__ import annotations

import csv
import datetime
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compemb.data.criteo.rows import MAX_LINE_BYTES, Rejections, RowError, read_line
from compemb.data.criteo.transforms import MISSING_ID, RARE_ID
from compemb.data.dataset.writer import DatasetWriter, check_output

HEADER_START = ("id", "click", "hour")


def _parse(row: list[str], width: int) -> tuple[int, list[str]]:
    if len(row) != width:
        raise RowError("columns", f"{len(row)} columns, expected {width}")
    if row[1] not in ("0", "1"):
        raise RowError("label", f"click {row[1]!r} is not 0 or 1")
    try:
        when = datetime.datetime.strptime(row[2], "%y%m%d%H")
    except ValueError:
        raise RowError("hour", f"hour {row[2]!r} is not YYMMDDHH") from None
    return int(row[1]), [str(when.hour), str(when.weekday()), *row[3:]]


def _header(path: Path) -> list[str]:
    with open(path, "rb") as file:
        first = read_line(file, MAX_LINE_BYTES, f"{path}:1")
    return next(csv.reader([first.decode("utf-8", errors="replace")]), [])


def _rows(path: Path, rejections: Rejections, strict: bool) -> Iterator[tuple[int, list[str]]]:
    line = [0]  # the file line the reader has reached

    def text_lines(file: Any) -> Iterator[str]:
        # each line decoded alone: a line that is not UTF-8 is rejected ("encoding"), never the whole file
        while raw := read_line(file, MAX_LINE_BYTES, f"{path}:{line[0] + 1}"):  # an input without newlines: refused
            line[0] += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as error:
                if strict or line[0] == 1:
                    raise ValueError(f"{path}:{line[0]}: bad row (encoding): not UTF-8 ({error.reason})") from None
                rejections.add("encoding", line[0])

    with open(path, "rb") as file:
        reader = csv.reader(text_lines(file))
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        if tuple(header[:3]) != HEADER_START:
            raise ValueError(f"{path}: the header must start with id,click,hour; got {header[:3]}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:  # e.g. a lone carriage return inside a field: the line is rejected
                if strict:
                    raise ValueError(f"{path}:{line[0]}: bad row (format): {error}") from None
                rejections.add("format", line[0])
                continue
            try:
                yield _parse(row, len(header))
            except RowError as error:
                if strict:
                    raise ValueError(f"{path}:{line[0]}: bad row ({error.reason}): {error}") from None
                rejections.add(error.reason, line[0])


def preprocess_avazu(
    source: str | os.PathLike,
    out: str | os.PathLike,
    min_count: int = 3,
    strict: bool = False,
    chunk_rows: int = 100_000,
    overwrite: bool = False,
) -> dict:
    """Preprocess an Avazu CSV into ``out``; return the manifest facts."""
    source = Path(source)
    check_output(out, (source,), overwrite=overwrite)  # before the long read, and never over its own input
    rejections = Rejections()
    counts: list[Counter] | None = None
    kept = 0
    for _, features in _rows(source, rejections, strict):
        counts = counts or [Counter() for _ in features]
        for counter, value in zip(counts, features):
            counter[value] += 1
        kept += 1
    if counts is None:
        raise ValueError(f"{source}: no good rows ({rejections.total} rejected: {dict(rejections.counts)})")
    vocabularies = [
        {value: index + 2 for index, value in enumerate(sorted(v for v, c in counter.items() if c >= min_count and v))}
        for counter in counts
    ]
    train, val = kept * 8 // 10, kept // 10
    rows = {"train": train, "val": val, "test": kept - train - val}
    with DatasetWriter(out, rows, 0, [len(v) + 2 for v in vocabularies], overwrite=overwrite) as writer:
        labels: list[int] = []
        ids: list[list[int]] = []

        def flush() -> None:  # rows fill train, then val, then test, in file order
            writer.append(np.zeros((len(labels), 0), np.float32), np.array(ids, np.int64), np.array(labels, np.uint8))
            labels.clear()
            ids.clear()

        for label, features in _rows(source, Rejections(), strict=False):
            labels.append(label)
            ids.append(
                [
                    vocabulary.get(value, RARE_ID if value else MISSING_ID)
                    for vocabulary, value in zip(vocabularies, features)
                ]
            )
            if len(labels) == chunk_rows:
                flush()
        if labels:
            flush()
        writer.facts.update(
            {
                "source": "avazu",
                "input": str(source),
                "rows_read": kept + rejections.total,
                "rows_kept": kept,
                "rejected": {
                    "total": rejections.total,
                    "by_reason": dict(rejections.counts),
                    "first_lines": rejections.lines,
                },
                "options": {"min_count": min_count, "strict": strict},
                "features": ["hour_of_day", "weekday", *_header(source)[3:]],
            }
        )
        facts = dict(writer.facts)
    return facts
