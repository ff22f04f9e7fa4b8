"""The preprocessed format every data set is written in, and reading it back by memory map.

A data set is a directory::

    manifest.json          row counts per split, per-feature cardinalities, the producer's options and facts
    <split>/dense.npy      float32 (rows, num_dense), already transformed (log(x + 1) for Criteo)
    <split>/sparse.npy     int32 or int64 (rows, num_sparse), ids in [0, cardinality) per column
    <split>/labels.npy     uint8 (rows,), 0 or 1 (absent for an unlabeled split, e.g. Criteo Kaggle's test.txt)
    <split>/bags/<name>.values.npy   a multi-hot feature's ids, row after row (optional; the manifest's "bags")
    <split>/bags/<name>.offsets.npy  int64 (rows + 1,): row r's ids are values[offsets[r]:offsets[r + 1]]
    vocabulary.safetensors the raw values behind the ids, per feature (categorified Criteo only)

Writers fill the arrays chunk by chunk through memory maps in a temporary directory that is renamed into
place when complete, so a reader never sees a half-written data set.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compemb.io import atomic_write_text, exchange_paths, remove_dead_temporaries, temporary_prefix
from compemb.outputs import check_output_directory

MANIFEST = "manifest.json"
MAX_COUNT = 1 << 62  # rows and ids are int64
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ARRAYS = ("dense", "sparse", "labels")
VOCABULARY_FILE = "vocabulary.safetensors"  # a categorified Criteo set's kept values (compemb.data.criteo writes it)
SPLIT_ENTRIES = {f"{name}.npy" for name in ARRAYS} | {"bags"}


VALIDATED_FILE = "validated.json"  # compemb.data.validate's record of a clean pass over the arrays


def _is_dataset(path: Path) -> bool:
    """Whether ``path`` holds a compemb data set and nothing else (so replacing it loses nothing of the user's)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        splits = set(manifest["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for entry in path.iterdir():
        if entry.name in (MANIFEST, VOCABULARY_FILE, VALIDATED_FILE):
            continue
        if entry.name not in splits or not entry.is_dir() or not {e.name for e in entry.iterdir()} <= SPLIT_ENTRIES:
            return False
    return True


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), overwrite: bool = False) -> None:
    """Refuse an output directory whose replacement would delete what compemb did not write, or a data set.

    ``path`` may be missing, an empty directory, or (with ``overwrite``) a compemb data set, which the new one
    replaces when complete; anything else, or a directory holding one of ``inputs``, raises ``ValueError`` naming it.
    """
    path = Path(path)
    check_output_directory(path)  # not a dangling link, not inside another data set or run
    resolved = path.resolve()
    for given in inputs:
        if resolved in Path(given).resolve().parents:
            raise ValueError(f"output {path} would hold the input {given}: choose another --out")
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory: choose another --out")
    if any(path.iterdir()) and not _is_dataset(path):
        raise ValueError(
            f"output {path} exists and is not a compemb data set (it would be replaced): "
            "choose a new or empty directory, or remove it yourself"
        )
    if _is_dataset(path) and not overwrite:
        raise ValueError(f"output {path} holds a compemb data set: --overwrite replaces it (or choose another --out)")


