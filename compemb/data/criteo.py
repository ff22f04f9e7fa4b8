"""Criteo click logs (Kaggle ``train.txt`` / ``test.txt``, Terabyte ``day_N``) to the preprocessed format.

A row is a label, 13 integer features and 26 categorical features written as hex, tab-separated; empty
fields are missing (``test.txt`` has no label). Dense values: missing -> 0, negative -> 0, then
log(x + 1). Categorical values: hex -> 32-bit integer, then either categorified (a first pass counts every
value; values seen fewer than ``min_count`` times share one id per feature, missing gets its own id) or
taken ``mod hash_mod`` (DLRM's max-ind-range; missing gets id ``hash_mod``).

Bad rows (wrong column count, a label other than 0/1, a non-integer dense value, a non-hex or >32-bit
categorical value) are rejected and counted by reason with their first 100 line numbers, never fixed;
``strict`` stops at the first. Rows read = rows kept + rows rejected, always. Splits follow DLRM's Kaggle
rule: seven equal chunks in order, chunks 0-5 train, chunk 6 halved into test then val. Files are streamed
in chunks (never whole in memory), plain or gzip.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compemb.data.dataset import DatasetWriter

NUM_DENSE, NUM_SPARSE = 13, 26
MISSING = -1  # a missing categorical value before its id is assigned
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


def parse_row(line: str, has_label: bool = True) -> tuple[int, list[int], list[int]]:
    """One TSV line -> (label, 13 raw dense ints (missing = 0), 26 categorical ints (missing = -1)).

    Raises:
        RowError: the row is bad; its ``reason`` says how.
    """
    fields = line.rstrip("\r\n").split("\t")
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
        try:
            dense.append(int(text) if text else 0)
        except ValueError:
            raise RowError("dense", f"dense value {text!r} is not an integer") from None
    sparse = []
    for text in fields[NUM_DENSE:]:
        if not text:
            sparse.append(MISSING)
            continue
        try:
            value = int(text, 16)
        except ValueError:
            raise RowError("categorical", f"categorical value {text!r} is not hex") from None
        if len(text) > 8 or value < 0:
            raise RowError("categorical", f"categorical value {text!r} is not a 32-bit hex number")
        sparse.append(value)
    return label, dense, sparse


def _open_text(path: Path):
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8", newline="") if gzipped else open(path, encoding="utf-8", newline="")


def read_rows(
    path: str | os.PathLike, has_label: bool, rejections: Rejections, strict: bool, chunk_rows: int = 100_000
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream good rows in chunks as (labels uint8, raw dense int64 (n, 13), categorical int64 (n, 26)).

    Bad rows go to ``rejections`` (or raise with their line number when ``strict``). An empty or truncated
    (gzip) input raises ValueError.
    """
    path = Path(path)
    labels, dense, sparse = [], [], []
    line_number = 0
    try:
        with _open_text(path) as lines:
            for line_number, line in enumerate(lines, start=1):
                try:
                    label, row_dense, row_sparse = parse_row(line, has_label)
                except RowError as error:
                    if strict:
                        raise ValueError(f"{path}:{line_number}: bad row ({error.reason}): {error}") from None
                    rejections.add(error.reason, line_number)
                    continue
                labels.append(label)
                dense.append(row_dense)
                sparse.append(row_sparse)
                if len(labels) == chunk_rows:
                    yield _arrays(labels, dense, sparse)
                    labels, dense, sparse = [], [], []
    except EOFError:
        raise ValueError(f"{path} is truncated: the gzip stream ends after line {line_number}") from None
    if line_number == 0:
        raise ValueError(f"{path} is empty")
    if labels:
        yield _arrays(labels, dense, sparse)


def _arrays(labels: list, dense: list, sparse: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(labels, dtype=np.uint8), np.array(dense, dtype=np.int64), np.array(sparse, dtype=np.int64)


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Criteo's dense transform: negatives -> 0, then log(x + 1), as float32."""
    return np.log1p(np.maximum(raw, 0)).astype(np.float32)


class Categorifier:
    """Maps each feature's raw values to ids: 0 missing, 1 rare (seen < min_count), then kept values in order."""

    def __init__(self, counts: list[Counter], min_count: int) -> None:
        self.kept = [np.array(sorted(v for v, c in feature.items() if c >= min_count and v != MISSING), np.int64)
                     for feature in counts]

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


def preprocess_criteo(
    source: str | os.PathLike,
    out: str | os.PathLike,
    min_count: int = 3,
    hash_mod: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> dict:
    """Preprocess a Kaggle-style Criteo ``train.txt`` (plain or gzip) into ``out``; return the manifest facts."""
    if hash_mod is not None and hash_mod < 1:
        raise ValueError(f"hash_mod must be >= 1, got {hash_mod}")
    # pass 1: validate, count rows and (to categorify) every feature's values
    rejections = Rejections()
    counts = [Counter() for _ in range(NUM_SPARSE)]
    kept = 0
    for _, _, sparse in tqdm(read_rows(source, True, rejections, strict), desc="count", unit="chunk",
                             disable=not progress):
        kept += len(sparse)
        if hash_mod is None:
            for column in range(NUM_SPARSE):
                values, value_counts = np.unique(sparse[:, column], return_counts=True)
                counts[column].update(dict(zip(values.tolist(), value_counts.tolist())))
    if kept == 0:
        raise ValueError(f"{source}: no good rows ({rejections.total} rejected: {dict(rejections.counts)})")
    if hash_mod is None:
        categorify = Categorifier(counts, min_count)
        cardinalities = categorify.cardinalities
    else:
        cardinalities = [hash_mod + 1] * NUM_SPARSE
    # pass 2: transform and write, splitting in file order
    rows = kaggle_split_rows(kept)
    bounds = np.cumsum([0, rows["train"], rows["test"], rows["val"]])
    with DatasetWriter(out, rows, NUM_DENSE, cardinalities) as writer:
        done = 0
        bar = tqdm(total=kept, desc="write", unit="rows", unit_scale=True, disable=not progress)
        for labels, dense, sparse in read_rows(source, True, Rejections(), strict=False):
            ids = categorify(sparse) if hash_mod is None else np.where(sparse == MISSING, hash_mod, sparse % hash_mod)
            features = transform_dense(dense)
            for split, start, end in zip(("train", "test", "val"), bounds[:-1], bounds[1:]):
                low, high = max(start, done) - done, min(end, done + len(labels)) - done
                if low < high:
                    writer.write(split, features[low:high], ids[low:high], labels[low:high])
            done += len(labels)
            bar.update(len(labels))
        bar.close()
        read = kept + rejections.total
        writer.facts.update({
            "source": "criteo-kaggle", "input": str(source), "rows_read": read, "rows_kept": kept,
            "rejected": {"total": rejections.total, "by_reason": dict(rejections.counts),
                         "first_lines": rejections.lines},
            "options": {"min_count": min_count, "hash_mod": hash_mod, "strict": strict},
        })
        facts = dict(writer.facts)
    return facts
