"""Preprocessing Criteo: the inputs checked, the count pass, the splits' sizes (Kaggle's, the Terabyte days', or
the user's own), the write pass, and the manifest's facts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compemb.data.criteo.pieces import (
    PIECE_BYTES,
    Piece,
    PieceCount,
    count_piece,
    run_in_processes,
    split_pieces,
    write_piece,
    write_settings,
)
from compemb.data.criteo.rows import KEPT_LINE_NUMBERS, NUM_DENSE, NUM_SPARSE, Rejections
from compemb.data.criteo.transforms import VOCABULARY, Categorifier, ValueCounts
from compemb.data.dataset.writer import DatasetWriter, check_output
from compemb.progress import bar_disabled


def kaggle_split_rows(total: int) -> dict[str, int]:
    """DLRM's Kaggle split of ``total`` rows: 6/7 train, then the last seventh halved into test and val."""
    train = total * 6 // 7
    rest = total - train
    return {"train": train, "test": rest // 2, "val": rest - rest // 2}


def terabyte_split_rows(day_rows: list[int]) -> dict[str, int]:
    """The Terabyte split of days in order: every day but the last is train; the last is halved, test then val."""
    last = day_rows[-1]
    return {"train": sum(day_rows[:-1]), "test": last // 2, "val": last - last // 2}


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
    sources, own_splits = _check_sources(source, hash_mod, val, test, days)
    processes = _process_count(processes, strict)
    inputs = _input_files(sources, val, test, unlabeled)
    check_output(
        out, tuple(path for path, _ in inputs), overwrite=overwrite
    )  # before the long read, and never over its own input
    pieces = [
        piece
        for path, has_label in inputs
        for piece in split_pieces(path, has_label, piece_bytes if processes > 1 else 1 << 62)
    ]
    # pass 1: validate, count rows and (to categorify) every feature's values
    counted = _count_pass(pieces, hash_mod is None, sources, own_splits, strict, processes, progress)
    rejections, kept, counts = _merge_counts(inputs, pieces, counted)
    categorify: Categorifier | None = None
    if hash_mod is None:
        categorify = Categorifier(counts, min_count)
        cardinalities = categorify.cardinalities
    else:
        cardinalities = [hash_mod + 1] * NUM_SPARSE
    rows = _split_rows(sources, kept, own_splits, days, val, test, unlabeled)
    # pass 2: transform and write; each piece's rows go where file order puts them (the splits fill in order)
    with DatasetWriter(
        out, rows, NUM_DENSE, cardinalities, unlabeled=("unlabeled",) if unlabeled else (), overwrite=overwrite
    ) as writer:
        _write_pass(writer, pieces, counted, categorify, hash_mod, processes, progress)
        if categorify is not None:  # the raw values behind the ids: what maps a raw row at prediction time
            categorify.save(writer.temporary / VOCABULARY)
        writer.facts.update(_rows_facts(inputs, sources, rejections, kept, rows, own_splits, days))
        writer.facts["options"] = {
            "min_count": min_count,
            "hash_mod": hash_mod,
            "strict": strict,
            "days": days,
            "unlabeled": None if unlabeled is None else str(unlabeled),
            "val": None if val is None else str(val),
            "test": None if test is None else str(test),
        }
        facts = dict(writer.facts)
    return facts


def _check_sources(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    hash_mod: int | None,
    val: str | os.PathLike | None,
    test: str | os.PathLike | None,
    days: bool,
) -> tuple[list[Path], bool]:
    """The training files, and whether the user gave their own splits; ValueError for options that do not go
    together."""
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
    return sources, own_splits


def _process_count(processes: int | None, strict: bool) -> int:
    """The worker processes of both passes: the machine's cores (at most 8) unless given; one when ``strict``."""
    processes = min(os.cpu_count() or 1, 8) if processes is None else processes
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if strict:  # the first bad row by file order and its line number need one reader in order
        processes = 1
    return processes


def _input_files(
    sources: list[Path],
    val: str | os.PathLike | None,
    test: str | os.PathLike | None,
    unlabeled: str | os.PathLike | None,
) -> list[tuple[Path, bool]]:
    """Every input file and whether it has labels, in the order they are read: the training files, ``val`` and
    ``test``, then ``unlabeled``; each must be a file, given once."""
    held_out = [(Path(val), True), (Path(test), True)] if val is not None else []  # type: ignore[arg-type]
    inputs = (
        [(path, True) for path in sources] + held_out + ([(Path(unlabeled), False)] if unlabeled is not None else [])
    )
    if len({path.resolve() for path, _ in inputs}) != len(inputs):
        raise ValueError("an input file is given twice (train, --val, --test and --unlabeled must differ)")
    for path, _ in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return inputs


def _count_pass(
    pieces: list[Piece],
    categorify: bool,
    sources: list[Path],
    own_splits: bool,
    strict: bool,
    processes: int,
    progress: bool,
) -> list[PieceCount]:
    """Pass 1 over every piece, in piece order. To ``categorify``, each labeled piece's values are counted too:
    with the user's own splits (``own_splits``), only the training ``sources``' pieces."""
    counted_paths = set(sources)  # the vocabulary is counted over the training files (all inputs but held-out ones)
    bar = tqdm(desc="count", unit="rows", unit_scale=True, disable=bar_disabled(progress))
    counted: list[PieceCount] = run_in_processes(
        count_piece,
        [
            (piece, categorify and piece.has_label and (piece.path in counted_paths or not own_splits), strict)
            for piece in pieces
        ],
        processes,
        bar,
        lambda result: result.lines,
    )
    bar.close()
    return counted


def _merge_counts(
    inputs: list[tuple[Path, bool]], pieces: list[Piece], counted: list[PieceCount]
) -> tuple[dict[Path, Rejections], dict[Path, int], list[ValueCounts]]:
    """The pieces' counts merged: each file's rejections (line numbers in the file) and good rows, and every
    feature's value counts; ValueError for a file that is empty or has no good row."""
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
    return rejections, kept, counts


def _split_rows(
    sources: list[Path],
    kept: dict[Path, int],
    own_splits: bool,
    days: bool,
    val: str | os.PathLike | None,
    test: str | os.PathLike | None,
    unlabeled: str | os.PathLike | None,
) -> dict[str, int]:
    """Rows per split, in the order the labeled rows fill them, then ``unlabeled``'s."""
    labeled_rows = [kept[path] for path in sources]
    if own_splits:  # in input order: the training files, then val, then test
        rows = {"train": sum(labeled_rows), "val": kept[Path(val)], "test": kept[Path(test)]}  # type: ignore[arg-type]
    elif days:
        rows = terabyte_split_rows(labeled_rows)
    else:
        rows = kaggle_split_rows(labeled_rows[0])
    if unlabeled is not None:
        rows["unlabeled"] = kept[Path(unlabeled)]
    return rows


def _write_pass(
    writer: DatasetWriter,
    pieces: list[Piece],
    counted: list[PieceCount],
    categorify: Categorifier | None,
    hash_mod: int | None,
    processes: int,
    progress: bool,
) -> None:
    """Pass 2: every piece's rows transformed and written into ``writer``'s arrays at their place."""
    rows, cardinalities = writer.rows, writer.cardinalities
    labeled_starts, start = {}, 0
    for split in (name for name in rows if name != "unlabeled"):
        labeled_starts[split], start = start, start + rows[split]
    tasks, position = [], {True: 0, False: 0}
    for piece, result in zip(pieces, counted):
        tasks.append((piece, labeled_starts if piece.has_label else {"unlabeled": 0}, position[piece.has_label]))
        position[piece.has_label] += result.kept
    with write_settings(
        categorify=categorify,
        hash_mod=hash_mod,
        directory=writer.temporary,
        rows=rows,
        cardinalities=np.array(cardinalities),
    ):
        bar = tqdm(total=sum(rows.values()), desc="write", unit="rows", unit_scale=True, disable=bar_disabled(progress))
        run_in_processes(write_piece, tasks, processes, bar, lambda written: written)
    bar.close()
    for split, count in rows.items():
        writer.mark_written(split, count)


def _rows_facts(
    inputs: list[tuple[Path, bool]],
    sources: list[Path],
    rejections: dict[Path, Rejections],
    kept: dict[Path, int],
    rows: dict[str, int],
    own_splits: bool,
    days: bool,
) -> dict[str, Any]:
    """The manifest's facts about the rows: the source, each file's rows kept and rejected, the splits' rows, and
    the rejections by reason with their first line numbers."""
    total = Rejections()
    for rejected in rejections.values():
        total.counts.update(rejected.counts)
    # first line numbers by reason; with several input files, by file then reason
    first_lines = (
        rejections[inputs[0][0]].lines
        if len(inputs) == 1
        else {str(path): rejected.lines for path, rejected in rejections.items() if rejected.lines}
    )
    return {
        "source": "criteo-own-splits" if own_splits else "criteo-terabyte" if days else "criteo-kaggle",
        "files": {str(path): {"kept": kept[path], "rejected": rejections[path].total} for path, _ in inputs},
        "rows": dict(rows),
        "input": [str(path) for path, _ in inputs] if len(inputs) > 1 else str(sources[0]),
        "rows_read": sum(kept.values()) + total.total,
        "rows_kept": sum(kept.values()),
        "rejected": {"total": total.total, "by_reason": dict(total.counts), "first_lines": first_lines},
    }