@dataclass
class Split:
    """One split's arrays, memory-mapped read-only."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray | None  # None: the split has no labels
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (values, offsets)

    def __len__(self) -> int:
        return len(self.sparse)


def sparse_dtype(cardinalities: list[int]) -> np.dtype:
    """int32 when every id fits, else int64."""
    return np.dtype(np.int32) if max(cardinalities) <= np.iinfo(np.int32).max else np.dtype(np.int64)


class DatasetWriter:
    """Writes splits of known sizes chunk by chunk, then publishes the directory atomically.

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp() + "/data"
        >>> with DatasetWriter(out, {"train": 2}, num_dense=1, cardinalities=[5]) as writer:
        ...     writer.write("train", np.zeros((2, 1), np.float32), np.array([[1], [4]]), np.array([0, 1]))
        >>> open_dataset(out)[1]["train"].sparse.tolist()
        [[1], [4]]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rows: dict[str, int],
        num_dense: int,
        cardinalities: list[int],
        unlabeled: tuple[str, ...] = (),
        bags: list[dict[str, Any]] = (),
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite  # an existing compemb data set at path may be replaced
        # multi-hot features: {"name", "cardinality", "pooling"} each; their ids are kept per chunk and written whole
        # at close (a split's number of ids is not known before its rows are)
        self.bags = [dict(bag) for bag in bags]
        for bag in self.bags:
            if bag.get("pooling") not in ("sum", "mean") or int(bag.get("cardinality", 0)) < 1 or not bag.get("name"):
                raise ValueError(f"a bag feature needs a name, a cardinality >= 1 and pooling sum or mean, got {bag}")
        self._bag_chunks: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {
            split: {bag["name"]: [] for bag in self.bags} for split in rows
        }
        self.unlabeled = tuple(unlabeled)
        check_output(self.path, overwrite=overwrite)
        # a name of its own: two writers of the same output never share (or delete) each other's files
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(self.path)  # what a killed writer of this output left
        dtypes = {"dense": np.float32, "sparse": sparse_dtype(cardinalities), "labels": np.uint8}
        need = sum(
            count
            * (num_dense * 4 + len(cardinalities) * np.dtype(dtypes["sparse"]).itemsize + (split not in self.unlabeled))
            for split, count in rows.items()
        )
        free = shutil.disk_usage(self.path.parent).free
        if need > free:  # before anything is written (an absurd --train-rows, a full disk)
            raise OSError(
                f"no room for the data set {self.path}: its arrays need {need:,} bytes, {free:,} are free on that disk"
            )
        self.temporary = Path(
            tempfile.mkdtemp(prefix=temporary_prefix(self.path), suffix=".partial", dir=self.path.parent)
        )
        self.rows = dict(rows)
        self.cardinalities = list(cardinalities)
        self.filled = {split: 0 for split in rows}
        self.facts: dict[str, Any] = {}  # written into the manifest beside the row counts and cardinalities
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        shapes = {
            "dense": ((num_dense,), np.float32),
            "sparse": ((len(cardinalities),), sparse_dtype(cardinalities)),
            "labels": ((), np.uint8),
        }
        try:
            for split, count in rows.items():
                (self.temporary / split).mkdir()
                self.arrays[split] = {
                    name: np.lib.format.open_memmap(
                        self.temporary / split / f"{name}.npy", mode="w+", dtype=dtype, shape=(count, *width)
                    )
                    for name, (width, dtype) in shapes.items()
                    if not (name == "labels" and split in self.unlabeled)
                }
                for name in self.arrays[split]:
                    _reserve(self.temporary / split / f"{name}.npy")
        except OSError as error:  # no room for the arrays: nothing half-made is left beside the data set
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise OSError(
                f"no room for the data set {self.path} ({error.strerror}): its arrays need {need:,} bytes"
            ) from None
        except BaseException:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise

    def write(
        self,
        split: str,
        dense: np.ndarray,
        sparse: np.ndarray,
        labels: np.ndarray | None,
        bags: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """Append a chunk of rows to ``split`` (ids are checked against the cardinalities).

        ``bags``: each multi-hot feature's ``(values, lengths)`` for these rows (required when the writer has bags).
        """
        if (labels is None) != (split in self.unlabeled):
            raise ValueError(
                f"split {split!r} is {'un' if split in self.unlabeled else ''}labeled; "
                f"labels {'were' if labels is not None else 'were not'} given"
            )
        start, count = self.filled[split], len(sparse)
        if start + count > self.rows[split]:
            raise ValueError(f"split {split!r} holds {self.rows[split]} rows; this chunk would make {start + count}")
        if sparse.size and (sparse.min() < 0 or (sparse >= np.array(self.cardinalities)).any()):
            raise ValueError(f"split {split!r}: an id is outside its feature's cardinality {self.cardinalities}")
        given = set(bags or {})
        if given != {bag["name"] for bag in self.bags}:
            raise ValueError(
                f"split {split!r}: bags given for {sorted(given)}, the data set has "
                f"{[bag['name'] for bag in self.bags]}"
            )
        for bag in self.bags:
            values, lengths = (np.asarray(a) for a in bags[bag["name"]])
            if lengths.shape != (count,) or lengths.dtype.kind not in "iu" or (lengths < 0).any():
                raise ValueError(f"split {split!r}, bag {bag['name']!r}: lengths must be {count} non-negative integers")
            if values.ndim != 1 or len(values) != int(lengths.sum()) or values.dtype.kind not in "iu":
                raise ValueError(
                    f"split {split!r}, bag {bag['name']!r}: {len(values)} values for lengths summing to "
                    f"{int(lengths.sum())}"
                )
            if values.size and (values.min() < 0 or values.max() >= bag["cardinality"]):
                raise ValueError(f"split {split!r}, bag {bag['name']!r}: an id is outside [0, {bag['cardinality']})")
            self._bag_chunks[split][bag["name"]].append((values, lengths))
        arrays = self.arrays[split]
        arrays["dense"][start : start + count] = dense
        arrays["sparse"][start : start + count] = sparse
        if labels is not None:
            arrays["labels"][start : start + count] = labels
        self.filled[split] = start + count

    def mark_written(self, split: str, count: int) -> None:
        """Record that ``count`` rows of ``split`` were written into its arrays (``temporary/split/*.npy``) by other
        processes (parallel preprocessing), so :meth:`close` accepts the split as filled."""
        if not 0 <= count <= self.rows[split]:
            raise ValueError(f"split {split!r} holds {self.rows[split]} rows, not {count}")
        for array in self.arrays[split].values():  # the other processes' writes reach the files through this map too
            array.flush()
        self.filled[split] = count

    def append(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray | None) -> None:
        """Append rows in file order: they fill the splits one after another, in the order ``rows`` lists them."""
        done = 0
        for split, count in self.rows.items():
            room = count - self.filled[split]
            if room <= 0 or done == len(sparse):
                continue
            take = min(room, len(sparse) - done)
            part = slice(done, done + take)
            self.write(split, dense[part], sparse[part], None if labels is None else labels[part])
            done += take
        if done < len(sparse):
            raise ValueError(f"{len(sparse) - done} rows more than the splits hold ({self.rows})")

    def close(self) -> None:
        """Flush, write the manifest (with ``self.facts``), and rename the directory into place; on any failure
        the temporary directory is removed and the output left as it was."""
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise

    def _publish(self) -> None:
        missing = {
            split: (self.filled[split], count) for split, count in self.rows.items() if self.filled[split] != count
        }
        if missing:
            raise ValueError(f"splits not filled (written, expected): {missing}")
        for arrays in self.arrays.values():
            for array in arrays.values():
                array.flush()
        for split, chunks in self._bag_chunks.items():
            for bag in self.bags:
                parts = chunks[bag["name"]]
                values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.int64)
                lengths = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.int64)
                offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                folder = self.temporary / split / "bags"
                folder.mkdir(exist_ok=True)
                np.save(folder / f"{bag['name']}.values.npy", values.astype(sparse_dtype([bag["cardinality"]])))
                np.save(folder / f"{bag['name']}.offsets.npy", offsets)
        manifest = {"rows": self.rows, "cardinalities": self.cardinalities, **self.facts}
        if self.bags:
            manifest["bags"] = self.bags
        if self.unlabeled:
            manifest["unlabeled"] = list(self.unlabeled)
        atomic_write_text(self.temporary / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        # again: something may have been put there while the set was written (another writer's set, say)
        check_output(self.path, overwrite=self.overwrite)  # (close removes this set: nothing of it stays)
        try:
            if self.path.exists() and exchange_paths(self.temporary, self.path):
                # the old set and the new one swapped in one step: --out is never without a whole data set
                shutil.rmtree(self.temporary)
            elif self.path.exists():  # (no atomic exchange here) moved aside, replaced, then removed
                previous = Path(
                    tempfile.mkdtemp(prefix=temporary_prefix(self.path), suffix=".old", dir=self.path.parent)
                )
                os.replace(self.path, previous / "set")
                os.replace(self.temporary, self.path)
                shutil.rmtree(previous)
            else:
                os.replace(self.temporary, self.path)
        except OSError as error:  # another writer published there between the check and the rename
            raise ValueError(
                f"output {self.path} was written by another process meanwhile: this data set was not "
                f"published ({error.strerror})"
            ) from None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, error_type: type | None, *rest: object) -> None:
        if error_type is None:
            self.close()
        else:
            shutil.rmtree(self.temporary, ignore_errors=True)


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped array file's blocks now: a full disk is an OSError here, not a SIGBUS (a crash
    with no message) at the first write into the map. Filesystems that cannot reserve are left to the space check."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(descriptor)


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
    unlabeled = set(unlabeled)
    splits, dense_width = {}, None
    for split, count in rows.items():
        folder = path / split
        if dense_width is None:  # the first split's dense width; every other split must have it too
            shape = _npy_header(folder / "dense.npy")[0]
            dense_width = shape[1] if len(shape) == 2 else -1
        arrays = {
            "dense": _open_array(folder / "dense.npy", "dense", count, dense_width),
            "sparse": _open_array(folder / "sparse.npy", "sparse", count, len(cardinalities)),
            "labels": None if split in unlabeled else _open_array(folder / "labels.npy", "labels", count, None),
        }
        splits[split] = Split(
            arrays["dense"],
            arrays["sparse"],
            arrays["labels"],
            {bag["name"]: _open_bag(folder / "bags", bag["name"], count) for bag in bags},
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
