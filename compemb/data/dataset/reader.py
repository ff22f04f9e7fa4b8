"""Reading a data set back: every split's arrays memory-mapped, each checked against the manifest when opened."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compemb.data.dataset.format import MANIFEST, MAX_COUNT, PLAIN_NAME


@dataclass
class Split:
    """One split's arrays, memory-mapped read-only."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray | None  # None: the split has no labels
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (values, offsets)

    def __len__(self) -> int:
        return len(self.sparse)


class DatasetError(ValueError):
    """A data set whose files do not match its manifest; the message names the file and what is wrong."""


# what each array must be: its dtype kind ("f" float, "iu" integer, "u" unsigned) and its width's name
_KINDS = {
    "dense": ("f", "float32"),
    "sparse": ("iu", "an integer dtype"),
    "labels": ("u", "uint8"),
    "values": ("iu", "an integer dtype"),
    "offsets": ("i", "int64"),
}


def _npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, from its header alone."""
    if not file.is_file():
        raise DatasetError(f"{file}: missing (the manifest lists this split)")
    try:
        with open(file, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
            return tuple(shape), dtype, handle.tell()
    except (ValueError, OSError) as error:
        raise DatasetError(f"{file}: not a readable .npy file ({error})") from None


def _open_array(file: Path, name: str, rows: int, width: int | None) -> np.ndarray:
    """Memory-map one array after checking its header against the manifest and its size against its header."""
    shape, dtype, offset = _npy_header(file)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = file.stat().st_size
    if actual < expected:
        raise DatasetError(
            f"{file}: truncated: its header says {shape} {dtype} ({expected:,} bytes), the file has {actual:,} bytes"
        )
    kinds, wanted = _KINDS[name]
    if dtype.kind not in kinds:
        raise DatasetError(f"{file}: dtype {dtype}, expected {wanted}")
    expected_shape = (rows,) if width is None else (rows, width)
    if tuple(shape) != expected_shape:
        raise DatasetError(f"{file}: shape {tuple(shape)}, the manifest says {expected_shape}")
    return np.load(file, mmap_mode="r")


def open_dataset(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Split]]:
    """The manifest and every split of a preprocessed data set, memory-mapped (nothing is read yet).

    Every array is checked against the manifest when opened (present, its shape and dtype, a file as long as its
    header says): DatasetError names the file and what differs.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a compemb data set: no {MANIFEST}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        rows, cardinalities = dict(manifest["rows"]), list(manifest["cardinalities"])
        unlabeled, bags = list(manifest.get("unlabeled", ())), list(manifest.get("bags", ()))
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise DatasetError(
            f"{path / MANIFEST}: not a compemb manifest ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    integer = lambda value, low: type(value) is int and low <= value <= MAX_COUNT  # noqa: E731
    bad = [f"rows[{k!r}] = {_short(v)}" for k, v in rows.items() if not integer(v, 0)] + [
        f"cardinalities[{i}] = {_short(v)}" for i, v in enumerate(cardinalities) if not integer(v, 1)
    ]
    if bad:
        raise DatasetError(
            f"{path / MANIFEST}: rows must be integers in [0, 2^62] and cardinalities in [1, 2^62], "
            f"got {', '.join(bad[:3])}"
        )
    # every name becomes a path: a split or bag name is one plain name inside the data set, never ../ or absolute
    for where, name in [
        *(("split", k) for k in rows),
        *(("unlabeled split", k) for k in unlabeled),
        *(("bag", bag.get("name") if isinstance(bag, dict) else bag) for bag in bags),
    ]:
        if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
            raise DatasetError(
                f"{path / MANIFEST}: {where} name {_short(name)} is not a plain name (letters, digits, "
                f"_ and -): it would be read from outside the data set"
            )
    for bag in bags:
        if not integer(bag.get("cardinality"), 1) or bag.get("pooling") not in ("sum", "mean"):
            raise DatasetError(
                f"{path / MANIFEST}: bag {bag['name']!r} needs a cardinality in [1, 2^62] and pooling "
                f"sum or mean, got {_short(bag.get('cardinality'))}, {_short(bag.get('pooling'))}"
            )
    unlabeled_splits = set(unlabeled)
    splits, dense_width = {}, None
    for split, count in rows.items():
        folder = path / split
        if dense_width is None:  # the first split's dense width; every other split must have it too
            shape = _npy_header(folder / "dense.npy")[0]
            dense_width = shape[1] if len(shape) == 2 else -1
        dense = _open_array(folder / "dense.npy", "dense", count, dense_width)
        sparse = _open_array(folder / "sparse.npy", "sparse", count, len(cardinalities))
        labels = None if split in unlabeled_splits else _open_array(folder / "labels.npy", "labels", count, None)
        splits[split] = Split(
            dense, sparse, labels, {bag["name"]: _open_bag(folder / "bags", bag["name"], count) for bag in bags}
        )
    return manifest, splits


def _short(value: Any) -> str:
    """A manifest's value as an error shows it: its repr, cut (a 400-digit number or a long string says enough in 40
    characters)."""
    text = (
        repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"a {len(str(abs(value)))}-digit number"
    )
    return text if len(text) <= 60 else text[:57] + "..."


def _open_bag(folder: Path, name: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A multi-hot feature's values and offsets, memory-mapped, checked against each other and the row count."""
    offsets = _open_array(folder / f"{name}.offsets.npy", "offsets", rows + 1, None)
    num_values = _npy_header(folder / f"{name}.values.npy")[0]
    values = _open_array(folder / f"{name}.values.npy", "values", num_values[0] if num_values else -1, None)
    if offsets[0] != 0 or offsets[-1] != len(values):
        raise DatasetError(
            f"{folder / name}.offsets.npy: offsets run from {offsets[0]} to {offsets[-1]}, expected 0 "
            f"to the {len(values):,} values"
        )
    return values, offsets
