"""Every value of a data set checked before training: ids within their features' ranges, labels 0 or 1, dense values
finite. One streamed pass over the memory-mapped arrays; a pass that found nothing is remembered in
``validated.json`` beside the manifest (each file's size and modification time), so a data set is read once, not
at every run. The first bad value is named by its split, file, row (and feature or column) and value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from compemb.data.dataset import VALIDATED_FILE, DatasetError, Split
from compemb.io import atomic_write_text

VALIDATED = VALIDATED_FILE
CHUNK_ROWS = 1 << 18  # rows per read: a few tens of MB at Criteo's width


def _stamps(path: Path) -> dict[str, list[int]]:
    """Every array file's size and modification time, by its path in the data set."""
    return {str(f.relative_to(path)): [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.rglob("*.npy"))}


def validate_dataset(path: str | os.PathLike, manifest: dict[str, Any], splits: dict[str, Split]) -> None:
    """Raise DatasetError at the first id outside its feature's range, label other than 0/1 or non-finite dense
    value, in any split; remember a clean pass (skipped next time while no array file changed)."""
    path = Path(path)
    stamps = _stamps(path)
    try:
        if json.loads((path / VALIDATED).read_text()) == stamps:
            return
    except (OSError, ValueError):
        pass
    cardinalities = np.asarray(manifest["cardinalities"], dtype=np.int64)
    bag_sizes = {bag["name"]: int(bag["cardinality"]) for bag in manifest.get("bags", ())}
    for name, split in splits.items():
        _check_split(path / name, split, cardinalities, bag_sizes)
    try:  # a read-only data set is checked at every run instead
        atomic_write_text(path / VALIDATED, json.dumps(stamps) + "\n")
    except OSError:
        pass


def _check_split(folder: Path, split: Split, cardinalities: np.ndarray, bag_sizes: dict[str, int]) -> None:
    for start in range(0, len(split), CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, len(split))
        sparse = np.asarray(split.sparse[start:stop])
        bad = (sparse < 0) | (sparse >= cardinalities)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise DatasetError(
                f"{folder / 'sparse.npy'} row {start + row}, feature C{column + 1}: id "
                f"{sparse[row, column]} is outside [0, {cardinalities[column]})"
            )
        if split.labels is not None:
            labels = np.asarray(split.labels[start:stop])
            bad = (labels != 0) & (labels != 1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DatasetError(f"{folder / 'labels.npy'} row {start + row}: label {labels[row]} is not 0 or 1")
        dense = np.asarray(split.dense[start:stop])
        bad = ~np.isfinite(dense)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise DatasetError(
                f"{folder / 'dense.npy'} row {start + row}, column {column}: {dense[row, column]} is not finite"
            )
    for name, (values, _) in split.bags.items():
        for start in range(0, len(values), CHUNK_ROWS):
            part = np.asarray(values[start : start + CHUNK_ROWS])
            bad = (part < 0) | (part >= bag_sizes[name])
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                raise DatasetError(
                    f"{folder / 'bags' / name}.values.npy value {start + at}: id {part[at]} is "
                    f"outside [0, {bag_sizes[name]})"
                )
